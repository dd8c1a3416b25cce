"""Rollouts and the rollout buffer shared by every online algorithm.

A `Rollout` is one batch of sampled sequences. Every tensor field is `(B, T)` over the full
sequence (left-padded prompt, then response, then right padding), so per-token quantities line up
with `input_ids` column by column: `logprobs[:, t]` is log π(input_ids[:, t] | input_ids[:, :t]),
and `values[:, t]` is the critic's value of the state in which token t was chosen.
Per-sequence fields (`scores`, `group_ids`) are `(B,)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from rlhf_lab.losses import BASELINES, gae, masked_whiten, returns_to_go

# Fields indexed along the batch dimension when a rollout is sliced or concatenated.
_TOKEN_FIELDS = (
    "input_ids",
    "attention_mask",
    "response_mask",
    "logprobs",
    "ref_logprobs",
    "values",
    "rewards",
    "advantages",
    "returns",
    "train_logprobs",
    "is_weights",
)
_SEQ_FIELDS = ("scores", "gold_scores", "group_ids", "ended_with_eos")
_TEXT_FIELDS = ("prompts", "completions")


@dataclass
class Rollout:
    """A typed batch of sampled sequences (see the module docstring for alignment).

    Shape: token fields `(B, T)`; `scores`, `gold_scores`, `group_ids`, `ended_with_eos` `(B,)`.
    Optional fields are None until the stage that fills them runs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    gold_scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    ended_with_eos: torch.Tensor | None = None
    # The trainer's log-probs of the sampled tokens before the update, and the importance weights
    # π_train / π_sample they give (set by a rollout correction; see `OnlineRLConfig.rollout_correction`).
    train_logprobs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """Number of generated tokens per sequence (EOS included). Shape: (B,)."""
        return self.response_mask.sum(dim=1)

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape != (b, t):
                raise ValueError(f"Rollout.{name} has shape {tuple(value.shape)}, expected {(b, t)}")
        for name in _SEQ_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape != (b,):
                raise ValueError(f"Rollout.{name} has shape {tuple(value.shape)}, expected {(b,)}")

    def index(self, idx: torch.Tensor) -> Rollout:
        """The rollout restricted to rows `idx` (a 1-D index tensor)."""
        kwargs = {"prompt_length": self.prompt_length}
        for name in _TOKEN_FIELDS + _SEQ_FIELDS:
            value = getattr(self, name)
            kwargs[name] = None if value is None else value[idx]
        rows = idx.tolist()
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            kwargs[name] = [value[i] for i in rows] if value else []
        return Rollout(**kwargs)

    def to(self, device: torch.device | str) -> Rollout:
        return dataclasses.replace(
            self,
            **{
                name: getattr(self, name).to(device)
                for name in _TOKEN_FIELDS + _SEQ_FIELDS
                if getattr(self, name) is not None
            },
        )

    @staticmethod
    def concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
        """Stack rollouts along the batch, right-padding shorter ones in time.

        Prompts of different rollouts may have been left-padded to different widths; that is kept
        as is (each row carries its own masks), so only the right side is padded here. Group ids
        are renumbered so that groups of different rollouts stay apart (the first rollout's ids are
        kept, later ones are shifted past them; within a rollout, rows share an id as before).
        """
        if not rollouts:
            raise ValueError("Rollout.concat needs at least one rollout")
        width = max(r.input_ids.shape[1] for r in rollouts)
        kwargs: dict = {"prompt_length": max(r.prompt_length for r in rollouts)}
        for name in _TOKEN_FIELDS:
            parts = [getattr(r, name) for r in rollouts]
            if any(p is None for p in parts):
                kwargs[name] = None
                continue
            fill = pad_token_id if name == "input_ids" else 0
            kwargs[name] = torch.cat(
                [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
            )
        for name in _SEQ_FIELDS:
            parts = [getattr(r, name) for r in rollouts]
            kwargs[name] = None if any(p is None for p in parts) else torch.cat(parts)
        if kwargs["group_ids"] is not None:
            # Group ids are local to a rollout (Policy.generate numbers its prompts from 0), so
            # each part's ids are shifted past the previous parts' and groups never merge.
            shifted, offset = [], None
            for r in rollouts:
                ids = r.group_ids
                if offset is not None and ids.numel():
                    ids = ids - ids.min() + offset
                if ids.numel():
                    offset = int(ids.max()) + 1
                shifted.append(ids)
            kwargs["group_ids"] = torch.cat(shifted)
        for name in _TEXT_FIELDS:
            kwargs[name] = [x for r in rollouts for x in getattr(r, name)]
        return Rollout(**kwargs)

    def save(self, path: str) -> None:
        """Write the rollout to one file (torch.save of plain tensors and lists)."""
        data = {name: getattr(self, name) for name in _TOKEN_FIELDS + _SEQ_FIELDS + _TEXT_FIELDS}
        data["prompt_length"] = self.prompt_length
        torch.save(data, path)

    @staticmethod
    def load(path: str) -> Rollout:
        return Rollout(**torch.load(path, map_location="cpu", weights_only=False))


ADVANTAGE_ESTIMATORS = ("gae", *BASELINES)


class RolloutBuffer:
    """Collects rollouts, computes advantages, and serves shuffled minibatches for K epochs.

    Every online algorithm fills and reads this one buffer, so a stored buffer can be replayed
    through a different loss for controlled ablations.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self._parts: list[Rollout] = []
        self._data: Rollout | None = None

    def add(self, rollout: Rollout) -> None:
        self._parts.append(rollout)
        self._data = None

    def clear(self) -> None:
        self._parts.clear()
        self._data = None

    @property
    def data(self) -> Rollout:
        if self._data is None:
            if not self._parts:
                raise ValueError("RolloutBuffer is empty: call add() first")
            self._data = Rollout.concat(self._parts, self.pad_token_id)
            self._parts = [self._data]
        return self._data

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def compute_advantages(
        self,
        estimator: str = "gae",
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten: bool = True,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        returns: str = "sequence",
    ) -> Rollout:
        """Fill `advantages` and `returns` of the buffered rollout.

        `estimator="gae"` uses per-token `rewards` and the critic's `values` (`gamma`, `lam`); the
        REINFORCE baselines (`none`, `batch_mean`, `leave_one_out`, `group_norm`) use the
        per-sequence `rewards` summed over the response, grouped by the rollout's `group_ids`
        (rows with one id are the samples of one prompt, wherever they sit in the batch), and
        broadcast to every response token.

        `returns="to_go"` (REINFORCE++, Hu et al. 2025) gives each token its own return instead:
        A_t = G_t − b_i, with G_t the return-to-go of the per-token rewards (`losses.returns_to_go`,
        `gamma`) and b_i the baseline the estimator subtracts from row i's sequence return
        (0 for `none`, the group mean for `group_mean`: REINFORCE++-baseline); `returns` then
        holds G_t. It needs an estimator that subtracts a baseline (not `gae` or `group_norm`).

        `reduce`: when this buffer holds one process's part of a batch spread over several (the
        groups of a prompt always on one process), a function summing a tensor over the
        processes; the `batch_mean` baseline and the whitening then use the whole batch's
        statistics. The group baselines and GAE are per group or per row already.
        """
        data = self.data
        if data.rewards is None:
            raise ValueError("RolloutBuffer.compute_advantages: rollout.rewards is not set")
        mask = data.response_mask.float()
        if estimator == "gae":
            if data.values is None:
                raise ValueError("estimator 'gae' needs rollout.values (a critic)")
            advantages, returns_ = gae(data.rewards, data.values, mask, gamma=gamma, lam=lam)
        elif estimator in BASELINES:
            if data.group_ids is None:
                raise ValueError(f"estimator '{estimator}' needs rollout.group_ids (Policy.generate sets them)")
            seq_return = (data.rewards * mask).sum(dim=1)
            seq_adv = BASELINES[estimator](seq_return, data.group_ids)
            if estimator == "batch_mean" and reduce is not None:  # the global batch's mean
                count = reduce(torch.tensor(float(len(seq_return)), dtype=seq_return.dtype, device=mask.device))
                seq_adv = seq_return - reduce(seq_return.sum()) / count
            if returns == "to_go":
                if estimator == "group_norm":
                    raise ValueError("returns='to_go' subtracts a baseline; 'group_norm' also divides by the std")
                to_go = returns_to_go(data.rewards, mask, gamma=gamma)
                baseline = seq_return - seq_adv  # what the estimator subtracted from each row
                advantages = (to_go - baseline[:, None]) * mask
                returns_ = to_go
            elif returns == "sequence":
                advantages = seq_adv[:, None] * mask
                returns_ = seq_return[:, None] * mask
            else:
                raise ValueError(f"returns must be 'sequence' or 'to_go', got {returns!r}")
        else:
            raise ValueError(
                f"unknown advantage estimator '{estimator}'; choose from: "
                + ", ".join(ADVANTAGE_ESTIMATORS)
            )
        if whiten:
            advantages = masked_whiten(advantages, mask, shift_mean=True, reduce=reduce)
        data.advantages = advantages
        data.returns = returns_
        return data

    def minibatches(
        self, num_minibatches: int, epochs: int = 1, generator: torch.Generator | None = None, *,
        offset: int = 0, total: int | None = None, permutation: Callable[[int], torch.Tensor] | None = None,
    ) -> Iterator[Rollout]:
        """Yield `epochs` passes over the buffer, each a fresh shuffle split into minibatches.

        Every sample appears exactly once per epoch; minibatch sizes differ by at most one.

        Spread over processes: this buffer holds rows `[offset, offset + len)` of a batch of
        `total` rows. Each pass then shuffles the whole batch with `permutation(total)` (the same
        on every process), splits it into minibatches, and yields this process's rows of each
        (possibly none); the union over processes is the minibatch a one-process run with the
        same permutation takes.
        """
        data = self.data
        n = len(data)
        total = n if total is None else total
        if not 1 <= num_minibatches <= total:
            raise ValueError(f"num_minibatches must be in [1, {total}] for a buffer of {total}, got {num_minibatches}")
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator) if permutation is None else permutation(total)
            for chunk in torch.tensor_split(order, num_minibatches):
                if total != n:
                    chunk = chunk[(chunk >= offset) & (chunk < offset + n)] - offset
                yield data.index(chunk.to(data.input_ids.device))

    def save(self, path: str) -> None:
        self.data.save(path)

    @classmethod
    def load(cls, path: str, pad_token_id: int) -> RolloutBuffer:
        buffer = cls(pad_token_id)
        buffer.add(Rollout.load(path))
        return buffer
