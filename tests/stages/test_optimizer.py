"""`adamw_optimizer`: the fused AdamW kernel where the parameters allow it, the same update."""

from __future__ import annotations

import torch

from rlhf_lab.stages.common import adamw, adamw_optimizer


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    grads = [torch.randn(w.shape, generator=g) for w in weights]
    return weights, grads


def test_cpu_parameters_get_the_fused_kernel_and_the_same_update_as_the_default():
    fused_params, grads = _params(0)
    plain_params, _ = _params(0)
    fused = adamw_optimizer(fused_params, lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW(plain_params, lr=0.1, weight_decay=0.01)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for moved, start in zip(fused_params, _params(0)[0], strict=True):
        assert (moved - start).abs().min() > 0.05  # three steps of about lr each
    # Parameter groups (the online stage's actor and critic) keep their own settings.
    groups = adamw_optimizer([{"params": fused_params[:1]}, {"params": fused_params[1:], "lr": 0.5}],
                             lr=0.1, weight_decay=0.0)
    assert [g["lr"] for g in groups.param_groups] == [0.1, 0.5] and groups.defaults["fused"] is True


def test_parameters_the_fused_kernel_does_not_take_get_the_default():
    meta = [torch.nn.Parameter(torch.empty(4, 2, device="meta"))]
    assert not adamw_optimizer(meta, lr=0.1, weight_decay=0.0).defaults["fused"]
    config = adamw(_params(1)[0], lr=0.1, weight_decay=0.0, warmup_steps=4)
    assert config["optimizer"].defaults["fused"] is True
    assert config["lr_scheduler"]["scheduler"].get_last_lr() == [0.1 / 4]  # one group, warm-up step 1 of 4
