"""The Policy: the one door to a model, shared by every stage.

It wraps any Hugging Face causal LM and its tokenizer, with an optional scalar head (a PPO
critic's value head, or a reward model's score head) and an optional frozen reference copy.
Stages never call the model themselves; the Policy never knows which algorithm uses it.

Alignment convention (see `rlhf_lab.rollout`): per-token outputs are `(B, T)` over the whole
sequence and column t refers to token t — `logprobs[:, t] = log π(x_t | x_<t)` and
`values[:, t] = V(x_<t)`, the value of the state in which x_t was chosen. Column 0 has no
context and is 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lab.models.tokenizer import load_tokenizer
from rlhf_lab.rollout import Rollout

HEAD_FILE = "scalar_head.safetensors"
POLICY_FILE = "rlhf_lab_policy.json"
CRITIC_DIR = "critic"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens with mass ≥ top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Policy(nn.Module):
    """A causal LM with generation, log-probs, values and a reference, behind one interface.

    Args:
        model: any Hugging Face causal LM (`AutoModelForCausalLM`).
        tokenizer: its tokenizer; a missing pad token is set to EOS.
        scalar_head: add a linear head on the last hidden state, read per token by `values`
            (PPO's critic) or at the last real token by `scores` (a reward model).
        reference: "copy" keeps a frozen copy of the initial weights for `ref_logprobs`;
            None keeps no reference.
        critic: a separate value model (a `Policy` with a scalar head, e.g. loaded from a reward
            model as in Ouyang et al. 2022) used by `values` instead of a head on this model.
            It must share the tokenizer. Its gradients then never reach the policy's weights.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scalar_head: bool = False,
        reference: str | None = None,
        critic: Policy | None = None,
    ):
        super().__init__()
        if reference not in (None, "copy"):
            raise ValueError(f"reference must be None or 'copy', got {reference!r}")
        if critic is not None:
            critic._require_head("values")
            if critic.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError("critic must use the same tokenizer (vocabulary) as the policy")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        hidden = model.config.get_text_config().hidden_size
        self.scalar_head = nn.Linear(hidden, 1) if scalar_head else None
        if self.scalar_head is not None:
            # A small init keeps the first values/scores near 0, so early updates are sane.
            nn.init.normal_(self.scalar_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.scalar_head.bias)
        self.reference: PreTrainedModel | None = None
        if reference == "copy":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.critic = critic

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def load(cls, path: str, scalar_head: bool | None = None, reference: str | None = None,
             critic: Policy | None = None) -> Policy:
        """Load a folder written by `save` (or any HF causal-LM folder with a tokenizer).

        `scalar_head=None` restores a head exactly when the folder has one; True adds a fresh
        head when it has none (e.g. a reward model started from an SFT policy). A saved separate
        critic (`critic/` inside the folder) is restored unless `critic` is given.
        """
        if not os.path.isdir(path):
            raise OSError(f"policy folder '{path}' does not exist")
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = load_tokenizer(path)
        head_path = os.path.join(path, HEAD_FILE)
        has_head = os.path.exists(head_path)
        critic_path = os.path.join(path, CRITIC_DIR)
        if critic is None and os.path.isdir(critic_path):
            critic = cls.load(critic_path)
        policy = cls(model, tokenizer, scalar_head=has_head if scalar_head is None else scalar_head,
                     reference=reference, critic=critic)
        if has_head and policy.scalar_head is not None:
            policy.scalar_head.load_state_dict(load_file(head_path))
        return policy

    def save(self, path: str, extra: dict | None = None) -> None:
        """Write an HF folder: model, tokenizer, the scalar head if any, and `extra` metadata."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.scalar_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.scalar_head.state_dict().items()}
            save_file(state, os.path.join(path, HEAD_FILE))
        if self.critic is not None:
            self.critic.save(os.path.join(path, CRITIC_DIR), extra={"role": "critic"})
        meta = {"scalar_head": self.scalar_head is not None, "critic": self.critic is not None, **(extra or {})}
        with open(os.path.join(path, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2, default=str)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def disable_dropout(self) -> Policy:
        """Zero every dropout rate, so sampling and the update see the same distribution."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return self

    @contextlib.contextmanager
    def eager_attention(self):
        """Use plain-matmul attention inside the block.

        Fused SDPA kernels have no double backward on CPU, which TRPO's Fisher-vector product
        needs; eager attention computes the same function with ordinary differentiable ops.
        """
        model = self.model
        previous = getattr(model.config, "_attn_implementation", None)
        if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
            yield
            return
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text helpers
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask, so every prompt ends at the same column."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode_responses(self, rollout_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Decode each row's response tokens, dropping special tokens (EOS, padding)."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(rollout_ids, response_mask, strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ------------------------------------------------------------------ forward passes
    def _forward(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 hidden: bool = False):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=hidden,
            use_cache=False,
        )

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                        with_entropy: bool):
        logits = logits[:, :-1].float() / temperature  # (B, T-1, V) predicts tokens 1..T-1
        logp_all = logits.log_softmax(dim=-1)
        logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        logp = nn.functional.pad(logp, (1, 0))  # column 0 has no context
        if not with_entropy:
            return logp, None
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        return logp, nn.functional.pad(entropy, (1, 0))

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 temperature: float = 1.0, return_entropy: bool = False):
        """Teacher-forced log-prob of each token given the ones before it.

        Shape: input (B, T) → (B, T), column 0 is 0. With `return_entropy` also returns the
        entropy (nats) of the next-token distribution each token was drawn from, (B, T).
        """
        out = self._forward(self.model, input_ids, attention_mask)
        logp, entropy = self._token_logprobs(out.logits, input_ids, temperature, return_entropy)
        return (logp, entropy) if return_entropy else logp

    def logprobs_and_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            temperature: float = 1.0):
        """`(logprobs, entropy, values)`: what a PPO update needs (one pass without a separate critic)."""
        if self.critic is not None:
            logp, entropy = self.logprobs(input_ids, attention_mask, temperature, return_entropy=True)
            return logp, entropy, self.critic.values(input_ids, attention_mask)
        self._require_head("logprobs_and_values")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        logp, entropy = self._token_logprobs(out.logits, input_ids, temperature, True)
        return logp, entropy, self._values_from_hidden(out.hidden_states[-1])

    @torch.no_grad()
    def ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
        """`logprobs` under the frozen reference policy. Shape: (B, T)."""
        if self.reference is None:
            raise ValueError("this Policy has no reference (construct it with reference='copy')")
        out = self._forward(self.reference, input_ids, attention_mask)
        return self._token_logprobs(out.logits, input_ids, temperature, False)[0]

    @property
    def has_values(self) -> bool:
        """Whether `values` works: a separate critic or a scalar head on this model."""
        return self.critic is not None or self.scalar_head is not None

    def _require_head(self, what: str) -> None:
        if what == "values" and self.critic is not None:
            return
        if self.scalar_head is None:
            raise ValueError(f"Policy.{what} needs a scalar head (construct with scalar_head=True)")

    def _values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        v = self.scalar_head(hidden[:, :-1].to(self.scalar_head.weight.dtype)).squeeze(-1)
        return nn.functional.pad(v.float(), (1, 0))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values `values[:, t] = V(x_<t)`, from the critic or the head. Shape: (B, T)."""
        if self.critic is not None:
            return self.critic.values(input_ids, attention_mask)
        self._require_head("values")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        return self._values_from_hidden(out.hidden_states[-1])

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence: the head read at the last real (non-pad) token. Shape: (B,)."""
        self._require_head("scores")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        hidden = out.hidden_states[-1]  # (B, T, H)
        t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * t).argmax(dim=1)  # index of the last 1 in each row
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.scalar_head(picked.to(self.scalar_head.weight.dtype)).squeeze(-1).float()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        samples_per_prompt: int = 1,
        suppress_eos: bool = False,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample responses for a batch of prompts, with a KV cache, stopping at EOS.

        Prompts are left-padded so every row's next token sits in the same column; each step feeds
        one token per row and reuses the cache, so a response of n tokens costs one prompt pass
        and n single-token passes. Each prompt is repeated `samples_per_prompt` times in adjacent
        rows (`group_ids` names the prompt). The recorded `logprobs` are those of the
        temperature-scaled full distribution (before top-p truncation and EOS suppression), so
        they equal `logprobs(..., temperature)` recomputed on the returned sequences.
        `suppress_eos` forbids EOS (fixed-length responses, as in the benchmark).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, max_new_tokens, temperature if not greedy else 1.0,
                                  top_p, greedy, samples_per_prompt, suppress_eos, generator)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, max_new_tokens, temperature, top_p, greedy, samples_per_prompt,
                  suppress_eos, generator) -> Rollout:
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        if samples_per_prompt > 1:
            prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
        b = prompt_ids.shape[0]
        device = prompt_ids.device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, alive = [], [], []
        mask = prompt_mask
        positions = position_ids_from_mask(prompt_mask)
        step_ids, step_pos, cache = prompt_ids, positions, None
        for _ in range(max_new_tokens):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float() / temperature  # (B, V)
            logp_all = logits.log_softmax(dim=-1)
            sample_logits = logits
            if suppress_eos:
                sample_logits = sample_logits.clone()
                sample_logits[:, eos] = float("-inf")
            if greedy:
                token = sample_logits.argmax(dim=-1)
            else:
                if top_p < 1.0:
                    sample_logits = _top_p_filter(sample_logits, top_p)
                probs = sample_logits.softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            live = ~finished
            token = torch.where(live, token, torch.full_like(token, pad))
            logp = logp_all.gather(-1, token[:, None]).squeeze(-1) * live
            tokens.append(token)
            logps.append(logp)
            alive.append(live)
            finished = finished | (live & (token == eos))
            # The next step attends to this token only if it is part of a live response.
            mask = torch.cat([mask, live.long()[:, None]], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]
            if bool(finished.all()):
                break
        response_ids = torch.stack(tokens, dim=1)  # (B, N)
        response_mask = torch.stack(alive, dim=1).long()
        n_prompt = prompt_ids.shape[1]
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
        logprobs = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.float),
                              torch.stack(logps, dim=1)], dim=1)
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        return Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=full_response_mask,
            logprobs=logprobs,
            prompt_length=n_prompt,
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
            ended_with_eos=finished,
            prompts=repeated,
            completions=self.decode_responses(response_ids, response_mask),
        )
