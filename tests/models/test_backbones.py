
import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from rlhf_lab.models.backbones import (
    TINY_CONFIGS,
    TOY_NAMES,
    backbone_names,
    build_tiny_model,
    load_backbone,
)
from rlhf_lab.policy import Policy

HF_NAMES = list(TINY_CONFIGS)


def _all_dropout_rates(model: nn.Module) -> list[float]:
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    config = model.config.to_dict()
    rates += [v for k, v in config.items() if ("drop" in k) and isinstance(v, float)]
    return rates


@pytest.mark.parametrize("name", HF_NAMES)
def test_tiny_configs_build_sized_to_tokenizer_without_dropout(name, tokenizer):
    torch.manual_seed(0)
    model = build_tiny_model(name, tokenizer)
    assert isinstance(model, PreTrainedModel)
    assert model.config.model_type == TINY_CONFIGS[name]["family"]
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert all(rate == 0.0 for rate in _all_dropout_rates(model))
    ids = torch.tensor([tokenizer.encode("Q: 2+3=\nA: 5")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_llama_and_opt_shapes_follow_the_spec(tokenizer):
    llama = build_tiny_model("llama-tiny", tokenizer).config
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads) == (2, 128, 4)
    assert (llama.num_key_value_heads, llama.intermediate_size) == (2, 256)
    assert llama.max_position_embeddings == 128
    opt = build_tiny_model("opt-tiny", tokenizer).config
    assert (opt.num_hidden_layers, opt.hidden_size, opt.num_attention_heads) == (2, 128, 4)
    assert (opt.ffn_dim, opt.max_position_embeddings, opt.word_embed_proj_dim) == (256, 128, 128)


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny"])
def test_eos_embedding_is_not_a_frozen_padding_row(name, tokenizer):
    # Our tokenizers pad with EOS; as padding_idx its input embedding would be zero and untrained.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    emb = build_tiny_model(name, tokenizer).get_input_embeddings()
    assert emb.padding_idx is None
    assert emb.weight[tokenizer.eos_token_id].abs().sum() > 0


@pytest.mark.parametrize("name", HF_NAMES)
def test_sampled_logprobs_equal_recomputed_for_every_family(name, tokenizer, task):
    torch.manual_seed(0)
    policy = Policy(build_tiny_model(name, tokenizer), tokenizer)
    prompts = task.eval_prompts()[:3] + ["Q: 1+1=\nA: 2\nQ: 3+4=\nA:"]  # forces left padding
    rollout = policy.generate(prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert (rollout.attention_mask[:, 0] == 0).any()
    recomputed = policy.logprobs(rollout.input_ids, rollout.attention_mask)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(recomputed[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)


def test_overrides_replace_config_fields(tokenizer):
    model = build_tiny_model("llama-tiny", tokenizer, num_hidden_layers=1, hidden_size=64)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert TINY_CONFIGS["llama-tiny"]["num_hidden_layers"] == 2  # the registry is not mutated


def test_backbone_names_lists_tiny_configs_first():
    names = backbone_names()
    assert names[: len(HF_NAMES)] == HF_NAMES
    assert len(names) == len(set(names))


def test_unknown_name_lists_every_backbone(tokenizer):
    with pytest.raises(ValueError, match="unknown backbone 'gpt3-tiny'") as info:
        build_tiny_model("gpt3-tiny", tokenizer)
    for name in backbone_names():
        assert name in str(info.value)


def test_named_backbone_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_backbone("llama-tiny")


def test_toy_names_dispatch_to_the_toy_builder(tokenizer):
    toy = pytest.importorskip("rlhf_lab.models.toy")
    assert set(toy.TOY_CONFIGS) <= set(backbone_names())
    assert TOY_NAMES == tuple(toy.TOY_CONFIGS)  # the light list the CLI reads stays in step
    for name in toy.TOY_CONFIGS:
        for model in (build_tiny_model(name, tokenizer), load_backbone(name, tokenizer)):
            assert isinstance(model, PreTrainedModel)
            ids = torch.tensor([tokenizer.encode("Q: 2+3=\nA:")])
            assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize("name", HF_NAMES)
def test_local_folder_loads_identical_logits_without_network(name, tokenizer, tmp_path, no_network):
    torch.manual_seed(0)
    model = build_tiny_model(name, tokenizer).eval()
    model.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path)).eval()
    assert no_network == []  # a local folder never asks the network
    assert type(loaded) is type(model)
    ids = torch.tensor([tokenizer.encode("Q: 2+3=\nA: 5"), tokenizer.encode("Q: 9-4=\nA: 5")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=0, rtol=0)


def test_local_toy_folder_loads_through_auto_classes(tokenizer, tmp_path, no_network):
    toy = pytest.importorskip("rlhf_lab.models.toy")
    name = next(iter(toy.TOY_CONFIGS))
    torch.manual_seed(0)
    model = build_tiny_model(name, tokenizer).eval()
    model.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path)).eval()
    ids = torch.tensor([tokenizer.encode("Q: 2+3=\nA: 5")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hub_name_without_network_fails_fast_with_one_clear_error(no_network):
    with pytest.raises(OSError) as info:
        load_backbone("some-org/some-model")
    message = str(info.value)
    assert "'some-org/some-model'" in message
    assert "not found locally" in message and "no network" in message
    assert all(name in message for name in HF_NAMES)  # a mistyped named config is easy to spot
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Our one probe of the hub, plus at most huggingface_hub's own user-agent lookup (made once per
    # process); a client that tried to download, with its backoff retries, would connect many times.
    assert 1 <= len(no_network) <= 2


def test_hub_name_with_offline_variable_fails_fast(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not found locally.*HF_HUB_OFFLINE is set"):
        load_backbone("some-org/some-model")
    assert no_network == []


def test_local_files_only_never_asks_the_hub(no_network):
    with pytest.raises(OSError, match="local_files_only=True"):
        load_backbone("some-org/some-model", local_files_only=True)


def test_missing_local_path_fails_at_once(tmp_path, no_network):
    with pytest.raises(OSError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"))
    assert no_network == []


def test_a_near_miss_of_a_named_backbone_is_refused_with_the_closest_names(tokenizer, no_network):
    from rlhf_lab.errors import ConfigError
    from rlhf_lab.models.backbones import check_backbone_name
    from rlhf_lab.runs.builder import ModelConfig, build_policy

    with pytest.raises(ConfigError) as info:
        load_backbone("gpt2-tiy", tokenizer)
    assert str(info.value).startswith("backbone: unknown backbone 'gpt2-tiy'; did you mean 'gpt2-tiny'? (named "
                                      "backbones: gpt2-tiny, llama-tiny, opt-tiny")
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown backbone 'lama-tiny'; did you mean "
                       r"'llama-tiny'\?"):
        build_policy(ModelConfig(backbone="lama-tiny"), ["some text"])
    assert no_network == []  # refused before any hub lookup
    with pytest.raises(ValueError, match=r"unknown backbone 'gpt3-tiny'; did you mean 'gpt2-tiny' or 'opt-tiny'\? choose from: "):
        build_tiny_model("gpt3-tiny", tokenizer)
    # Hub ids and paths pass the check (a network may serve them); so do names close to no tiny name.
    for name in ("gpt2", "distilgpt2", "gpt2-large", "org/gpt2-tiy", "facebook/opt-125m", "gpt2-tiny"):
        check_backbone_name(name)
