"""DeepSpeed, imported through here so that every entry point runs it with the same process-wide settings.

    from megatron_lite.ds_runtime import deepspeed

On the CPU accelerator DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op
(`deepspeed_shm_comm`) the first time it starts. Nothing here uses it: it only serves
`inference_all_reduce`, while training collectives go through torch.distributed (gloo or NCCL). It costs
a fresh machine minutes of C++ compiling inside the first `deepspeed` run, an interrupted build leaves a
lock in ~/.cache/torch_extensions on which every later run waits forever, and each multi-rank run leaves
2 x 69 MB in /dev/shm that is never unlinked. So its builder is switched off; set
MEGATRON_LITE_DS_SHM_COMM=1 to get DeepSpeed's default back.
"""
import importlib
import os

import deepspeed

# by sys.modules name: `import deepspeed.comm.torch as m` would give torch itself, which deepspeed.comm
# re-exports under that attribute name
_ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

__all__ = ["deepspeed"]


def _no_shm_comm_op():
    return None  # TorchBackend then keeps its plain torch.distributed all-reduce


if os.environ.get("MEGATRON_LITE_DS_SHM_COMM") != "1" and hasattr(_ds_torch_comm, "build_shm_op"):
    _ds_torch_comm.build_shm_op = _no_shm_comm_op
