"""The learner's networks: policy (a causal LM), value head (on the policy's backbone or on a separate
critic copy), and the frozen reference. Forward passes return per-completion-token tensors.

Sequences are right-padded ``prompt + completion`` rows; ``prompt_lens`` says where each
completion starts, so token ``i`` of completion ``b`` sits at column ``prompt_lens[b] + i`` and is
predicted by the logits at the column before it (no left padding, so position ids stay natural).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flywheel.common.tiny_models import resolve_model
from flywheel.learner.ppo import entropy_from_logits, logprobs_from_logits


@dataclass
class SequenceBatch:
    """Right-padded prompt+completion rows and where the completions sit."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    prompt_lens: torch.Tensor  # (B,)
    completion_ids: torch.Tensor  # (B, T), pad where mask is 0
    mask: torch.Tensor  # (B, T) float, 1 on completion tokens

    def select(self, idx: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids[idx], self.attention_mask[idx], self.prompt_lens[idx],
            self.completion_ids[idx], self.mask[idx],
        )


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> SequenceBatch:
    """Packs token-id lists into a right-padded SequenceBatch (one row per completion)."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    length = max(len(r) for r in rows)
    width = max(1, max(len(c) for c in completions))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for b, (row, comp) in enumerate(zip(rows, completions, strict=True)):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
        completion_ids[b, : len(comp)] = torch.tensor(comp, dtype=torch.long)
        mask[b, : len(comp)] = 1.0
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return SequenceBatch(input_ids, attention_mask, prompt_lens, completion_ids, mask)


def completion_positions(batch: SequenceBatch) -> torch.Tensor:
    """Column of the logits that predicts each completion token: (B, T)."""
    width = batch.completion_ids.shape[1]
    index = batch.prompt_lens[:, None] - 1 + torch.arange(width)[None, :]  # (B, T)
    return index.clamp(max=batch.input_ids.shape[1] - 1)


def _gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D), index (B, T) -> (B, T, D)."""
    return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # (B, T)
    entropy: torch.Tensor  # (B, T)
    values: torch.Tensor | None  # (B, T)


class ActorCritic(nn.Module):
    """Policy LM plus a scalar value head; the head reads the policy's last hidden state when
    ``shared_backbone``, else a separate critic backbone initialised from the same weights."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None, with_value: bool) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        hidden = int(policy.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.value_head = nn.Linear(hidden, 1) if with_value else None
        if self.value_head is not None:
            nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: SequenceBatch, temperature: float = 1.0, with_entropy: bool = True) -> ForwardOut:
        shared = self.value_head is not None and self.critic is None
        out = self.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=shared
        )
        index = completion_positions(batch)  # (B, T)
        logits = _gather_positions(out.logits, index) / temperature  # (B, T, V)
        logprobs = logprobs_from_logits(logits, batch.completion_ids) * batch.mask
        entropy = entropy_from_logits(logits).detach() if with_entropy else torch.zeros_like(logprobs)
        values = None
        if self.value_head is not None:
            if shared:
                hidden = out.hidden_states[-1]  # (B, L, D)
            else:
                assert self.critic is not None
                hidden = self.critic(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).last_hidden_state  # (B, L, D)
            values = self.value_head(_gather_positions(hidden, index)).squeeze(-1) * batch.mask  # (B, T)
        return ForwardOut(logprobs, entropy, values)


@torch.no_grad()
def reference_logprobs(reference: nn.Module, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Log-probs of the completion tokens under the frozen reference: (B, T)."""
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    picked = _gather_positions(logits, completion_positions(batch)) / temperature  # (B, T, V)
    return logprobs_from_logits(picked, batch.completion_ids) * batch.mask


def load_models(
    model: str, shared_backbone: bool, with_value: bool, dtype: torch.dtype = torch.float32
) -> tuple[ActorCritic, nn.Module, object]:
    """Loads (actor-critic, frozen reference, tokenizer) from a hub id, path or tiny://."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    reference.eval().requires_grad_(False)
    critic = None
    if with_value and not shared_backbone:
        critic = copy.deepcopy(policy.base_model)  # the backbone without the LM head
    policy.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Dropout would make the rollout-time and update-time logprobs disagree (Huang et al.).
    for module in (policy, critic):
        if module is not None:
            disable_dropout(module)
    return ActorCritic(policy, critic, with_value), reference, tokenizer


def disable_dropout(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
