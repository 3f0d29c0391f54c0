"""`--checkpoint-activations`: recompute each transformer block's forward during backward.

Applied from outside the plain model: every `Block` of a `GPT` gets an instance-level `forward` that runs the
block's own forward under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`. Only the block inputs
are kept between forward and backward; everything inside the block (attention scores, SwiGLU hidden,
MoE dispatch buffers) is recomputed when its gradient is needed. The module tree, parameter names and
state dict are untouched, so checkpoints load with or without the flag and the ZeRO / MoE checkpoint
files are the same.

Why torch's non-reentrant checkpoint and not `deepspeed.checkpointing` (DeepSpeed's
`activation_checkpointing` config):
  * RNG: it stashes the CPU and accelerator generator states at forward time and restores them for the
    recompute, so dropout masks and the router's noise (`torch.randn_like` in `NoisyTopKGate`) are drawn
    again bit for bit, and routing (hence the MoE all-to-all sizes) repeats exactly. DeepSpeed's restores
    the same states plus its model-parallel RNG tracker, which is built for Megatron's per-tp-rank seeds;
    our tp ranks share one stream per replica (training/rng.py), so the tracker would only be more state.
  * tp and ep collectives inside the block (row-parallel all-reduce, DeepSpeed-MoE's all-to-all and its
    capacity all-reduce) are ordinary autograd ops here: the recompute replays them in the same order on
    every rank, because every rank runs backward through the same blocks in the same order.
  * Outputs and arguments: a block returns (x, aux, counts) with aux/counts None for dense blocks and
    integer counts for MoE; the non-reentrant form takes any outputs and keyword arguments, where
    DeepSpeed's default reentrant `CheckpointFunction` wants tensors that carry gradients, and it needs
    `deepspeed.checkpointing.configure(...)` global state first.
  * `--compile`: dynamo traces non-reentrant checkpoint regions (the activation-checkpoint higher-order
    op) and the partitioner recomputes them inside the compiled graph; DeepSpeed's `checkpoint` is marked
    `compiler.disable`, so each block would fall out of the compiled graph.
  * What DeepSpeed's adds (partitioning the saved block inputs across tp ranks, CPU offload of them) is a
    GPU-memory trick for large tp; the block input is the only thing kept here, (B, T, C) per layer.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _recomputed(forward):
    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        # Eval, generation and no-grad calls save nothing anyway: run the block as it is.
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    checkpointed_forward.recomputes_activations = True
    return checkpointed_forward


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Make every transformer block of `model` (a GPT, before `compile` and DeepSpeed) recompute its
    activations in backward. Returns the number of blocks wrapped; calling it twice changes nothing."""
    from megatron_lite.model.gpt import Block

    n = 0
    for block in model.modules():
        if isinstance(block, Block):
            if not getattr(block.forward, "recomputes_activations", False):
                block.forward = _recomputed(block.forward)
            n += 1
    return n
