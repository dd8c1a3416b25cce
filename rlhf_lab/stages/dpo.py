"""Direct preference optimisation: offline (`DPO`) on fixed pairs, and online (`OnlineDPO`).

Both compute per-sequence log-probs of the completion tokens under the policy and the reference
and call one of `rlhf_lab.losses.DPO_LOSSES` (sigmoid DPO, IPO, hinge, robust, SimPO, ORPO). The
reference is the Policy's frozen copy (`reference="copy"`), or log-probs precomputed once before
training (`reference="precomputed"`: no second model in memory), or none for SimPO and ORPO.
The offline stage's variant "kto" trains on unpaired rows instead (`rlhf_lab.losses.kto_loss`,
Ethayarajh et al. 2024): `prompt`/`completion`/`label` rows, or pairs it splits into a desirable
row (chosen) and an undesirable one (rejected).
`OnlineDPO` samples two responses per prompt from the current policy each iteration, ranks them
with a reward source and takes a DPO step on the pairs (Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lab.checks import check_choice, check_positive
from rlhf_lab.data import (
    PreferenceDataset,
    UnpairedDataset,
    preference_collate,
    unpair,
    unpaired_collate,
)
from rlhf_lab.distributed import all_sum, collective_device, world_size
from rlhf_lab.losses import DPO_LOSSES, kl_k1, kto_kl, kto_loss, preference_loss
from rlhf_lab.policy import Policy, first_scored_column
from rlhf_lab.rewards.checks import check_scores
from rlhf_lab.stages.common import (
    Budget,
    EpochMeans,
    ResumableStage,
    ShardableStage,
    StepBudget,
    adamw,
    check_fits_positions,
    check_micro_batch_size,
    global_mean,
    global_means,
    mean_of_parts,
    micro_batches,
)

REFERENCE_FREE = ("simpo", "orpo")
# The variant that learns from unpaired rows (desirable / undesirable), not pairs: KTO. It is not an
# entry of DPO_LOSSES (whose losses all take chosen/rejected pairs); the offline stage trains it.
UNPAIRED = "kto"


def variant_names() -> tuple[str, ...]:
    """Every `DPOConfig.variant`: the pair losses of DPO_LOSSES (as registered now), then "kto"."""
    return (*DPO_LOSSES, UNPAIRED)


@dataclass
class DPOConfig:
    """Hyperparameters of (offline or online) DPO and its variants."""

    variant: str = "sigmoid"  # sigmoid | ipo | hinge | robust | robust_unbiased | simpo | orpo | kto (offline)
    beta: float | None = None  # β of the variant; None = the variant's default (0.1; SimPO 2.0); ORPO's λ
    label_smoothing: float = 0.0  # ε of the robust variants (robust, robust_unbiased); refused for others
    gamma: float = 0.5  # SimPO's target margin; refused for other variants
    nll_coef: float = 0.0  # α of an added NLL term on the chosen responses (RPO; ORPO's SFT term); 0 = off
    desirable_weight: float = 1.0  # KTO's λ_D, weight of the desirable rows; refused for other variants
    undesirable_weight: float = 1.0  # KTO's λ_U, weight of the undesirable rows; refused for other variants
    reference: str = "copy"  # "copy" (the Policy's frozen copy) or "precomputed" (once, offline only)
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps
    batch_size: int = 16  # pairs per optimiser step (kto: rows; OnlineDPO: prompts per iteration)
    max_length: int = 128  # tokens per side; longer rows lose the start of the prompt (counted)
    max_new_tokens: int = 8  # OnlineDPO: response length limit
    temperature: float = 1.0  # OnlineDPO: sampling temperature
    micro_batch_size: int | None = None  # pairs (kto: rows) per forward/backward pass (memory bound); None = the batch

    def __post_init__(self):
        check_choice("variant", self.variant, variant_names())
        check_choice("reference", self.reference, ("copy", "precomputed"))
        if self.beta is not None:
            check_positive("beta", self.beta)
        check_positive("nll_coef", self.nll_coef, allow_zero=True)
        check_positive("desirable_weight", self.desirable_weight)
        check_positive("undesirable_weight", self.undesirable_weight)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("batch_size", self.batch_size)
        check_positive("max_length", self.max_length)
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("temperature", self.temperature)
        check_micro_batch_size(self.micro_batch_size)
        self._reject_inert_knobs()

    def _reject_inert_knobs(self) -> None:
        """Refuse a variant-specific knob set away from its default for a variant that never reads it.

        In `rlhf_lab.losses.dpo` only the robust variants read `label_smoothing` and only SimPO
        reads `gamma`; SimPO and ORPO are reference-free, so `reference` chooses nothing for them.
        Only KTO reads the class weights, and KTO has no chosen responses for `nll_coef`.
        """
        defaults = {f.name: f.default for f in fields(self)}
        users = {"label_smoothing": ("robust", "robust_unbiased"), "gamma": ("simpo",),
                 "desirable_weight": (UNPAIRED,), "undesirable_weight": (UNPAIRED,),
                 "nll_coef": tuple(DPO_LOSSES)}
        for name, variants in users.items():
            value = getattr(self, name)
            if self.variant not in variants and value != defaults[name]:
                raise ValueError(f"{name} has no effect with variant={self.variant!r} (got {value!r}; it is read "
                                 f"by {', '.join(variants)}); leave it at its default")
        if self.variant in REFERENCE_FREE and self.reference != defaults["reference"]:
            raise ValueError(f"reference has no effect with variant={self.variant!r} (got {self.reference!r}; "
                             "the variant is reference-free); leave it at its default")


def sequence_logprobs(policy: Policy, batch: dict, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's loss-masked (completion) tokens, and their count. Shape: (B,)."""
    mask = batch["loss_mask"].clone()
    mask[:, 0] = 0  # column 0 has no context
    fn = policy.ref_logprobs if reference else policy.logprobs
    logprobs = fn(batch["input_ids"], batch["attention_mask"], start=first_scored_column(mask))
    return (logprobs * mask).sum(dim=1), mask.sum(dim=1).float()


class _Indexed(Dataset):
    """Adds each item's index, so precomputed reference log-probs can be looked up."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "index": i}


def _collate(items: list[dict], pad_token_id: int, collate=preference_collate) -> dict:
    batch = collate(items, pad_token_id)
    batch["index"] = torch.tensor([item["index"] for item in items])
    return batch


def _mismatched(batch: dict) -> dict:
    """The mismatched sequences of an `unpaired_collate` batch (each prompt with another row's
    completion), under the keys `sequence_logprobs` reads."""
    return {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
            "loss_mask": batch["kl_loss_mask"]}


def _pairs_only(variant: str, rows: list[dict] | None, split: str) -> None:
    """A pair loss given unpaired rows fails here, naming the variant that trains on them."""
    for i, row in enumerate(rows or []):
        if "chosen" not in row or "rejected" not in row:
            raise ValueError(f"DPO variant {variant!r} trains on prompt/chosen/rejected pairs, but {split} row {i} "
                             f"has the fields {sorted(row)}; unpaired rows (prompt/completion/label) need "
                             f"variant='{UNPAIRED}'")


class _PreferenceStep:
    """The DPO loss on one padded batch of chosen rows then rejected rows (shared by both stages)."""

    policy: Policy
    config: DPOConfig

    def _dpo_loss(self, batch: dict, ref: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        c = self.config
        logps, lengths = sequence_logprobs(self.policy, batch)
        chosen, rejected = logps.chunk(2)
        len_c, len_r = lengths.chunk(2)
        ref_c = ref_r = None
        if ref is not None:
            ref_c, ref_r = ref
        return preference_loss(c.variant, chosen, rejected, ref_c, ref_r, chosen_lengths=len_c,
                               rejected_lengths=len_r, beta=c.beta, label_smoothing=c.label_smoothing,
                               gamma=c.gamma, nll_coef=c.nll_coef)

    def _micro_batched(self, batch: dict, n: int, reference) -> tuple[torch.Tensor, dict]:
        """`_dpo_loss` of n pairs, in parts of `micro_batch_size` pairs (`micro_batches`): every
        variant's loss and metrics are means over pairs, so the parts' means, weighted by their
        pairs, are the batch's."""
        parts = micro_batches(lambda part: self._dpo_loss(part, reference(part)), batch, n,
                              self.config.micro_batch_size, pairs=True)
        return mean_of_parts(parts, n)

    def _preference_metrics(self, loss, metrics: dict | None) -> dict:
        """The logged values of one batch: loss and implicit-reward metrics (zeros when `metrics`
        is None: a rank without pairs, weighted 0 in the global means)."""
        keys = ["rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"]
        if self.config.nll_coef > 0:  # the chosen responses' per-token NLL (RPO)
            keys.append("nll")
        if self.config.variant == "orpo":  # mean log odds ratio of chosen over rejected
            keys.append("log_odds_ratio")
        return {"loss": loss, **{k: 0.0 if metrics is None else metrics[k] for k in keys}}

    def _log_preference(self, split: str, values: dict) -> None:
        """Log global means (`global_means` / `EpochMeans`): no per-rank numbers, no sync_dist."""
        for key, value in values.items():
            self.log(f"{split}/{key}", value, prog_bar=key in ("loss", "reward_accuracy"))


class DPO(_PreferenceStep, StepBudget, ResumableStage, ShardableStage, L.LightningModule):
    """Offline DPO (and variants) on `prompt`/`chosen`/`rejected` rows.

    With `variant="kto"` it trains KTO on `prompt`/`completion`/`label` rows; pairs given to it are
    split into a desirable row (chosen) and an undesirable one (rejected) (`rlhf_lab.data.unpair`),
    so `batch_size` and `micro_batch_size` count rows. Each row also carries a fixed mismatched
    sequence, its prompt with another row's completion (`UnpairedDataset`), for the reference point.
    """

    config_class = DPOConfig

    def __init__(self, policy: Policy, train_rows: list[dict], val_rows: list[dict] | None = None,
                 config: DPOConfig | None = None):
        super().__init__()
        self.config = c = config or DPOConfig()
        needs_ref = c.variant not in REFERENCE_FREE
        if needs_ref and c.reference == "copy" and not policy.has_reference:
            raise ValueError(f"DPO variant '{c.variant}' with reference='copy' needs Policy(reference='copy')")
        self.policy = policy.disable_dropout()
        pad = policy.tokenizer.pad_token_id
        check_fits_positions(policy, "max_length", c.max_length)
        self.unpaired = c.variant == UNPAIRED
        if self.unpaired:
            train_rows, val_rows = unpair(train_rows), unpair(val_rows) if val_rows else None
            dataset, collate = UnpairedDataset, unpaired_collate
        else:
            _pairs_only(c.variant, train_rows, "train")
            _pairs_only(c.variant, val_rows, "val")
            dataset, collate = PreferenceDataset, preference_collate
        self.train_data = _Indexed(dataset(train_rows, policy.tokenizer, c.max_length))
        self.val_data = _Indexed(dataset(val_rows, policy.tokenizer, c.max_length)) if val_rows else None
        self._collate = partial(_collate, pad_token_id=pad, collate=collate)
        self._precomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if needs_ref and c.reference == "precomputed":
            # The policy is still the reference now: score every pair once, keep no second model.
            for split, data in (("train", self.train_data), ("val", self.val_data)):
                if data is not None:
                    self._precomputed[split] = self._score_all(data)
        self.budget = Budget()
        self._init_resumable()
        self.save_hyperparameters({"stage": "dpo", "algorithm": "dpo", **asdict(c)})

    @torch.no_grad()
    def _score_all(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of every item by index: (chosen, rejected) of pairs; (row, mismatched) for KTO."""
        first, second = torch.zeros(len(data)), torch.zeros(len(data))
        for batch in DataLoader(data, batch_size=64, collate_fn=self._collate):
            batch = {k: v.to(self.policy.device) for k, v in batch.items()}
            if self.unpaired:
                a, _ = sequence_logprobs(self.policy, batch)
                b, _ = sequence_logprobs(self.policy, _mismatched(batch))
            else:
                a, b = sequence_logprobs(self.policy, batch)[0].chunk(2)
            first[batch["index"].cpu()], second[batch["index"].cpu()] = a.cpu(), b.cpu()
        return first, second

    def _reference(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        c = self.config
        if c.variant in REFERENCE_FREE:
            return None
        if c.reference == "precomputed":
            chosen, rejected = self._precomputed[split]
            idx = batch["index"].cpu()
            return chosen[idx].to(self.device), rejected[idx].to(self.device)
        ref, _ = sequence_logprobs(self.policy, batch, reference=True)
        return ref.chunk(2)

    # --- KTO ------------------------------------------------------------------------------------

    def _kto_reference(self, batch: dict, split: str, mismatched: bool) -> torch.Tensor:
        """Reference log-probs (B,) of the rows, or of their mismatched sequences."""
        if self.config.reference == "precomputed":
            return self._precomputed[split][int(mismatched)][batch["index"].cpu()].to(self.device)
        logps, _ = sequence_logprobs(self.policy, _mismatched(batch) if mismatched else batch, reference=True)
        return logps

    def _kto_kl(self, batch: dict, split: str, rows: float | None = None) -> torch.Tensor:
        """`kto_kl` of the batch's mismatched sequences (divided by `rows` when given)."""
        logps, _ = sequence_logprobs(self.policy, _mismatched(batch))
        return kto_kl(logps, self._kto_reference(batch, split, mismatched=True), rows=rows)

    def _kto_loss(self, batch: dict, split: str, kl: torch.Tensor, counts=None) -> tuple[torch.Tensor, dict]:
        c = self.config
        logps, _ = sequence_logprobs(self.policy, batch)
        beta = {} if c.beta is None else {"beta": c.beta}
        return kto_loss(logps, self._kto_reference(batch, split, mismatched=False), batch["label"], kl,
                        desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight,
                        counts=counts, **beta)

    def _kto_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """KTO on this rank's share of a global batch: the loss to backpropagate and the logged
        values (global).

        z0 comes first, from every rank's mismatched sequences (one forward without a graph: it is
        a constant of the step). Then each part (`micro_batches`) returns its sums divided by the
        global batch's row counts, so the parts and the ranks add up to the global batch's mean;
        DDP averages the ranks' gradients, hence the factor W.
        """
        n, labels = batch["index"].shape[0], batch["label"]
        size = self.config.micro_batch_size
        local = torch.tensor([float(labels.sum()), float((~labels).sum())], dtype=torch.float64)
        counts = tuple(all_sum(local.to(collective_device())).cpu().tolist())  # (N_D, N_U)
        rows = counts[0] + counts[1]
        with torch.no_grad():
            kl_parts = micro_batches(lambda part: self._kto_kl(part, "train", rows), batch, n, size)
            kl_share = sum(part for _, part in kl_parts).double()
            kl = all_sum(kl_share.to(collective_device())).to(self.device)
        parts = micro_batches(lambda part: self._kto_loss(part, "train", kl, counts), batch, n, size)
        loss = sum(part_loss for _, (part_loss, _) in parts)
        keys = list(parts[0][1][1])
        shares = torch.stack([sum(m[k] for _, (_, m) in parts).double() for k in keys])
        logged = dict(zip(keys, all_sum(shares.to(collective_device())).cpu().tolist(), strict=True))
        logged["kl_reference_point"] = max(float(kl), 0.0)  # z0
        return loss * world_size(), logged

    def _kto_validation_step(self, batch: dict) -> None:
        """KTO on one validation batch, z0 from the batch itself (on its own rank: evaluation takes
        no collective per batch); rewards_chosen / rewards_rejected are means over the epoch's
        desirable / undesirable rows."""
        labels = batch["label"]
        kl = self._kto_kl(batch, "val")
        loss, m = self._kto_loss(batch, "val", kl)
        self._val.add({"loss": loss, "reward_accuracy": m["reward_accuracy"],
                       "kl_reference_point": kl.clamp(min=0.0)}, labels.shape[0])
        self._val_desirable.add({"rewards_chosen": m["rewards_chosen"]}, int(labels.sum()))
        self._val_undesirable.add({"rewards_rejected": m["rewards_rejected"]}, int((~labels).sum()))

    # --- Lightning hooks --------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = batch["index"].shape[0]
        if self.unpaired:
            loss, logged = self._kto_step(batch)
        else:
            loss, metrics = self._micro_batched(batch, n, lambda part: self._reference(part, "train"))
            loss, loss_mean = global_mean(loss, n)  # the mean over the global batch's pairs
            logged = global_means(self._preference_metrics(loss_mean, metrics), n)
        self._log_preference("train", logged)
        self.budget.count(samples=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val, self._val_desirable, self._val_undesirable = EpochMeans(), EpochMeans(), EpochMeans()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.unpaired:
            self._kto_validation_step(batch)
            return
        loss, metrics = self._dpo_loss(batch, self._reference(batch, "val"))
        self._val.add(self._preference_metrics(loss, metrics), batch["index"].shape[0])

    def on_validation_epoch_end(self) -> None:
        values = self._val.means()
        if self.unpaired:
            values.update({"rewards_chosen": 0.0, **self._val_desirable.means()})
            values.update({"rewards_rejected": 0.0, **self._val_undesirable.means()})
            values["reward_margin"] = values["rewards_chosen"] - values["rewards_rejected"]
        self._log_preference("val", values)

    def configure_optimizers(self):
        c = self.config
        return adamw(self.policy.trainable_parameters(), c.lr, c.weight_decay, c.warmup_steps)

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_data, self.config.batch_size, True, self._collate)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return self.make_loader(self.val_data, self.config.batch_size, False, self._collate)


class OnlineDPO(_PreferenceStep, StepBudget, ResumableStage, ShardableStage, L.LightningModule):
    """Online DPO: each iteration samples two responses per prompt and ranks them with `reward_fn`.

    Pairs whose two responses score the same are skipped (counted in `train/skipped_pairs`).
    """

    config_class = DPOConfig

    def __init__(self, policy: Policy, prompts: list[str],
                 reward_fn: Callable[[list[str], list[str]], torch.Tensor], config: DPOConfig | None = None,
                 gold_fn: Callable[[list[str], list[str]], torch.Tensor] | None = None):
        super().__init__()
        self.config = c = config or DPOConfig()
        if c.reference == "precomputed":
            raise ValueError("reference='precomputed' needs fixed pairs; OnlineDPO samples new ones (use 'copy')")
        if c.variant == UNPAIRED:
            raise ValueError(f"variant '{UNPAIRED}' trains on fixed unpaired rows (the offline DPO stage, `fit kto`); "
                             "OnlineDPO samples pairs: choose a pair loss")
        if c.variant not in REFERENCE_FREE and not policy.has_reference:
            raise ValueError(f"DPO variant '{c.variant}' needs Policy(reference='copy')")
        self.policy = policy.disable_dropout()
        self.prompts, self.reward_fn, self.gold_fn = list(prompts), reward_fn, gold_fn
        self.budget = Budget()
        self.history: list[dict] = []
        self._init_resumable()
        self.save_hyperparameters({"stage": "online_dpo", "algorithm": "online_dpo", **asdict(c)})

    def stage_state(self) -> dict:
        return {**super().stage_state(), "history": list(self.history)}

    def load_stage_state(self, state: dict) -> None:
        super().load_stage_state(state)
        self.history = list(state["history"])

    @torch.no_grad()
    def make_pairs(self, prompts: list[str]) -> tuple[dict | None, dict]:
        """Sample two responses per prompt, score them, and build a chosen/rejected batch."""
        c, policy = self.config, self.policy
        rollout = policy.generate(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                  samples_per_prompt=2)
        n = len(rollout)
        scores = check_scores(self.reward_fn(rollout.prompts, rollout.completions), n, self.reward_fn,
                              rollout.prompts, device=rollout.input_ids.device).view(-1, 2)
        self.budget.count(reward_calls=len(rollout), generated_tokens=int(rollout.response_mask.sum()),
                          samples=len(rollout))
        mask = rollout.response_mask.float()
        stats = {"reward": float(scores.mean()), "response_length": float(mask.sum(1).mean())}
        if policy.has_reference:
            # train/kl as for every algorithm: k1 on the sampled tokens, summed per sequence.
            ref = policy.ref_logprobs(rollout.input_ids, rollout.attention_mask, c.temperature,
                                      start=first_scored_column(mask))
            stats["kl"] = float((kl_k1(rollout.logprobs, ref) * mask).sum(1).mean())
        if self.gold_fn is not None:
            gold = check_scores(self.gold_fn(rollout.prompts, rollout.completions), n, self.gold_fn,
                                rollout.prompts, what="gold reward")
            stats["gold_reward"] = float(gold.mean())
        stats = global_means(stats, n)  # means over every rank's samples
        keep = scores[:, 0] != scores[:, 1]
        self._first_pair = self._pair_batch(rollout, scores, torch.arange(len(keep), device=keep.device) == 0)
        stats["skipped_pairs"] = float((~keep).sum())
        if not keep.any():
            return None, stats
        return self._pair_batch(rollout, scores, keep), stats

    @staticmethod
    def _pair_batch(rollout, scores: torch.Tensor, keep: torch.Tensor) -> dict:
        """The chosen-then-rejected batch of the pairs `keep` selects (the higher score is chosen)."""
        rows = torch.arange(len(keep), device=scores.device)[keep]
        better = scores[keep].argmax(dim=1)  # 0 or 1: which sample of the pair won
        chosen_rows, rejected_rows = rows * 2 + better, rows * 2 + (1 - better)
        order = torch.cat([chosen_rows, rejected_rows])
        batch = {
            "input_ids": rollout.input_ids[order],
            "attention_mask": rollout.attention_mask[order],
            "loss_mask": rollout.response_mask[order],
        }
        return batch

    def training_step(self, prompts: list[str], batch_idx: int) -> torch.Tensor | None:
        batch, stats = self.make_pairs(prompts)
        n_pairs = 0 if batch is None else batch["input_ids"].shape[0] // 2
        # Pairs and tied pairs of every rank; the update is the mean over the global batch's pairs.
        local = torch.tensor([float(n_pairs), stats["skipped_pairs"]], dtype=torch.float64)
        total_pairs, skipped = (int(v) for v in all_sum(local.to(collective_device())).cpu().tolist())
        stats["skipped_pairs"] = float(skipped)
        metrics = {f"train/{k}": v for k, v in stats.items()}
        if total_pairs == 0:
            self._log_sampling(metrics)
            self.history.append({"iteration": len(self.history) + 1, **metrics})
            return None  # nothing to learn from: every pair of every rank tied
        if batch is None:
            # This rank's pairs all tied, another's did not: a zero-weighted pass over its first pair
            # keeps DDP's gradient all-reduce (and a sharded strategy's gathers) in step.
            loss, m = self._micro_batched(self._first_pair, 1, self._online_reference)
            loss, m = loss * 0.0, None
        else:
            loss, m = self._micro_batched(batch, n_pairs, self._online_reference)
        loss, logged = global_mean(loss, n_pairs)
        self._log_preference("train", global_means(self._preference_metrics(logged, m), n_pairs))
        self._log_sampling(metrics)
        self.history.append({"iteration": len(self.history) + 1, **metrics, "train/loss": float(logged)})
        return loss

    def _online_reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.variant in REFERENCE_FREE:
            return None
        ref_logps, _ = sequence_logprobs(self.policy, batch, reference=True)
        return ref_logps.chunk(2)

    def _log_sampling(self, metrics: dict) -> None:
        # The progress bar shows what it shows for the other online algorithms.
        bar = {"train/reward", "train/gold_reward", "train/kl"}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in bar)

    def configure_optimizers(self):
        c = self.config
        return adamw(self.policy.trainable_parameters(), c.lr, c.weight_decay, c.warmup_steps)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        return self.make_loader(self.prompts, c.batch_size, True, list, drop_last=len(self.prompts) >= c.batch_size)
