"""Learning-rate schedules: linear warmup, then cosine decay to a floor (Megatron's default) or
warmup-stable-decay (WSD: the peak held, then a linear decay to the floor over the last part of the run).

The rate is a pure function of the optimizer-step count, so resuming only needs the step count: the
`LambdaLR` that wraps it is saved in DeepSpeed's checkpoint (`last_epoch`) and restored by `load_checkpoint`.
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Rate for optimizer step `step` (0-based: the first update uses step 0).

    Warmup ramps from max_lr/warmup_iters at step 0 (never 0: a zero first step wastes a batch) to max_lr at
    step warmup_iters-1; cosine then falls from max_lr to min_lr at decay_iters and stays there.
    """
    if warmup_iters > 0 and step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    if step >= decay_iters or decay_iters <= warmup_iters:
        return min_lr
    progress = (step - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_lr_at(step: int, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
              decay_frac: float) -> float:
    """Warmup-stable-decay rate for optimizer step `step` (0-based).

    Warmup as `lr_at`; then max_lr until the last round(decay_frac x decay_iters) steps (never into the
    warmup), over which the rate falls linearly to min_lr, reached at step decay_iters-1 and kept after.
    """
    if warmup_iters > 0 and step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    n_decay = min(round(decay_frac * decay_iters), decay_iters - warmup_iters)
    start = decay_iters - n_decay
    if step < start:
        return max_lr
    if step >= decay_iters - 1 or n_decay <= 1:
        return min_lr
    return max_lr + (min_lr - max_lr) * (step - start + 1) / n_decay


def build_scheduler(optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_iters: int,
                    decay_iters: int, style: str = "cosine",
                    wsd_decay_frac: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_at` or `wsd_lr_at` (each group's base lr is its peak: max_lr, or Muon's muon_lr,
    which follows the same shape).

    The multiplier is a plain function on purpose: LambdaLR then saves only `last_epoch`, so on --load the
    step count comes from the checkpoint while warmup/decay/min-lr come from this run's flags (extending
    --train-iters stretches the cosine, as in Megatron)."""
    def multiplier(step: int) -> float:
        if not max_lr:
            return 0.0
        if style == "wsd":
            return wsd_lr_at(step, max_lr, min_lr, warmup_iters, decay_iters, wsd_decay_frac) / max_lr
        return lr_at(step, max_lr, min_lr, warmup_iters, decay_iters) / max_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
