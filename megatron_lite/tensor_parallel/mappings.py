"""Autograd functions that move activations into and out of the tensor-parallel region.

Each is a forward/backward pair of conjugate collectives (Megatron-LM, Shoeybi et al. 2019, fig. 3):

    copy_to    fwd: identity          bwd: all-reduce    (input of a column-parallel layer)
    reduce_from fwd: all-reduce       bwd: identity      (output of a row-parallel layer)
    scatter_to fwd: keep my last-dim chunk   bwd: all-gather last dim
    gather_from fwd: all-gather last dim     bwd: keep my last-dim chunk

The group is always an explicit argument. With group None (or a group of one rank) every function is
the identity, so the same layer code runs unchanged in a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone()  # never reduce in place into a tensor autograd may still need
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)  # a view, so autograd gives the output its own grad_fn

    @staticmethod
    def backward(ctx, grad):
        # every rank used x for its own shard of the output: x's gradient is the sum of all of them
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        # the sum's gradient w.r.t. each rank's partial term is the gradient itself
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., H) -> (..., H/tp): this rank's chunk of the last dim; backward all-gathers the gradient."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """(..., H/tp) -> (..., H): concatenate all ranks' last-dim chunks; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)
