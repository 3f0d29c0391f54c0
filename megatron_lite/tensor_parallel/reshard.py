"""Split full tensors into tensor-parallel shards and put them back together.

The layers use `shard_tensor` to keep their slice of a full master weight (so initialisation does not
depend on tp); checkpoint and HF-conversion code use the state-dict functions to go from a tp-sharded
checkpoint to a full one and back, i.e. to load a tp=2 checkpoint at tp=1 (or any other tp).

How a parameter is split is a `ShardSpec`:
  dim       0 for column-parallel weights/biases and vocab-parallel embeddings, 1 for row-parallel weights.
  sections  for *fused* column weights (e.g. q|k|v stacked along dim 0) the full sizes of the blocks:
            each block is split across ranks on its own, so rank r holds [q_r; k_r; v_r], not a slice that
            straddles q and k. None means one block.

Every tensor-parallel layer tags its sharded parameters with `param.tp_spec`; `tp_shard_specs(model)`
collects them by state-dict key. Parameters without a spec (norms, row-parallel biases, experts) are
replicated across the tp group and are copied through unchanged.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


class ShardSpec(NamedTuple):
    dim: int
    sections: Optional[Tuple[int, ...]] = None


def _full_sections(full_len: int, spec: ShardSpec) -> Tuple[int, ...]:
    sections = spec.sections or (full_len,)
    if sum(sections) != full_len:
        raise ValueError(f"sections {sections} do not add up to the dim size {full_len}")
    return tuple(sections)


def shard_tensor(full: torch.Tensor, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of a full tensor (a new contiguous tensor)."""
    if tp_size == 1:
        return full.clone()
    sections = _full_sections(full.shape[spec.dim], spec)
    pieces = []
    for block in torch.split(full, list(sections), dim=spec.dim):
        if block.shape[spec.dim] % tp_size:
            raise ValueError(f"size {block.shape[spec.dim]} on dim {spec.dim} is not divisible by "
                             f"tp={tp_size}")
        pieces.append(block.chunk(tp_size, dim=spec.dim)[tp_rank])
    return torch.cat(pieces, dim=spec.dim).contiguous()


def gather_tensor(shards: Sequence[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of `shard_tensor`: `shards[r]` is rank r's shard."""
    tp_size = len(shards)
    if tp_size == 1:
        return shards[0].clone()
    local_len = shards[0].shape[spec.dim]
    sections = _full_sections(local_len * tp_size, spec)
    local_sections = [s // tp_size for s in sections]
    per_rank = [torch.split(s, local_sections, dim=spec.dim) for s in shards]
    blocks = [torch.cat([parts[b] for parts in per_rank], dim=spec.dim) for b in range(len(sections))]
    return torch.cat(blocks, dim=spec.dim)


def tp_shard_specs(model: nn.Module) -> Dict[str, ShardSpec]:
    """State-dict key -> ShardSpec for every tensor-parallel parameter of `model`.

    The keys and specs are the same whatever tp the model was built with, so a tp=1 model can describe
    how to shard its own checkpoint. Tied parameters appear under every name they have in the state dict.
    DeepSpeed-MoE expert parameters (`allreduce = False`) are split by expert parallelism, never by tp,
    even though the expert FFN is built by the same layer factories.
    """
    return {name: p.tp_spec for name, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "tp_spec", None) is not None and getattr(p, "allreduce", True)}


def shard_state_dict(full: Dict[str, torch.Tensor], specs: Dict[str, ShardSpec],
                     tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """Full (tp=1) state dict -> the state dict of tp rank `tp_rank` out of `tp_size`."""
    return {k: shard_tensor(v, specs[k], tp_rank, tp_size) if k in specs else v for k, v in full.items()}


def gather_state_dicts(shards: Sequence[Dict[str, torch.Tensor]],
                       specs: Dict[str, ShardSpec]) -> Dict[str, torch.Tensor]:
    """Offline: the state dicts of tp ranks 0..tp-1 -> one full (tp=1) state dict.
    Replicated entries are taken from rank 0."""
    return {k: gather_tensor([sd[k] for sd in shards], specs[k]) if k in specs else v
            for k, v in shards[0].items()}


def gather_state_dict(local: Dict[str, torch.Tensor], specs: Dict[str, ShardSpec],
                      group) -> Dict[str, torch.Tensor]:
    """Online (collective over the tp group): this rank's state dict -> the full state dict, on every
    rank of the group. With group None it returns `local` unchanged."""
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1:
        return dict(local)
    out = {}
    for k, v in local.items():
        if k not in specs:
            out[k] = v
            continue
        v = v.detach().contiguous()
        parts: List[torch.Tensor] = [torch.empty_like(v) for _ in range(n)]
        dist.all_gather(parts, v, group=group)
        out[k] = gather_tensor(parts, specs[k])
    return out


def reshard_state_dicts(shards: Sequence[Dict[str, torch.Tensor]], specs: Dict[str, ShardSpec],
                        new_tp: int) -> List[Dict[str, torch.Tensor]]:
    """State dicts saved at one tp -> the state dicts for `new_tp` ranks."""
    full = gather_state_dicts(shards, specs)
    return [shard_state_dict(full, specs, r, new_tp) for r in range(new_tp)]
