"""DeepSpeed's process-wide settings, applied by one explicit call at distributed start-up.

On the CPU accelerator DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op
(`deepspeed_shm_comm`) the first time it starts. Nothing here uses it: it only serves
`inference_all_reduce`, while training collectives go through torch.distributed (gloo or NCCL). It costs
a fresh machine minutes of C++ compiling inside the first `deepspeed` run, an interrupted build leaves a
lock in ~/.cache/torch_extensions on which every later run waits forever, and each multi-rank run leaves
shared-memory segments in /dev/shm that are never unlinked. So its builder is switched off; set
MEGATRON_LITE_DS_SHM_COMM=1 to get DeepSpeed's default back.
"""
import importlib
import os


def _no_shm_comm_op():
    return None  # TorchBackend then keeps its plain torch.distributed all-reduce


def skip_shm_comm_build() -> None:
    """Make DeepSpeed's comm backend skip its shm all-reduce op (see the module docstring). Call it before
    DeepSpeed builds that backend (`deepspeed.init_distributed` or `deepspeed.initialize`); calling it again
    is harmless. `parallel.init_distributed` does it for every entry point."""
    if os.environ.get("MEGATRON_LITE_DS_SHM_COMM") == "1":
        return
    # by sys.modules name: `import deepspeed.comm.torch as m` would give torch itself, which deepspeed.comm
    # re-exports under that attribute name
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = _no_shm_comm_op
