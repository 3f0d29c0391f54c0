"""Distributed start-up, and the parallel dimensions (tensor, expert, data) with their process groups.

`init_distributed` starts torch.distributed once per process (through DeepSpeed, so its comm backend exists
too).

`ParallelDims` is built once per run and handed to whatever needs a group — the model factory gets
`dims.tp_group`, `deepspeed.initialize` gets `dims.mpu`. Nothing here is a module-level global: a layer
only ever talks to the group it was given.

Rank layout (Megatron's): tensor-parallel groups are runs of consecutive ranks, so the chatty per-layer
all-reduces stay inside one node; data-parallel groups stride across them.

    world 8, tp 2:  tp groups [0,1] [2,3] [4,5] [6,7]     dp groups [0,2,4,6] [1,3,5,7]

Expert parallelism lives *inside* the data-parallel group (experts are sharded across data-parallel
replicas, as DeepSpeed-MoE does it), so `ep` must divide `dp`. DeepSpeed-MoE builds the expert groups
itself from `dims.mpu`; its layout (`deepspeed.utils.groups._get_expert_parallel_ranks`) splits exactly
our dp groups, which is what the test in tests/test_tensor_parallel.py checks.
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.errors import UserError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a master port or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Tuple[int, int]:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) and return (rank, world size).

    Under `deepspeed`/torchrun the launcher's env vars are used; a plain `python launch/...` run becomes a
    world of one on a free port (DeepSpeed would otherwise take the fixed port 29500, which collides with
    any other run on the machine).
    """
    import deepspeed

    from megatron_lite.ds_runtime import skip_shm_comm_build

    skip_shm_comm_build()  # before DeepSpeed builds its comm backend (here, or in deepspeed.initialize)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif "OMP_NUM_THREADS" not in os.environ:
        # N CPU ranks on one host share its cores; oversubscribing them costs far more than it gains.
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or
                    os.environ.get("WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    # Also when torch.distributed is already up (a test harness, a user's own start-up): DeepSpeed then only
    # wraps the existing group, which its MoE all-to-all needs.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """End a finished run's process group on every rank: exiting with it still up can abort a rank while
    gloo's threads are torn down ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def group_ranks(world_size: int, tp: int) -> Tuple[List[List[int]], List[List[int]]]:
    """(tp groups, dp groups) as lists of global ranks for a world of `world_size` and tensor size `tp`."""
    dp = world_size // tp
    tp_groups = [list(range(g * tp, (g + 1) * tp)) for g in range(dp)]
    dp_groups = [list(range(t, world_size, tp)) for t in range(tp)]
    return tp_groups, dp_groups


class ParallelDims:
    """Sizes of the tensor (tp), expert (ep) and data (dp) parallel dimensions, and — after `build()` —
    this rank's groups and ranks in them.

    Before `build()` (or in a single process) every group is None, every size 1 and every rank 0, so
    single-device code can take a `ParallelDims` without caring whether it runs distributed.
    """

    def __init__(self, tp: int = 1, ep: int = 1, dp: int = 1):
        self.tp, self.ep, self.dp = tp, ep, dp
        self.world_size = tp * dp
        self.rank = 0
        self.tp_rank, self.dp_rank = 0, 0
        # Groups over which collectives actually run. `_tp_group`/`_dp_group` exist whenever
        # torch.distributed is up (DeepSpeed needs a real group even of size 1, see `ModelParallelUnit`);
        # the public `tp_group` is None when tp == 1 so layers degrade to plain torch.nn code.
        self._tp_group = None
        self._dp_group = None
        self._dp_ranks: List[int] = [0]
        self._built = False
        self.mpu = ModelParallelUnit(self)

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, ep: int = 1,
                   num_experts: Optional[int] = None) -> "ParallelDims":
        """Validate `--tp/--ep` against the world size (and the expert count for MoE); dp is what is left."""
        for name, v in (("tp", tp), ("ep", ep), ("world size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if world_size % tp:
            raise UserError(f"world size {world_size} is not divisible by --tp {tp}; "
                            f"launch a multiple of {tp} processes or lower --tp")
        dp = world_size // tp
        if dp % ep:
            raise UserError(f"--ep {ep} must divide the data-parallel size {dp} (= world size {world_size} "
                            f"/ --tp {tp}); experts are sharded across data-parallel ranks")
        if num_experts is not None and num_experts % ep:
            raise UserError(f"--ep {ep} must divide --num-experts {num_experts} so each rank holds "
                            f"the same number of experts")
        return cls(tp=tp, ep=ep, dp=dp)

    def build(self) -> "ParallelDims":
        """Create the process groups (collective: every rank calls it, same order). Idempotent."""
        if self._built:
            return self
        if not (dist.is_available() and dist.is_initialized()):
            if self.world_size != 1:
                raise UserError(f"tp={self.tp} x dp={self.dp} needs {self.world_size} processes but "
                                f"torch.distributed is not initialised; launch with "
                                f"`deepspeed --num_gpus {self.world_size}` or torchrun")
            self._built = True
            return self
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != self.world_size:
            raise UserError(f"tp={self.tp} x dp={self.dp} = {self.world_size} ranks, "
                            f"but torch.distributed has {world}")
        self.rank = rank
        tp_groups, dp_groups = group_ranks(world, self.tp)
        # new_group is collective over the *world*: every rank creates every group, keeps its own.
        for ranks in tp_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                self._tp_group, self.tp_rank = g, ranks.index(rank)
        for ranks in dp_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                self._dp_group, self.dp_rank, self._dp_ranks = g, ranks.index(rank), ranks
        self._built = True
        return self

    # Layer-facing views: None / 1 when that dimension is not split.
    @property
    def tp_group(self):
        return self._tp_group if self.tp > 1 else None

    @property
    def dp_group(self):
        return self._dp_group if self.dp > 1 else None

    def __repr__(self):
        return (f"ParallelDims(tp={self.tp}, ep={self.ep}, dp={self.dp}; rank {self.rank}: "
                f"tp_rank {self.tp_rank}, dp_rank {self.dp_rank})")


class ModelParallelUnit:
    """The `mpu` duck type DeepSpeed 0.19 queries (engine, ZeRO-1/2 grad norms, MoE group creation,
    checkpoint naming). Only the methods it calls are provided; in particular *not*
    `initialize_sequence_parallel` (its presence makes DeepSpeed ignore the data-parallel group) and no
    pipeline methods (DeepSpeed then assumes pp = 1).

    Groups are real process groups whenever torch.distributed is up, even of size 1: DeepSpeed calls
    `all_reduce(group=mpu.get_model_parallel_group())` unguarded, and group=None there means the world.
    """

    def __init__(self, dims: ParallelDims):
        self._dims = dims

    # tensor (= model) parallel
    def get_tensor_model_parallel_group(self):
        return self._dims._tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._dims.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tp group (groups are consecutive ranks)."""
        return self._dims.rank - self._dims.tp_rank

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    # data parallel (ZeRO shards and averages gradients over this group only)
    def get_data_parallel_group(self):
        return self._dims._dp_group

    def get_data_parallel_rank(self) -> int:
        return self._dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._dims.dp

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self._dims._dp_ranks)
