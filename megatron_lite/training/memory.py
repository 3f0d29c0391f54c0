"""Pre-flight: does this run's model state fit in memory? Checked before anything is allocated, so a run that
cannot fit stops with one line instead of an OOM kill in its first step (or its first save).

The estimate is a lower bound: the weights and gradients a rank holds, and its ZeRO partition of the fp32
master weights and optimizer moments. Activations, temporaries and the runtime itself come on top and are
left out (they depend on the batch, `--checkpoint-activations` and the allocator), so a refusal is never a
false alarm: whatever is refused here cannot run on this machine.

    per rank, L = weights on the rank (dense / tp + experts / ep), P = its ZeRO partition of them:
      fp32, ZeRO 1/2: 4 L (weights) + 16 P (fp32 master, AdamW's two moments, the reduced gradient)
      fp32, no ZeRO:  16 L (weights, gradients, two moments; the weights are the master copy)
      bf16/fp16:      2 L (weights) + 2 L (gradients) + 16 P, P = L without ZeRO
Muon keeps one moment for the hidden matrices instead of AdamW's two; the bound takes AdamW's side for the
rest and Muon's single moment for every weight (lower).
"""
from __future__ import annotations

import os

from megatron_lite.checkpoint.layout import fmt_bytes
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.parallel import ParallelDims
from megatron_lite.training.ds_config import uses_muon


def expert_params(config: ModelConfig) -> int:
    """Parameters of all the experts of all layers (0 for a dense model)."""
    if not config.is_moe:
        return 0
    h, f = config.hidden_size, config.ffn_hidden_size
    per_expert = 3 * h * f if config.ffn_type == "swiglu" else 2 * h * f + f + h
    return config.num_layers * config.num_experts * per_expert


def model_state_bytes(config: ModelConfig, dims: ParallelDims, ds_config: dict, frozen_base: bool = False) -> int:
    """Lower bound of the bytes one rank holds for weights, gradients and optimizer state (see module doc).
    frozen_base (LoRA): only the weights count, the adapters' state being small and not estimated."""
    experts = expert_params(config)
    dense = config.num_params() - experts
    local = dense / dims.tp + experts / dims.ep
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    partition = dense / dims.tp / dims.dp + experts / dims.dp if stage >= 1 else local
    half = any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    if frozen_base:
        return int((2 if half else 4) * local)
    muon = uses_muon(ds_config)
    per_partition = 4 + (4 if muon else 8) + 4  # master copy, moments, gradient (fp32)
    if half:
        return int(2 * local + 2 * local + per_partition * partition)
    if stage == 0:
        return int(4 * local + (per_partition - 4) * local)  # the weights are the master copy
    return int(4 * local + per_partition * partition)


def available_bytes(on_gpu: bool) -> int | None:
    """Memory one rank may use: its GPU's free memory, or this host's available memory over its local ranks.
    None where it cannot be read (then nothing is refused)."""
    if on_gpu:
        import torch

        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))[0]  # this rank's GPU, not GPU 0
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or
                      os.environ.get("WORLD_SIZE") or 1)
    return kib * 1024 // max(1, local_ranks)


def check_memory_fits(config: ModelConfig, dims: ParallelDims, ds_config: dict, on_gpu: bool,
                      frozen_base: bool = False) -> None:
    need = model_state_bytes(config, dims, ds_config, frozen_base)
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if on_gpu and offload in ("cpu", "nvme"):
        return  # the partitioned state lives on the host: the device keeps weights and gradients only
    have = available_bytes(on_gpu)
    if have is not None and need > have:
        where = "on its GPU" if on_gpu else "of this host's available memory"
        raise UserError(
            f"the model state of {config.name} ({config.num_params() / 1e6:.1f}M parameters) needs at least "
            f"{fmt_bytes(need)} per rank (tp {dims.tp}, ep {dims.ep}, dp {dims.dp}, ZeRO stage "
            f"{(ds_config.get('zero_optimization') or {}).get('stage', 0)}) but a rank has {fmt_bytes(have)} {where}: "
            "use more ranks (ZeRO partitions the optimizer state over dp), --ep/--tp, bf16 on GPUs, "
            "ds_configs/zero2_offload.json or a smaller model")
