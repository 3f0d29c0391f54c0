"""Cross entropy over logits whose vocabulary dim is split across the tensor-parallel group.

Each rank holds logits (..., V/tp) for its vocabulary range. The loss needs only three all-reduces of
per-token scalars — the max (for a stable softmax), the sum of exps and the target's logit (owned by
exactly one rank) — so the full (tokens, V) logits never exist anywhere. The backward is the closed form
softmax - onehot, computed locally on each rank's slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.config import IGNORE_INDEX
from megatron_lite.tensor_parallel.mappings import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        # logits (N, V/tp) fp32, target (N,) global ids -> per-token loss (N,), 0 where ignored
        per_rank = logits.shape[-1]
        start = group_rank(group) * per_rank
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_t = target - start
        foreign = (local_t < 0) | (local_t >= per_rank)  # also true for ignore_index (< 0)
        local_t = local_t.masked_fill(foreign, 0)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target_logit = shifted[rows, local_t].masked_fill(foreign, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse the exp buffer for the backward
        ctx.save_for_backward(softmax, local_t, foreign, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, foreign, ignored = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == target_i]; zero for ignored tokens
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= (~foreign).to(grad.dtype)
        grad.mul_((grad_loss * ~ignored).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy for vocab-parallel logits.

    logits (..., V/tp) this rank's vocabulary slice; target (...) global token ids, `ignore_index` skipped.
    reduction "mean" averages over non-ignored tokens (NaN if there are none, like F.cross_entropy),
    "sum" sums them, "none" returns (...) with 0 at ignored positions. Computed in fp32.
    With group None / size 1 this is exactly F.cross_entropy.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if group_size(group) == 1:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction).reshape(
                                   target.shape if reduction == "none" else ())
    loss = _VocabParallelCrossEntropy.apply(logits.float().reshape(-1, logits.shape[-1]),
                                            target.reshape(-1), group, ignore_index)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
