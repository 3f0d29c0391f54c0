"""The checkpoint folder contract: what training writes and every reader (eval, generate, convert) relies on.

    CKPT/latest                      tag of the newest *complete* checkpoint (written last, atomically)
    CKPT/<tag>/                      DeepSpeed 0.19 `save_checkpoint` layout; training tags are global_stepN
        mp_rank_{tp:02d}_model_states.pt
            {"module": state dict without the MoE experts, ...engine bookkeeping, training's client state}
        layer_{L}_expert_{E}_mp_rank_{tp:02d}_model_states.pt    (MoE) one file per global expert E of layer L
            {"layers.<L>.mlp.moe.deepspeed_moe.experts.deepspeed_experts.<E>.<w>.weight": tensor}
            L counts MoE layers (= decoder layer here), E is the *global* expert id, so the files look the
            same whatever the expert-parallel size of the run that wrote them.
        zero_pp_rank_{R}_mp_rank_{tp:02d}_optim_states.pt        ZeRO optimizer shard of data-parallel rank R
            (MoE: the expert parameter groups too, partitioned over the expert-data-parallel group); named
            bf16_zero_pp_rank_... by bf16 runs
    CKPT/<tag>/ of a universal copy (tools/convert_checkpoint.py; checkpoint/universal.py)
        universal.json, fp32.safetensors, exp_avg.safetensors, exp_avg_sq.safetensors, state.pt
    CKPT/model_config.json           ModelConfig (vocab_size padded from the tokenizer)
    CKPT/tokenizer/                  HF fast tokenizer with the ChatML chat template, so CKPT alone is enough
                                     to generate or convert
    CKPT/ds_config.json, args.json   effective DeepSpeed config and command-line arguments (training runs)
    CKPT/metrics.jsonl               one JSON line per logged step (appended across resumes)
    CKPT/lora_config.json            (LoRA runs, checkpoint/lora.py) rank, alpha, targets and the base model's
                                     fingerprint; the state dicts then hold peft's `base_layer` / `lora_A` /
                                     `lora_B` names, which readers merge into plain weights

With tp > 1 there is one mp_rank file (and one set of expert files) per tensor-parallel rank; readers gather
them with the specs of `megatron_lite.tensor_parallel.reshard`.

A checkpoint is first written under the tag `tmp-<tag>` and renamed to `<tag>` once every file is on disk;
only then is `latest` replaced, so `latest` never names a partial checkpoint.

Loading safety: pickles may only rebuild tensors, containers, plain numpy data and DeepSpeed's own classes
(one policy, `_allowed_global`): `load_weights_only` reads our files with it, `check_pickle_globals`
vets a folder before DeepSpeed unpickles it without restrictions.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
from pathlib import Path

import torch

from megatron_lite.errors import UserError

LATEST = "latest"
TMP_PREFIX = "tmp-"
MODEL_STATES_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
EXPERT_STATES_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
# dp rank, tp rank; DeepSpeed prefixes the name with `bf16_` when the run trains in bf16 (same contents)
ZERO_SHARD_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# A DeepSpeed-MoE expert weight in a full state dict: decoder layer, global (or local) expert id, parameter.
EXPERT_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."
                        r"(?P<expert>\d+)\.(?P<param>.+)$")


def step_tag(iteration: int) -> str:
    return f"global_step{iteration}"


def model_states_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def zero_shard_path(tag_dir: Path, dp_rank: int, tp_rank: int) -> Path:
    """Data-parallel rank `dp_rank`'s ZeRO optimizer shard in `tag_dir` (the bf16 name when that one is there)."""
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
    bf16 = Path(tag_dir) / f"bf16_{name}"
    return bf16 if bf16.is_file() else Path(tag_dir) / name


def expert_states_file(layer: int, expert: int, tp_rank: int = 0) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_{tp_rank:02d}_model_states.pt"


def expert_key(layer, expert, param: str) -> str:
    return f"layers.{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{expert}.{param}"


def latest_tag(root: Path) -> str | None:
    """The tag `root/latest` names; None when there is none (no save finished, or not a checkpoint)."""
    latest = Path(root) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


# ---------------------------------------------------------------------------------------------- safe loading

# Plain numpy arrays and scalars (e.g. RNG states older checkpoints kept in their client state) rebuild
# from a dtype and raw bytes and run no code.
_NUMPY_DATA_GLOBALS = re.compile(r"^numpy(\._core|\.core)\.multiarray\.(_reconstruct|scalar)$|^numpy\.(ndarray|dtype)$"
                                 r"|^numpy\.dtypes\.\w+DType$")


def _allowed_global(name: str):
    """The object a checkpoint pickle may rebuild under `name` beyond torch's weights-only defaults, or None.

    Plain numpy data (see above), and classes defined in DeepSpeed: its optimizer states pickle a few
    (LossScaler, ZeroStageEnum, fragment_address, ...; which ones depends on precision and ZeRO stage). A
    function (os.system, builtins.exec, or any deepspeed function) is never allowed."""
    if not (_NUMPY_DATA_GLOBALS.match(name) or name.startswith("deepspeed.")):
        return None
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    if name.startswith("deepspeed.") and not (isinstance(obj, type) and obj.__module__.startswith("deepspeed.")):
        return None
    return obj


def _numpy_dtype_classes() -> list:
    import numpy as np
    return [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


def load_weights_only(path: Path, mmap: bool = False):
    """torch.load(weights_only=True) of one checkpoint file, on the CPU, with the globals `_allowed_global`
    admits; no pickle code ever runs. A corrupt file or a refused global is a one-line UserError. `mmap`
    maps the tensors instead of reading them (to look at a large file's small entries)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # corrupt/truncated file, or globals beyond the weights-only defaults
        error = e
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = None
    allowed = [_allowed_global(n) for n in names or ()]
    if names and all(obj is not None for obj in allowed):
        safe = list(zip(allowed, names))
        if any(_NUMPY_DATA_GLOBALS.match(n) for n in names):
            safe += _numpy_dtype_classes()  # a rebuilt numpy.dtype is an instance of one of these classes
        try:
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            error = e
    what = f"it needs unsafe globals {names}" if names else str(error).splitlines()[0]
    raise UserError(f"cannot read {path} with weights_only=True: {what}") from None


def check_pickle_globals(tag_dir: Path) -> None:
    """Refuse a checkpoint whose pickles name anything `_allowed_global` does not admit.

    DeepSpeed's `load_checkpoint` unpickles with weights_only=False (its optimizer states hold DeepSpeed
    classes), and unpickling can run any code a file names (`os.system` in a `__reduce__`). This scan reads
    only each file's pickle opcodes, never executes them, so a tampered checkpoint is refused before
    DeepSpeed touches it.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            unsafe = {g for g in get_unsafe_globals_in_checkpoint(f) if _allowed_global(g) is None}
        except Exception as e:  # not a torch zip archive (truncated, or a raw pickle)
            raise UserError(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            f"the checkpoint is corrupt, resume from an earlier one") from None
        if unsafe:
            raise UserError(f"{f} references {', '.join(sorted(unsafe))}, which loading would execute; refusing "
                            f"it (only load checkpoints written by megatron_lite/DeepSpeed)")


# ---------------------------------------------------------------------------------------------- durable writes

def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries, e.g. a rename, are only durable once it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (what a checkpoint folder takes on disk, near enough)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free space of the filesystem `path` is on (or would be created on: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the folders (the page cache survives SIGKILL, not a power cut)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))
