"""Tensor-parallel Linear and Embedding layers (Megatron-LM's column/row/vocab split).

    ColumnParallelLinear  y = x A^T + b, A's rows (output features) split: rank r computes y[..., r-th chunk]
    RowParallelLinear     y = x A^T + b, A's columns (input features) split: rank r computes a partial sum
    VocabParallelEmbedding  the vocabulary split: rank r looks up the ids it owns, the rest contribute 0

A column layer followed by a row layer (attention qkv -> o, FFN up -> down) needs one all-reduce in the
forward and one in the backward, and nothing in between.

Initialisation does not depend on tp: each layer draws the *full* master weight from the (seeded) torch RNG
and keeps its shard, so every tp rank consumes the RNG identically and the same seed gives the same full
model for any tp. With group None the layers are nn.Linear / nn.Embedding: same parameter names and shapes,
same default initialisation draw for draw, same forward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.tensor_parallel.mappings import (copy_to_tensor_parallel_region,
                                                    gather_from_tensor_parallel_region,
                                                    group_rank, group_size,
                                                    reduce_from_tensor_parallel_region,
                                                    scatter_to_tensor_parallel_region)
from megatron_lite.tensor_parallel.reshard import ShardSpec, shard_tensor

InitMethod = Callable[[torch.Tensor], object]  # fills a full master tensor in place


def _linear_weight_init(w: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear.reset_parameters


def _divisible(n: int, tp: int, what: str) -> None:
    if n % tp:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {tp}")


def _tag(p: nn.Parameter, spec: Optional[ShardSpec]) -> nn.Parameter:
    # `tensor_model_parallel` is what DeepSpeed's grad-norm code checks (a sharded parameter's norm is
    # summed over the tp group; a replicated one is counted on tp rank 0 only). `tp_spec` is ours (reshard).
    p.tp_spec = spec
    p.tensor_model_parallel = spec is not None
    return p


class _ParallelLinear(nn.Module):
    """Shared parameter handling for the column and row layers; subclasses define the split."""
    split_dim: int  # dim of the (out, in) weight that is sharded

    def __init__(self, in_features: int, out_features: int, bias: bool, group, init_method: Optional[InitMethod],
                 sections: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.tp_size, self.tp_rank = group, group_size(group), group_rank(group)
        self.init_method = init_method
        self.spec = ShardSpec(self.split_dim, tuple(sections) if sections else None)
        for s in (self.spec.sections or ((out_features, in_features)[self.split_dim],)):
            _divisible(s, self.tp_size, "output features" if self.split_dim == 0 else "input features")
        shape = [out_features, in_features]
        shape[self.split_dim] //= self.tp_size
        self.weight = _tag(nn.Parameter(torch.empty(shape, dtype=dtype)), self.spec)
        if bias:
            # a column layer's bias is split with its output; a row layer's is added after the reduce
            bias_spec = self.spec if self.split_dim == 0 else None
            n = out_features // self.tp_size if bias_spec else out_features
            self.bias = _tag(nn.Parameter(torch.empty(n, dtype=dtype)), bias_spec)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, init_method: Optional[InitMethod] = None) -> None:
        """Redraw the full master weight (and bias) from the torch RNG and keep this rank's shard.

        `init_method` (default: the one given at construction) fills the full (out, in) weight in place;
        without one the weight and bias get nn.Linear's initialisation. With an init_method the bias is
        zero (GPT/Megatron convention)."""
        init_method = init_method or self.init_method
        master = torch.empty(self.out_features, self.in_features, dtype=torch.float32,
                             device=self.weight.device)
        (init_method or _linear_weight_init)(master)
        self.weight.copy_(shard_tensor(master, self.spec, self.tp_rank, self.tp_size))
        if self.bias is None:
            return
        master_b = torch.zeros(self.out_features, dtype=torch.float32, device=self.bias.device)
        if init_method is None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(master_b, -bound, bound)
        if self.bias.tp_spec is not None:
            master_b = shard_tensor(master_b, ShardSpec(0, self.spec.sections), self.tp_rank, self.tp_size)
        self.bias.copy_(master_b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_size}")


class ColumnParallelLinear(_ParallelLinear):
    """Linear layer with the output features split across the tp group.

    x (..., in) full on every rank -> y (..., out/tp) this rank's chunk, or (..., out) if gather_output.
    `sections` (full sizes, summing to out_features) marks a fused weight such as q|k|v: each block is
    split on its own so rank r owns [q_r; k_r; v_r]; its local output is then (..., sum(sections)/tp) in
    that order. gather_output is not allowed with sections (the gathered order would be interleaved).
    """
    split_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 group=None, init_method: Optional[InitMethod] = None,
                 sections: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None):
        if sections and gather_output and group_size(group) > 1:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be used with fused sections")
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, group, init_method, sections, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)  # backward: sum of all ranks' dL/dx
        y = F.linear(x, self.weight, self.bias)            # (..., out/tp)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Linear layer with the input features split across the tp group.

    x (..., in/tp) if input_is_parallel (e.g. straight from a ColumnParallelLinear) else (..., in), which
    is then split -> y (..., out) full on every rank after one all-reduce.
    """
    split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 group=None, init_method: Optional[InitMethod] = None, dtype: Optional[torch.dtype] = None):
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, group, init_method, None, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)      # (..., in/tp)
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)  # (..., out)
        # the bias is added once, after the sum, not tp times inside it
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding with the vocabulary split into contiguous ranges across the tp group.

    ids (...) full on every rank -> (..., dim) full on every rank. `weight` is (vocab/tp, dim); a tied
    output head multiplies by it to get vocab-parallel logits (..., vocab/tp) for vocab_parallel_cross_entropy.
    It is an nn.Embedding (num_embeddings is the full vocabulary) so code that treats embeddings specially —
    no weight decay, for one — treats the sharded one the same way.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None,
                 init_method: Optional[InitMethod] = None, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate and draw the full table
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0  # nn.Embedding's defaults
        self.scale_grad_by_freq, self.sparse = False, False
        self.group, self.tp_size, self.tp_rank = group, group_size(group), group_rank(group)
        _divisible(num_embeddings, self.tp_size, "vocab size (pad it to a multiple of tp)")
        self.per_rank = num_embeddings // self.tp_size
        self.vocab_start = self.tp_rank * self.per_rank  # this rank owns ids [start, start + per_rank)
        self.init_method = init_method
        self.weight = _tag(nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype)), ShardSpec(0))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, init_method: Optional[InitMethod] = None) -> None:
        """Redraw the full (vocab, dim) master from the torch RNG (default N(0, 1) as nn.Embedding), keep
        this rank's rows."""
        master = torch.empty(self.num_embeddings, self.embedding_dim, dtype=torch.float32,
                             device=self.weight.device)
        (init_method or self.init_method or nn.init.normal_)(master)
        self.weight.copy_(shard_tensor(master, ShardSpec(0), self.tp_rank, self.tp_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.per_rank)         # ids another rank owns
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)  # (..., dim)
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)        # exactly one rank contributes each row
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}"


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """Tied output head: hidden (..., dim) full -> vocab-parallel logits (..., vocab/tp) with this rank's
    embedding rows `weight` (vocab/tp, dim). Never materialises the full logits; feed them to
    vocab_parallel_cross_entropy (training) or gather_from_tensor_parallel_region (sampling)."""
    return F.linear(copy_to_tensor_parallel_region(hidden, group), weight)


# ---------------------------------------------------------------- factories the model builds its layers with
# With no group they return the exact torch.nn layer the single-device model always had (same class, same
# construction, same RNG draws); the parameters only gain a `tp_spec` attribute, which does not touch the
# state dict, so `tp_shard_specs(model)` can describe the checkpoint of a tp=1 model too.

def column_linear(in_features: int, out_features: int, bias: bool, group=None) -> nn.Module:
    """nn.Linear, or a ColumnParallelLinear that leaves its output split (..., out/tp)."""
    if group_size(group) > 1:
        return ColumnParallelLinear(in_features, out_features, bias, gather_output=False, group=group)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.tp_spec = ShardSpec(0)
    if bias:
        layer.bias.tp_spec = ShardSpec(0)
    return layer


def row_linear(in_features: int, out_features: int, bias: bool, group=None) -> nn.Module:
    """nn.Linear, or a RowParallelLinear taking the split output of a column layer (..., in/tp)."""
    if group_size(group) > 1:
        return RowParallelLinear(in_features, out_features, bias, input_is_parallel=True, group=group)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight.tp_spec = ShardSpec(1)
    return layer


def vocab_embedding(num_embeddings: int, embedding_dim: int, group=None) -> nn.Module:
    """nn.Embedding, or a VocabParallelEmbedding."""
    if group_size(group) > 1:
        return VocabParallelEmbedding(num_embeddings, embedding_dim, group=group)
    layer = nn.Embedding(num_embeddings, embedding_dim)
    layer.weight.tp_spec = ShardSpec(0)
    return layer


TENSOR_PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
