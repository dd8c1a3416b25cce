"""`rlhf-lab bench`: seconds per optimiser step of each stage on one fixed workload, beside a bare
PyTorch loop doing the same passes on the same batches.

The workload is a folder whose README.md defines it (`../shared/bench` beside the checkout):
`model.json` (a `GPT2Config`, random weights from `torch.manual_seed(0)`, fp32), `tokenizer.json`
(a byte-level BPE whose one special token `<|endoftext|>` is BOS, EOS, PAD and UNK), and
`sft.jsonl`, `pref.jsonl`, `prompts.jsonl`. One optimiser step of each stage is:

    pretrain    16 packed blocks of 128 tokens of sft.jsonl's prompt + completion texts
    sft         16 rows of sft.jsonl (≤ 128 tokens), loss on the completion tokens
    reward      8 pairs of pref.jsonl (≤ 128 tokens a side), Bradley–Terry
    dpo         8 pairs, sigmoid DPO, β = 0.1, the reference a frozen copy of the initial model
    online      4 prompts × 4 samples of exactly 32 new tokens at temperature 1 (EOS suppressed),
                reward len(completion) / 100, KL to the reference on, one update over the 16
                (ppo: with a value head and GAE); online_dpo: 8 prompts × 2 samples, one pair each

The online stages are ppo, reinforce, rloo, grpo and every other online algorithm of the registry
(`rlhf_lab.algorithms`) with its preset, as many as are registered when the command runs.

Each stage is built as `rlhf-lab fit` builds it (`rlhf_lab.runs.build_run`: data loaded from the
workload's files, the policy from a model folder, the stage's LightningModule and a Trainer) and
trained for `warmup + steps` optimiser steps; a Callback times each step from
`on_train_batch_start` to `on_train_batch_end` (collating the batch is outside, as in the bare
loop). The online stage has no knob for EOS suppression, so the benchmark sets
`Policy.generate(suppress_eos=True)` on the run's policy: every response is 32 tokens.

Then the bare loop replays the very batches (or prompts) the stage trained on, in the same
process: the model called directly, `torch.optim.AdamW`, log-probs as `log_softmax` + `gather`,
and Hugging Face `model.generate` (KV cache, `output_logits` for the sampling log-probs) in the
online stages. It runs the same passes as the stage (sampling, the reference pass, the value
pass, one forward and backward, gradient clipping where the stage clips) on the same shapes.
Its objective is the preset's written out plainly (baselines, clipped or plain surrogate, KL in
the reward or the loss, clipped value loss); TRPO's trust-region step is `rlhf_lab.optim.trpo_step`
on the plain model.

Each stage prints one JSON line: `stage`, `step_s` (median seconds per step after the warm-up),
`tokens_per_s` (prompt + completion tokens of a step, padding not counted, / step_s),
`peak_rss_mb` (the process's peak resident memory while the stage trained: the peak is reset
before each stage where Linux allows it, else it is the process's peak so far) and `bare_step_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

__all__ = ["BASE_STAGES", "SAMPLE", "Workload", "add_bench_command", "bench_sampling", "bench_stage", "stage_names"]

# The stages of the workload's README; `all` adds every other online algorithm of the registry.
BASE_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "reinforce", "rloo", "grpo")
# Not a training stage: one online step's sampling alone (4 prompts × 4 samples × 32 tokens),
# `Policy.generate` beside Hugging Face `generate` on the same prompts.
SAMPLE = "sample"
_OFFLINE = {"pretrain": "pretrain", "sft": "sft", "reward": "reward_model", "dpo": "dpo"}
FILES = ("model.json", "tokenizer.json", "sft.jsonl", "pref.jsonl", "prompts.jsonl")
SPECIAL = "<|endoftext|>"

# The workload's shapes (README.md of the workload).
LM_ROWS, MAX_LENGTH, PAIRS = 16, 128, 8
PROMPTS, SAMPLES, NEW_TOKENS = 4, 4, 32


def stage_names() -> tuple[str, ...]:
    """What `--stage all` runs: the README's eight, `sample`, then every other registered online
    algorithm."""
    from rlhf_lab.algorithms import ALGORITHMS

    extra = [name for name, a in ALGORITHMS.items()
             if a.stage in ("online_rl", "online_dpo") and name not in BASE_STAGES]
    return (*BASE_STAGES, SAMPLE, *extra)


def length_reward(prompts: list[str], completions: list[str]):
    """The workload's reward: len(completion) / 100, one float per row."""
    import torch

    return torch.tensor([len(c) / 100 for c in completions])


# --------------------------------------------------------------------------- the workload


@dataclass
class Workload:
    """The files of a workload folder, checked; `tokenizer()` and `model()` build them fresh."""

    folder: str
    model_config: dict

    @classmethod
    def load(cls, folder: str) -> Workload:
        """Check `folder` holds every file; a missing one or a bad model.json is a `ConfigError`."""
        from rlhf_lab.errors import ConfigError

        if not os.path.isdir(folder):
            raise ConfigError(f"--workload {folder}: no such folder")
        missing = [f for f in FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConfigError(f"--workload {folder}: missing {', '.join(missing)} (a workload holds "
                              f"{', '.join(FILES)})")
        path = os.path.join(folder, "model.json")
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: must be a JSON object of GPT2Config fields")
        from transformers import GPT2Config

        unknown = sorted(set(config) - set(GPT2Config().to_dict()))
        if unknown:
            raise ConfigError(f"{path}: unknown GPT2Config field(s) {', '.join(unknown)}")
        workload = cls(folder, config)
        workload.tokenizer()  # a bad tokenizer.json fails here, before any stage
        return workload

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        from rlhf_lab.errors import ConfigError

        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=self.path("tokenizer.json"), bos_token=SPECIAL,
                                          eos_token=SPECIAL, pad_token=SPECIAL, unk_token=SPECIAL)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ConfigError(f"{self.path('tokenizer.json')}: not a tokenizer file ({e})") from None
        if tok.convert_tokens_to_ids(SPECIAL) in (None, tok.unk_token_id) and SPECIAL not in tok.get_vocab():
            raise ConfigError(f"{self.path('tokenizer.json')}: has no {SPECIAL} token")
        return tok

    def model(self):
        """The GPT-2 of model.json, random weights drawn after `torch.manual_seed(0)`, fp32."""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        special = self.tokenizer().eos_token_id
        config = GPT2Config(**{**self.model_config, "bos_token_id": special, "eos_token_id": special,
                               "pad_token_id": special})
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).float()

    def save_model(self, folder: str) -> str:
        """Write the model and tokenizer as an HF folder (what `model.backbone` loads); returns it."""
        self.model().save_pretrained(folder)
        self.tokenizer().save_pretrained(folder)
        return folder

    def write_pretrain_text(self, path: str) -> str:
        """sft.jsonl's prompt + completion texts as a text corpus, one paragraph per row."""
        from rlhf_lab.data import load_prompt_completion

        rows = load_prompt_completion(self.path("sft.jsonl"))
        with open(path, "w") as f:
            f.write("\n\n".join((r["prompt"] + r["completion"]).replace("\n\n", "\n") for r in rows) + "\n")
        return path


# --------------------------------------------------------------------------- timing


def _step_timer():
    """A Lightning Callback that times each training batch (one optimiser step here) and keeps it."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []
            self.batches: list = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds.append(time.perf_counter() - self._start)
            self.batches.append(batch)

    return StepTimer()


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux: clear_refs 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident set size in MB (VmHWM, else getrusage's ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def _timed(step, batches: list, warmup: int) -> float:
    """Median seconds of `step(batch)` over `batches[warmup:]`, after running the first `warmup`."""
    seconds = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# --------------------------------------------------------------------------- the real stages


def _fit_config(workload: Workload, stage: str, max_steps: int, model_dir: str, out: str, text_path: str):
    """The `FitConfig` of `stage` on the workload: what `rlhf-lab fit` would resolve."""
    from rlhf_lab.algorithms import get_algorithm
    from rlhf_lab.data.spec import DataConfig
    from rlhf_lab.runs.builder import (
        CheckpointConfig,
        EvalConfig,
        FitConfig,
        ModelConfig,
        TrainerConfig,
    )
    from rlhf_lab.runs.loggers import LoggerConfig
    from rlhf_lab.stages import PretrainConfig, RewardModelConfig, SFTConfig

    if stage == "pretrain":
        name, data = "pretrain", DataConfig(format="text", path=text_path)
        config = PretrainConfig(batch_size=LM_ROWS, block_size=MAX_LENGTH)
    elif stage == "sft":
        name, data = "sft", DataConfig(format="prompt_completion", path=workload.path("sft.jsonl"))
        config = SFTConfig(batch_size=LM_ROWS, max_length=MAX_LENGTH)
    elif stage == "reward":
        name, data = "reward_model", DataConfig(format="preference", path=workload.path("pref.jsonl"))
        config = RewardModelConfig(batch_size=PAIRS, max_length=MAX_LENGTH)
    elif stage == "dpo":
        name, data = "dpo", DataConfig(format="preference", path=workload.path("pref.jsonl"))
        config = get_algorithm("dpo").config(variant="sigmoid", beta=0.1, reference="copy", batch_size=PAIRS,
                                             max_length=MAX_LENGTH)
    else:
        algorithm = get_algorithm(stage)
        name, data = stage, DataConfig(format="prompts", path=workload.path("prompts.jsonl"))
        config = _online_config(algorithm)
    return FitConfig(stage=name, out=out, seed=0, data=data, model=ModelConfig(backbone=model_dir), config=config,
                     eval=EvalConfig(prompts=0), logger=LoggerConfig(kind="none"),
                     checkpoint=CheckpointConfig(every_n_steps=0),
                     trainer=TrainerConfig(max_steps=max_steps, enable_progress_bar=False))


def _online_config(algorithm):
    """The algorithm's preset with the workload's sampling and one update per iteration."""
    if algorithm.stage == "online_dpo":
        return algorithm.config(batch_size=PROMPTS * SAMPLES // 2, max_new_tokens=NEW_TOKENS, temperature=1.0)
    sampling = dict(prompts_per_step=PROMPTS, samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS,
                    temperature=1.0, top_p=1.0)
    preset = algorithm.config(**sampling)
    if preset.update == "trpo" and preset.baseline != "critic":
        return preset  # one trust-region step per iteration; the epoch and minibatch knobs are inert
    return algorithm.config(**sampling, ppo_epochs=1, minibatches=1)


def _tokens(batch, tokenizer, samples: int) -> int:
    """Prompt + completion tokens of one step (padding not counted)."""
    if isinstance(batch, dict):
        return int(batch["attention_mask"].sum())
    prompt_tokens = sum(len(ids) for ids in tokenizer(list(batch))["input_ids"])
    return samples * prompt_tokens + samples * len(batch) * NEW_TOKENS


def run_stage(workload: Workload, stage: str, steps: int, warmup: int, folder: str):
    """Train `stage` for `warmup + steps` optimiser steps as a run; returns (timer, peak MB, config)."""
    import functools
    import gc

    from rlhf_lab.runs.builder import build_run

    model_dir = os.path.join(folder, "model")
    if not os.path.isdir(model_dir):
        workload.save_model(model_dir)
    text_path = os.path.join(folder, "pretrain.txt")
    if stage == "pretrain" and not os.path.isfile(text_path):
        workload.write_pretrain_text(text_path)
    out = os.path.join(folder, "runs")
    config = _fit_config(workload, stage, warmup + steps, model_dir, out, text_path)
    timer = _step_timer()
    online = config.stage_name in ("online_rl", "online_dpo")
    run = build_run(config, reward_fn=length_reward if online else None, callbacks=[timer],
                    out_dir=os.path.join(out, stage))
    if online:  # the workload's fixed-length responses (see the module docstring)
        run.policy.generate = functools.partial(type(run.policy).generate, run.policy, suppress_eos=True)
    gc.collect()
    reset_peak_rss()
    run.fit(save=False)
    peak = peak_rss_mb()
    stage_config = config.config
    del run
    gc.collect()
    return timer, peak, stage_config


def bench_stage(workload: Workload, stage: str, steps: int = 10, warmup: int = 3, folder: str | None = None) -> dict:
    """Benchmark one stage (the stage, then the bare loop on its batches); returns the JSON row."""
    import tempfile

    if stage == SAMPLE:
        return bench_sampling(workload, steps, warmup)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="rlhf-lab-bench-") as tmp:
            return bench_stage(workload, stage, steps, warmup, tmp)
    timer, peak, config = run_stage(workload, stage, steps, warmup, folder)
    if len(timer.seconds) != warmup + steps:
        raise RuntimeError(f"bench: {stage} ran {len(timer.seconds)} steps, expected {warmup + steps}")
    tokenizer = workload.tokenizer()
    samples = getattr(config, "samples_per_prompt", 2)
    tokens = statistics.mean(_tokens(b, tokenizer, samples) for b in timer.batches[warmup:])
    step_s = statistics.median(timer.seconds[warmup:])
    bare_s = _timed(bare_step(workload, stage, config), timer.batches, warmup)
    return {"stage": stage, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "peak_rss_mb": round(peak, 1), "bare_step_s": round(bare_s, 4)}


def bench_sampling(workload: Workload, steps: int = 10, warmup: int = 3) -> dict:
    """The `sample` row: `Policy.generate` of 4 prompts × 4 samples × 32 tokens (temperature 1,
    EOS suppressed) on successive prompts of prompts.jsonl, and Hugging Face `generate` (KV cache,
    the same settings) on the same prompts; medians after the warm-up.

    The two calls alternate on each batch (ours, then Hugging Face's), so a drift of the machine's
    speed over the minute the row takes reaches both medians alike; the peak memory is that of
    the warm-up calls of ours, before any Hugging Face call."""
    import gc

    import torch

    from rlhf_lab.data import load_prompts
    from rlhf_lab.policy import Policy

    tokenizer, model = workload.tokenizer(), workload.model().eval()
    policy = Policy(model, tokenizer)
    rows = list(load_prompts(workload.path("prompts.jsonl")))
    batches = [rows[(i * PROMPTS) % len(rows):][:PROMPTS] for i in range(warmup + steps)]
    generator = torch.Generator().manual_seed(0)

    def ours(prompts):
        policy.generate(list(prompts), max_new_tokens=NEW_TOKENS, temperature=1.0, samples_per_prompt=SAMPLES,
                        suppress_eos=True, generator=generator)

    def bare(prompts):
        _sample(model, tokenizer, list(prompts), SAMPLES, 1.0, 1.0)

    gc.collect()
    reset_peak_rss()
    for prompts in batches[:warmup]:
        ours(prompts)
    peak = peak_rss_mb() if warmup else None
    for prompts in batches[:warmup]:
        bare(prompts)
    times: dict = {ours: [], bare: []}
    for prompts in batches[warmup:]:
        for fn in (ours, bare):
            start = time.perf_counter()
            fn(prompts)
            times[fn].append(time.perf_counter() - start)
            if peak is None:  # no warm-up: the first call of ours, before any of Hugging Face's
                peak = peak_rss_mb()
    step_s, bare_s = statistics.median(times[ours]), statistics.median(times[bare])
    tokens = statistics.mean(_tokens(b, tokenizer, SAMPLES) for b in batches[warmup:])
    return {"stage": SAMPLE, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "peak_rss_mb": round(peak, 1), "bare_step_s": round(bare_s, 4)}


# --------------------------------------------------------------------------- the bare loop


def bare_step(workload: Workload, stage: str, config):
    """`step(batch)`: one optimiser step of `stage` as a plain PyTorch loop, on a fresh copy of the
    workload's model (the same initial weights the stage started from)."""
    if stage in ("pretrain", "sft"):
        return _bare_lm(workload, config)
    if stage == "reward":
        return _bare_reward(workload, config)
    if stage == "dpo":
        return _bare_dpo(workload, config)
    if type(config).__name__ == "DPOConfig":
        return _bare_online_dpo(workload, config)
    return _bare_online(workload, config)


def _no_dropout(model):
    """Zero every dropout rate, as the DPO and online stages do (`Policy.disable_dropout`)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _logprobs(logits, ids, temperature: float = 1.0, entropy: bool = False):
    """The textbook formula: log_softmax over the vocabulary, then gather. Shapes (B, T-1)."""
    logp_all = (logits[:, :-1] / temperature).log_softmax(dim=-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(dim=-1)


def _head(hidden: int):
    import torch

    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    torch.nn.init.zeros_(head.bias)
    return head


def _bare_lm(workload: Workload, config):
    import torch
    import torch.nn.functional as F

    model = workload.model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step(batch):
        ids, mask = batch["input_ids"], batch["loss_mask"][:, 1:].float()
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _bare_reward(workload: Workload, config):
    import torch
    import torch.nn.functional as F

    model = workload.model().train()
    head = _head(model.config.n_embd)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=config.lr,
                            weight_decay=config.weight_decay)

    def step(batch):
        ids, attn = batch["input_ids"], batch["attention_mask"]
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state  # (2B, T, H)
        last = attn.sum(dim=1) - 1  # right padding: the last real token
        scores = head(hidden[torch.arange(len(ids)), last]).squeeze(-1)
        chosen, rejected = scores.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _sequence_logps(model, ids, attn, mask, position_ids=None):
    """Summed log-prob of each row's `mask`ed tokens (mask over columns 1..T-1). Shape (B,)."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    return (_logprobs(logits, ids) * mask).sum(dim=1)


def _bare_dpo(workload: Workload, config):
    import copy

    import torch
    import torch.nn.functional as F

    model = _no_dropout(workload.model()).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    beta = config.beta

    def step(batch):
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:].float()
        logps = _sequence_logps(model, ids, attn, mask)
        with torch.no_grad():
            ref = _sequence_logps(reference, ids, attn, mask)
        (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _sample(model, tokenizer, prompts: list[str], samples: int, temperature: float, top_p: float):
    """Hugging Face `generate` (KV cache) of exactly NEW_TOKENS tokens per row, EOS suppressed.

    Returns (ids (B, T), attention_mask (B, T), position_ids (B, T), response_mask (B, T-1) over
    columns 1..T-1, sampling log-probs (B, T-1), completions)."""
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = enc["input_ids"].repeat_interleave(samples, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(samples, dim=0)
    eos = tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=NEW_TOKENS,
                             suppress_tokens=[eos], pad_token_id=eos, eos_token_id=eos,
                             output_logits=True, return_dict_in_generate=True)
    model.train()
    n_prompt = prompt_ids.shape[1]
    ids, new = out.sequences, out.sequences[:, n_prompt:]
    # The sampling log-probs, under the temperature-scaled full distribution (as the stage records).
    old = (torch.stack(out.logits, dim=1).float() / temperature).log_softmax(-1)
    old = old.gather(-1, new[..., None]).squeeze(-1)  # (B, N)
    attn = torch.cat([prompt_mask, torch.ones_like(new)], dim=1)
    positions = (attn.cumsum(dim=-1) - 1).clamp(min=0)
    response = torch.cat([torch.zeros_like(prompt_mask), torch.ones_like(new)], dim=1)[:, 1:].float()
    old = torch.nn.functional.pad(old, (n_prompt - 1, 0))
    completions = tokenizer.batch_decode(new, skip_special_tokens=True)
    return ids, attn, positions, response, old, completions


def _advantages(c, scores, old, ref, values, mask, samples: int):
    """Per-token advantages and returns of the preset's estimator, written plainly. Shapes (B, T-1)."""
    import torch

    kl = (old - ref) * mask
    rewards = -c.kl_coef * kl if c.kl_in == "reward" else torch.zeros_like(kl)
    last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
    rewards[torch.arange(len(mask)), last] += scores
    if values is not None:  # GAE(γ, λ) over the response columns
        advantages, running = torch.zeros_like(rewards), torch.zeros(len(mask))
        for t in reversed(range(mask.shape[1])):
            next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < mask.shape[1] else 0.0
            delta = rewards[:, t] + c.gamma * next_value - values[:, t]
            running = (delta + c.gamma * c.lam * running) * mask[:, t]
            advantages[:, t] = running
        returns = (advantages + values) * mask
    else:
        total = rewards.sum(dim=1)
        grouped = total.view(-1, samples)
        if c.baseline == "batch_mean":
            baseline = total.mean().expand_as(total)
        elif c.baseline == "leave_one_out":
            baseline = ((grouped.sum(1, keepdim=True) - grouped) / (samples - 1)).flatten()
        elif c.baseline in ("group_norm", "group_mean"):
            baseline = grouped.mean(1, keepdim=True).expand_as(grouped).flatten()
        else:  # none
            baseline = torch.zeros_like(total)
        if c.returns == "to_go":
            per_token = rewards.flip(1).cumsum(1).flip(1) - baseline[:, None]
        else:
            per_token = (total - baseline)[:, None].expand_as(rewards)
        if c.baseline == "group_norm":
            per_token = per_token / (grouped.std(1, keepdim=True).expand_as(grouped).flatten()[:, None] + 1e-6)
        advantages, returns = per_token * mask, None
    if c.whiten_advantages:
        n = mask.sum()
        mean = (advantages * mask).sum() / n
        std = (((advantages - mean) ** 2 * mask).sum() / n).sqrt()
        advantages = (advantages - mean) / (std + 1e-8) * mask
    return advantages, returns


def _policy_loss(c, logp, old, advantages, mask):
    """The preset's surrogate (clipped, plain, sequence-level or CISPO), token mean."""
    import torch

    log_ratio = logp - old
    if c.ratio_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).expand_as(logp)
    ratio = log_ratio.exp()
    high = c.clip_ratio_high if c.clip_ratio_high is not None else c.clip_ratio
    if c.surrogate == "cispo":
        per_token = -(ratio.clamp(max=1 + high).detach() * advantages * logp)
    elif c.clip_ratio is None:
        per_token = -ratio * advantages
    else:
        per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - c.clip_ratio, 1 + high))
    return (per_token * mask).sum() / mask.sum()


def _bare_online(workload: Workload, c):
    import copy

    import torch

    tokenizer = workload.tokenizer()
    model = _no_dropout(workload.model()).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    critic = c.baseline == "critic"
    head = _head(model.config.n_embd) if critic else None
    params = [*model.parameters(), *(head.parameters() if critic else ())]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def values_of(out):
        return head(out.hidden_states[-1][:, :-1]).squeeze(-1)  # values[:, t] = V(x_<t+1), (B, T-1)

    def step(prompts):
        ids, attn, pos, mask, old, completions = _sample(model, tokenizer, list(prompts), c.samples_per_prompt,
                                                         c.temperature, c.top_p)
        scores = length_reward(prompts, completions)
        with torch.no_grad():
            ref = _logprobs(reference(input_ids=ids, attention_mask=attn, position_ids=pos).logits, ids, c.temperature)
            values = None
            if critic:
                values = values_of(model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                         output_hidden_states=True)) * mask
        advantages, returns = _advantages(c, scores, old, ref, values, mask, c.samples_per_prompt)
        if c.update == "trpo":
            _bare_trpo(c, model, ids, attn, pos, old, ref, advantages, mask)
            return
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=critic)
        logp, entropy = _logprobs(out.logits, ids, c.temperature, entropy=True)
        loss = _policy_loss(c, logp, old, advantages, mask)
        if c.entropy_coef:
            loss = loss - c.entropy_coef * (entropy * mask).sum() / mask.sum()
        if c.kl_in == "loss":
            d = ref - logp
            loss = loss + c.kl_coef * ((d.exp() - d - 1) * mask).sum() / mask.sum()
        if critic:
            v = values_of(out)
            if c.value_clip is not None:
                clipped = values + (v - values).clamp(-c.value_clip, c.value_clip)
                value_loss = 0.5 * torch.max((v - returns) ** 2, (clipped - returns) ** 2)
            else:
                value_loss = 0.5 * (v - returns) ** 2
            loss = loss + c.vf_coef * (value_loss * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()

    return step


def _bare_trpo(c, model, ids, attn, pos, old, ref, advantages, mask):
    """One trust-region step (`rlhf_lab.optim.trpo_step`) of the plain model on the surrogate."""
    import torch

    from rlhf_lab.optim import trpo_step

    params = [p for p in model.parameters() if p.requires_grad]
    tokens = mask.sum()

    def logp():
        return _logprobs(model(input_ids=ids, attention_mask=attn, position_ids=pos).logits, ids, c.temperature)

    def loss_fn():
        lp = logp()
        loss = -((lp - old).exp() * advantages * mask).sum() / tokens
        if c.kl_in == "loss":
            d = ref - lp
            loss = loss + c.kl_coef * ((d.exp() - d - 1) * mask).sum() / tokens
        return loss

    def kl_fn():
        d = logp() - old
        return ((d.exp() - d - 1) * mask).sum() / tokens

    with torch.no_grad():
        loss_fn()
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # a double backward (the Fisher-vector product)
    try:
        trpo_step(params, loss_fn, kl_fn, max_kl=c.max_kl, cg_iters=c.cg_iters, damping=c.cg_damping,
                  max_backtracks=c.line_search_steps)
    finally:
        model.set_attn_implementation(previous)
    with torch.no_grad():
        _logprobs(model(input_ids=ids, attention_mask=attn, position_ids=pos).logits, ids, c.temperature, entropy=True)


def _bare_online_dpo(workload: Workload, c):
    import copy

    import torch
    import torch.nn.functional as F

    tokenizer = workload.tokenizer()
    model = _no_dropout(workload.model()).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)

    def step(prompts):
        ids, attn, pos, mask, old, completions = _sample(model, tokenizer, list(prompts), 2, c.temperature, 1.0)
        scores = length_reward(prompts, completions).view(-1, 2)
        with torch.no_grad():  # one reference pass: the KL metric and the loss's reference terms
            ref_tokens = _logprobs(reference(input_ids=ids, attention_mask=attn, position_ids=pos).logits, ids,
                                   c.temperature)
            float(((old - ref_tokens) * mask).sum(1).mean())
        keep = scores[:, 0] != scores[:, 1]
        if not keep.any():
            return
        rows = torch.arange(len(keep))[keep]
        better = scores[keep].argmax(dim=1)
        order = torch.cat([rows * 2 + better, rows * 2 + 1 - better])
        logps = _sequence_logps(model, ids[order], attn[order], mask[order], pos[order])
        ref = (ref_tokens[order] * mask[order]).sum(1)
        (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
        loss = -F.logsigmoid(c.beta * ((pc - rc) - (pr - rr))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------- the command

DESCRIPTION = """\
Throughput of every stage on one fixed workload (a folder: model.json, tokenizer.json, sft.jsonl,
pref.jsonl, prompts.jsonl; its README.md defines one step of each stage). Each stage is built as
`rlhf-lab fit` builds it (the stage's LightningModule and a Lightning Trainer, data from the
workload's files) and trained for WARMUP + STEPS optimiser steps, each timed by a Callback; then a
plain PyTorch loop (the model called directly, AdamW, Hugging Face generate with its KV cache for
sampling) replays the same batches in the same process. Prints one JSON line per stage:

  stage         the stage's name
  step_s        median seconds per optimiser step after the warm-up
  tokens_per_s  prompt + completion tokens of a step (padding not counted) / step_s
  peak_rss_mb   peak resident memory of the process while the stage trained (MB)
  bare_step_s   median seconds per step of the plain loop on the same batches

Stages: pretrain, sft, reward, dpo, ppo, reinforce, rloo, grpo, sample (one online step's sampling
alone: Policy.generate beside Hugging Face generate), and every other online algorithm of the
registry (all = every one of them, in that order). CPU, fp32, --threads torch threads.
Wall-clock numbers: compare runs made on the same idle machine."""


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to `subparsers`; returns its parser (imports nothing heavy)."""
    p = subparsers.add_parser("bench", help="seconds per step of every stage on a fixed workload, beside a bare loop",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, metavar="DIR",
                   help="the workload folder (e.g. ../shared/bench beside the checkout)")
    p.add_argument("--stage", default="all", metavar="STAGE|all",
                   help="one stage (pretrain, sft, reward, dpo, ppo, reinforce, rloo, grpo, sample, or another "
                   "online algorithm of the registry), a comma-separated list, or all (default)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed optimiser steps per stage (default 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed optimiser steps before them (default 3)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="torch threads (default 2, the workload's)")
    p.set_defaults(func=bench_main)
    return p


def _stages(value: str) -> list[str]:
    from rlhf_lab.errors import ConfigError

    known = stage_names()
    if value == "all":
        return list(known)
    stages = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in known]
    if unknown or not stages:
        raise ConfigError(f"--stage: unknown stage {', '.join(map(repr, unknown)) or repr(value)}; choose from "
                          f"{', '.join(known)} or all")
    return stages


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark of `args` (see `add_bench_command`); prints one JSON line per stage."""
    from rlhf_lab.errors import ConfigError

    for name, low in (("steps", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    from rlhf_lab.runs import quiet_libraries

    quiet_libraries()
    stages = _stages(args.stage)
    workload = Workload.load(args.workload)
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rlhf-lab-bench-") as tmp:
        for stage in stages:
            row = bench_stage(workload, stage, args.steps, args.warmup, os.path.join(tmp, stage))
            print(json.dumps(row), flush=True)
    return 0
