"""Hugging Face TRL's trainers on the `rlhf-lab bench` workload: seconds per optimiser step.

A standalone script, beside `rlhf-lab bench` (rlhf_lab/bench.py), for a side-by-side throughput
comparison. It is not part of the package and not a test. The workload is the folder whose
README.md defines it (default ../shared/bench): model.json (a GPT2Config), tokenizer.json,
sft.jsonl, pref.jsonl, prompts.jsonl.

Environment (its own venv; torch FIRST, pinned, so pip never pulls a CUDA build):

    python3 -m venv /tmp/trlenv
    /tmp/trlenv/bin/pip install torch==2.13.0
    /tmp/trlenv/bin/pip install trl==1.16.0 transformers==5.24.0

(that resolves accelerate 1.15.0, datasets 5.2.0, tokenizers 0.23.3: the project's versions).
Run from the checkout root:

    /tmp/trlenv/bin/python benchmarks/trl_side_by_side.py --stage all

Options: --workload DIR (default ../shared/bench), --stage sft|reward|dpo|grpo|rloo|all,
--steps N timed steps (default 7), --warmup N untimed steps first (default 3), --threads N
(torch.set_num_threads, default 2). Nothing is downloaded: the model is GPT2Config(**model.json)
with <|endoftext|> as BOS/EOS/PAD, drawn after torch.manual_seed(0), fp32, saved to a temporary
folder that every trainer (and TRL's reference models) loads; the tokenizer is tokenizer.json.

Each stage is TRL's trainer trained for warmup + steps optimiser steps (CPU, fp32 - TRL's configs
default to bf16, set off here -, AdamW, constant learning rate, gradient accumulation 1, no eval,
no checkpoints, no logging, dataloader_num_workers=0). A TrainerCallback times every optimiser
step from on_step_begin to on_step_end (time.perf_counter): the forward, backward, clipping,
optimizer.step and, for grpo/rloo, the sampling and scoring TRL does inside training_step. As in
rlhf-lab bench, collating the batch happens before on_step_begin, outside the timing. One JSON
line per stage:

    stage, step_s        median seconds of the timed steps (those after the warm-up)
    tokens_per_s         prompt + completion tokens of a step (padding not counted) / step_s,
                         averaged over the timed steps; as rlhf_lab/bench.py counts them: the
                         attention mask of the collated batch (sft, reward, dpo; chosen and
                         rejected both count), or the 16 rows' prompt tokens + 16 x 32 (grpo, rloo)
    peak_rss_mb          the process's peak resident memory during training (VmHWM, reset before
                         each stage through /proc/self/clear_refs where Linux allows it)
    library ("trl"), trl_version, transformers_version, torch_version

Settings, per stage, copied from rlhf-lab bench (its presets and the workload's README):

    sft     SFTTrainer, 16 prompt/completion rows a step, max_length 128, completion_only_loss
            (loss on completion tokens + the EOS TRL appends), lr 1e-3, no gradient clipping,
            dropout left on (GPT-2's 0.1, as rlhf_lab's sft stage).
    reward  RewardTrainer, 8 pairs a step (chosen and rejected in one batch of 16), max_length
            128, Bradley-Terry -logsigmoid(r_chosen - r_rejected), lr 1e-3, no clipping, dropout
            left on (disable_dropout=False, as rlhf_lab).
    dpo     DPOTrainer, 8 pairs, loss_type sigmoid, beta 0.1, max_length 128, lr 1e-4, no
            clipping, dropout off; the reference is loaded from the saved initial model (a frozen
            copy of it) and run every step (precompute_ref_log_probs=False).
    grpo    GRPOTrainer, per_device_train_batch_size 16 completions = 4 prompts x num_generations
            4, max_completion_length 32, temperature 1.0, top_p 1.0, top_k 0, EOS suppressed,
            reward len(completion_text) / 100, beta 0.04 (k3 KL to the reference, in the loss),
            epsilon 0.2, loss_type "grpo" (mean over each sequence's tokens, then over sequences,
            as rlhf_lab's seq_mean), scale_rewards "group", num_iterations 1, lr 1e-4,
            max_grad_norm 1.0, dropout off, transformers generate (no vLLM).
    rloo    RLOOTrainer, the same sampling and reward, leave-one-out baseline over the 4, beta 0.05
            (k1 KL summed over the sequence and subtracted from its reward, as rlhf_lab's rloo
            with kl_in="reward"), normalize_advantages False, num_iterations 1, lr 1e-4,
            max_grad_norm 1.0, dropout off.

Where TRL cannot match the workload or rlhf-lab bench exactly:

- ppo: skipped. TRL 1.16.0 has no PPO trainer: it left `trl` for `trl.experimental.ppo` and was
  then removed altogether (huggingface/trl#7020). The older one took tokenized prompts and a reward
  model, not a reward function, so would not run this workload as written either. There is no
  REINFORCE trainer (rlhf-lab bench's `reinforce`) nor the registry's other online algorithms.
- EOS suppression: TRL has no option for it; generation_kwargs={"suppress_tokens": [eos_id]} goes
  into TRL's GenerationConfig, i.e. transformers' SuppressTokensLogitsProcessor sets the EOS logit
  to -inf at every sampled position (as rlhf-lab bench's bare loop does). No completion then ends
  early, so each is exactly max_completion_length = 32 tokens and TRL's after-EOS mask keeps all
  32. The log-probs TRL trains on are taken under the full (temperature-scaled) softmax, EOS
  included, as rlhf_lab records them.
- Sampling log-probs: rlhf_lab keeps generate's logits as the old policy's log-probs. TRL's GRPO
  (num_iterations 1, steps_per_generation 1) uses the detached training pass instead, so it runs
  generate, a reference forward, then the policy's forward/backward. TRL's RLOO always runs one
  more no-grad forward of the policy for its old log-probs: four passes per step where rlhf_lab
  runs three. Both also compute per-token entropy in the training forward (a logged metric).
- LM head: TRL 1.16 patches the policy (and reference) of sft, dpo, grpo and rloo with its fused
  LM head (trl.trainer.utils.add_fused_lm_head): log-probs come from a chunked autograd function
  (online logsumexp over vocabulary tiles, torch ops on CPU, the backward recomputing each tile)
  instead of full (batch, length, vocab) logits + log_softmax + gather as in rlhf_lab. On CPU it
  still scores every position, masking the prompt's afterwards. This is TRL's own code path, not a
  setting, and is kept: it is what TRL costs.
- Loss details that do not change the work: GRPO's KL gradient is that of k3 (rlhf_lab's grpo
  preset uses "k3+", the value of k3 with the gradient of k2); RLOO's importance ratio is
  per sequence (rlhf_lab: per token, averaged over tokens); both ratios are 1 with one
  on-policy update, and rloo's clip (epsilon 0.2) is then inert, as rlhf_lab's unclipped rloo.
- Steps: one optimiser step per step in every stage (gradient_accumulation_steps 1,
  steps_per_generation 1, num_iterations 1), so a grpo/rloo step is exactly one sampling round of
  16 completions and one update over them, like an rlhf_lab iteration. TRL repeats each prompt
  4 times in the batch (RepeatSampler) and generates the 16 rows in one generate call.
- Prompts and rows are drawn in TRL's own (seeded, shuffled) order, not rlhf_lab's. Every row of
  the workload has the same length (sft and preference sides 58 tokens with EOS, prompts 17), so
  both libraries see the same shapes: 928 tokens a step for sft, reward and dpo, 784 for grpo/rloo.
- Truncation: TRL keeps the start of a row longer than max_length; rlhf_lab drops the start of
  the prompt. No row of the workload reaches 128 tokens, so neither truncates.
- Reward model: TRL uses AutoModelForSequenceClassification (GPT2ForSequenceClassification: a
  bias-free linear score head, init std 0.02, drawn after torch.manual_seed(0)); it scores the
  last token that is not PAD. PAD is EOS here, so it scores the token before the trailing EOS,
  where rlhf_lab scores the last real token (the EOS). Same work per step.
- SFT: the loss is the mean negative log-likelihood of the completion tokens (labels -100
  elsewhere), as rlhf_lab's; TRL's fused head also computes entropy and top-1 accuracy every step
  for its metrics, which rlhf_lab does not.
- TRL's Trainer adds its own per-step work inside the timed window (FLOP and token counters,
  the learning-rate scheduler, metric bookkeeping), as Lightning does for rlhf_lab.

Wall-clock numbers: compare runs made on the same idle machine, with the same --threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import warnings

STAGES = ("sft", "reward", "dpo", "grpo", "rloo")
SPECIAL = "<|endoftext|>"
LM_ROWS, MAX_LENGTH, PAIRS = 16, 128, 8  # the workload's README
PROMPTS, SAMPLES, NEW_TOKENS = 4, 4, 32


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then peak_rss_mb is the process's peak so far


def length_reward(completions, **kwargs) -> list[float]:
    """The workload's reward: len(completion_text) / 100."""
    return [len(c) / 100 for c in completions]


def make_tokenizer(workload: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(workload, "tokenizer.json"), bos_token=SPECIAL,
                                   eos_token=SPECIAL, pad_token=SPECIAL, unk_token=SPECIAL)


def save_model(workload: str, tokenizer, folder: str) -> str:
    """GPT2Config(**model.json), random weights after torch.manual_seed(0), fp32, saved to `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with open(os.path.join(workload, "model.json")) as f:
        fields = json.load(f)
    special = tokenizer.eos_token_id
    config = GPT2Config(**fields, bos_token_id=special, eos_token_id=special, pad_token_id=special)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).float().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class TokenCounter:
    """Wraps a trainer's collator; records the prompt + completion tokens of each collated batch."""

    def __init__(self, collate, tokenizer):
        self.collate, self.tokenizer, self.tokens = collate, tokenizer, []

    def __call__(self, rows):
        batch = self.collate(rows)
        if isinstance(batch, dict):  # sft, reward, dpo: every real token of the batch
            self.tokens.append(int(batch["attention_mask"].sum()))
        else:  # grpo, rloo: the raw rows, each prompt once per completion
            ids = self.tokenizer([r["prompt"] for r in batch], add_special_tokens=False)["input_ids"]
            self.tokens.append(sum(map(len, ids)) + len(batch) * NEW_TOKENS)
        return batch


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def build_trainer(stage: str, workload: str, model_dir: str, tokenizer, max_steps: int, out: str):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    common = dict(output_dir=out, max_steps=max_steps, use_cpu=True, bf16=False, fp16=False, report_to="none",
                  eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, gradient_accumulation_steps=1, lr_scheduler_type="constant",
                  weight_decay=0.0, seed=0)
    def policy():  # the saved initial model; TRL loads its references from the same folder
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    if stage == "sft":
        config = trl.SFTConfig(**common, per_device_train_batch_size=LM_ROWS, max_length=MAX_LENGTH,
                               completion_only_loss=True, packing=False, learning_rate=1e-3, max_grad_norm=0.0)
        data = Dataset.from_list(read_jsonl(os.path.join(workload, "sft.jsonl")))
        return trl.SFTTrainer(model=policy(), args=config, train_dataset=data, processing_class=tokenizer)
    if stage in ("reward", "dpo"):
        data = Dataset.from_list(read_jsonl(os.path.join(workload, "pref.jsonl")))
        shared = dict(**common, per_device_train_batch_size=PAIRS, max_length=MAX_LENGTH, max_grad_norm=0.0)
        if stage == "dpo":
            config = trl.DPOConfig(**shared, loss_type=["sigmoid"], beta=0.1, learning_rate=1e-4,
                                   disable_dropout=True, precompute_ref_log_probs=False)
            return trl.DPOTrainer(model=policy(), args=config, train_dataset=data, processing_class=tokenizer)
        torch.manual_seed(0)  # the score head's initial weights
        scorer = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        config = trl.RewardConfig(**shared, learning_rate=1e-3, disable_dropout=False)
        return trl.RewardTrainer(model=scorer, args=config, train_dataset=data, processing_class=tokenizer)
    online = dict(**common, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
                  max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
                  generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]}, num_iterations=1,
                  learning_rate=1e-4, max_grad_norm=1.0, disable_dropout=True, use_vllm=False)
    data = Dataset.from_list(read_jsonl(os.path.join(workload, "prompts.jsonl")))
    if stage == "grpo":
        config = trl.GRPOConfig(**online, beta=0.04, epsilon=0.2, loss_type="grpo", scale_rewards="group")
        return trl.GRPOTrainer(model=policy(), reward_funcs=length_reward, args=config, train_dataset=data,
                               processing_class=tokenizer)
    config = trl.RLOOConfig(**online, beta=0.05, normalize_advantages=False)
    return trl.RLOOTrainer(model=policy(), reward_funcs=length_reward, args=config, train_dataset=data,
                           processing_class=tokenizer)


def bench_stage(stage: str, args, folder: str, tokenizer, model_dir: str) -> dict:
    import torch
    import transformers
    import trl
    from transformers import PrinterCallback

    trainer = build_trainer(stage, args.workload, model_dir, tokenizer, args.warmup + args.steps,
                            os.path.join(folder, stage))
    timer, counter = step_timer(), TokenCounter(trainer.data_collator, tokenizer)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # stdout: only the JSON lines
    trainer.data_collator = counter
    gc.collect()
    reset_peak_rss()
    trainer.train()
    peak = peak_rss_mb()
    if len(timer.seconds) != args.warmup + args.steps:
        raise RuntimeError(f"{stage}: timed {len(timer.seconds)} steps, expected {args.warmup + args.steps}")
    step_s = statistics.median(timer.seconds[args.warmup:])
    tokens = statistics.mean(counter.tokens[args.warmup:args.warmup + args.steps])
    del trainer
    gc.collect()
    return {"stage": stage, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "peak_rss_mb": round(peak, 1), "library": "trl", "trl_version": trl.__version__,
            "transformers_version": transformers.__version__, "torch_version": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="../shared/bench", metavar="DIR")
    parser.add_argument("--stage", default="all", choices=(*STAGES, "ppo", "all"))
    parser.add_argument("--steps", type=int, default=7, help="timed optimiser steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimiser steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.stage == "ppo":
        parser.error("TRL 1.16.0 has no PPO trainer (see this script's docstring)")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --threads >= 1")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")  # never reach the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, inside TRL
    import datasets
    import torch
    from transformers.utils import logging

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tokenizer = make_tokenizer(args.workload)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        model_dir = save_model(args.workload, tokenizer, os.path.join(tmp, "model"))
        for stage in STAGES if args.stage == "all" else (args.stage,):
            print(json.dumps(bench_stage(stage, args, tmp, tokenizer, model_dir)), flush=True)


if __name__ == "__main__":
    main()
