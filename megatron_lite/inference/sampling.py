"""Sampling rules: greedy, temperature, top-k, top-p and the repetition penalty (HF's CTRL-style rule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_lite.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or output
    greedy: bool = False
    stop: Sequence[str] = ()  # generation ends before the first occurrence of any of these strings
    seed: int | None = None
    stop_at_eos: bool = True

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits -> logits after repetition penalty, temperature, top-k and top-p (-inf = banned)."""
    if seen is not None and p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.is_greedy:
        return logits
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always survives.
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids."""
    if p.is_greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
