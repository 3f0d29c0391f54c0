"""Write checkpoint folders (layout.py): a training checkpoint through the DeepSpeed engine, the run files
beside it, and a weights-only folder from a full state dict. Both writers commit the same way: files under
`tmp-<tag>`, on disk, renamed to `<tag>`, then `latest` replaced atomically.

A full disk is a user error: the run refuses a --save folder that cannot hold one checkpoint before it starts
(`check_save_space`), and a save that runs out of space later removes its partial folder, leaves `latest` and
the earlier checkpoints as they were, and stops every rank with one line.

Who writes what (DeepSpeed's rule, also ours): every rank writes its own shards; global rank 0 (wherever it
runs) alone writes `latest`, the run files and metrics.jsonl. On a --save folder that is a node-local disk
(the same path on every node, another disk) each node's folder so gets its ranks' shards, committed there
as on rank 0's node, and never a `latest`: resuming needs the complete checkpoint where every rank can read
it (a shared filesystem, or a copy on every node), which `--load` checks."""
from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.layout import (EXPERT_KEY, LATEST, TMP_PREFIX, atomic_write_text, expert_states_file,
                                             fmt_bytes, free_bytes, fsync_path, fsync_tree, latest_tag,
                                             model_states_file, step_tag, tree_bytes)
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.training.ds_config import uses_muon


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _commits_folder(root: Path) -> bool:
    """Collective: whether this rank renames and cleans `root`'s temporary folders — rank 0, and on a
    node-local --save the first rank of every other folder. A folder is its host and inode (NFS may number
    one export's device differently on each client, which at worst makes a rank look for a `tmp-*` folder
    that rank 0 already renamed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    root.mkdir(parents=True, exist_ok=True)
    st = root.stat()
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, (socket.gethostname(), st.st_dev, st.st_ino))
    rank = dist.get_rank()
    return rank == 0 or (keys[rank] != keys[0] and keys.index(keys[rank]) == rank)


def _commit(root: Path, tag: str, latest: bool = True) -> None:
    """`tmp-<tag>` (complete, on disk) becomes `<tag>`, replacing an earlier save of the same tag (e.g. a
    rerun into the same folder); then `latest` names it (rank 0 only: `latest=False` on other nodes' disks)."""
    final, trash = root / tag, root / f"trash-{tag}"
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(root / f"{TMP_PREFIX}{tag}", final)
    if latest:
        atomic_write_text(root / LATEST, tag)
    fsync_path(root)
    shutil.rmtree(trash, ignore_errors=True)


def _save_model_config(root: Path, config: ModelConfig) -> None:
    tmp = root / f".model_config.json.tmp-{os.getpid()}"
    config.save(tmp)
    os.replace(tmp, root / "model_config.json")


def _replace_dir(root: Path, name: str, fill: Callable[[Path], None]) -> None:
    """root/name becomes a folder that `fill` wrote in full (a reader never sees a half-copied one)."""
    staging = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(staging, root / name)


# ---------------------------------------------------------------------------------------------- disk space

# Pickle framing, DeepSpeed's zero_to_fp32.py, tokenizer and run files on top of the tensors.
_OVERHEAD_FRACTION, _OVERHEAD_BYTES = 0.05, 256 * 1024


def checkpoint_bytes(config: ModelConfig, ds_config: dict) -> int:
    """Estimated size of one training checkpoint, every rank's files together: the weights in their training
    dtype, the fp32 moments (AdamW's two; Muon's one for the matrices it trains), and an fp32 master copy of
    the weights under ZeRO or bf16/fp16. ZeRO shards the optimizer state over the data-parallel ranks (one
    file each) without changing its total, so a --save folder that all ranks share needs this much at any
    world size."""
    half = any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    zero = (ds_config.get("zero_optimization") or {}).get("stage", 0) > 0
    n = config.num_params()
    moments = 8 * n - (4 * config.muon_params() if uses_muon(ds_config) else 0)
    total = n * ((2 if half else 4) + (4 if zero or half else 0)) + moments
    return int(total * (1 + _OVERHEAD_FRACTION)) + _OVERHEAD_BYTES


def _last_checkpoint_bytes(root: Path) -> int | None:
    tag = latest_tag(root)
    return tree_bytes(root / tag) if tag and (root / tag).is_dir() else None


def check_save_space(save_dir: str, config: ModelConfig, ds_config: dict) -> None:
    """Pre-flight (before training starts): refuse a --save folder whose filesystem cannot take one more
    checkpoint, sized as the last one already there, else estimated from the model and optimizer."""
    root = Path(save_dir)
    needed = _last_checkpoint_bytes(root) or checkpoint_bytes(config, ds_config)
    free = free_bytes(root)
    if free < needed:
        raise UserError(f"--save {save_dir}: {fmt_bytes(free)} free on its filesystem, one checkpoint of this "
                        f"run needs about {fmt_bytes(needed)} ({config.num_params() / 1e6:.2f}M parameters: "
                        f"weights and optimizer state); free some space or choose another --save folder")


def _needed_bytes(root: Path) -> int | None:
    """What the next checkpoint in `root` takes: the last one's size, else the estimate from the run files."""
    last = _last_checkpoint_bytes(root)
    if last:
        return last
    try:
        return checkpoint_bytes(ModelConfig.load(root), json.loads((root / "ds_config.json").read_text()))
    except (UserError, OSError, ValueError):
        return None


def _out_of_space(error: BaseException, root: Path, needed: int | None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in its chain, or (torch.save reports a
    full disk as a RuntimeError 'unexpected pos' that drops the errno) less room left than a checkpoint needs."""
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return free_bytes(root) < (needed or 1 << 20)


def _no_space_error(root: Path, tag: str, needed: int | None, how: str) -> UserError:
    latest = latest_tag(root)
    kept = f"{root}/latest still names {latest}" if latest else "no earlier checkpoint exists"
    need = f", one checkpoint needs about {fmt_bytes(needed)}" if needed else ""
    return UserError(f"no space left to save {tag} in {root}: {fmt_bytes(free_bytes(root))} free{need}; the "
                     f"partial {TMP_PREFIX}{tag} was removed and {kept}; {how}")


def _outcome(error: Exception | None, root: Path) -> tuple[int, Exception | None]:
    """(0 ok / 1 out of space / 2 failed, the error to re-raise). A full disk's error is dropped: its
    traceback holds torch.save's open file, whose blocks stay allocated until it is closed."""
    if error is None:
        return 0, None
    return (1, None) if _out_of_space(error, root, _needed_bytes(root)) else (2, error)


def _try(fn: Callable[[Path], None], path: Path) -> tuple[int, Exception | None]:
    try:
        fn(path)
    except Exception as e:  # judged on every rank by _settle
        return _outcome(e, path.parent)
    return 0, None


def _settle(outcome: tuple[int, Exception | None], root: Path, tag: str, dev, cleans: bool = True) -> None:
    """Collective, after every rank wrote (or failed to write) its part of `tmp-<tag>`: return when all
    ranks succeeded. When one ran out of space, the partial folder goes and rank 0 raises the one-line
    UserError while the others leave with the same exit status and print nothing. Any other failure keeps
    its traceback. (`latest` has not moved yet, so the last checkpoint it names sizes the one that failed.)"""
    code, error = outcome
    worst = code
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(float(code), device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst = int(t.item())
    if worst == 0:
        return
    if worst == 2:
        if error is not None:
            raise error
        raise RuntimeError(f"saving {root}/{tag} failed on another rank")
    gc.collect()  # closes the failed write's file (see _outcome)
    if cleans:
        shutil.rmtree(root / f"{TMP_PREFIX}{tag}", ignore_errors=True)
    _barrier()
    if not _is_rank0():
        raise SystemExit(2)
    raise _no_space_error(root, tag, _needed_bytes(root), "free some space or choose another --save folder, then resume "
                          "with --load")


# ---------------------------------------------------------------------------------------------- writers

def write_run_files(save_dir: str, config: ModelConfig, tokenizer_dir: str, ds_config: dict, args: dict) -> None:
    """model_config.json, tokenizer/, ds_config.json, args.json: what makes CKPT self-describing (rank 0)."""
    if not _is_rank0():
        return
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    if (root / "model_config.json").exists() and (root / LATEST).exists() and ModelConfig.load(root) != config:
        raise UserError(f"--save {save_dir} already holds a checkpoint of a different model; "
                        f"choose another --save folder")
    _save_model_config(root, config)
    if Path(tokenizer_dir).resolve() != (root / "tokenizer").resolve():
        _replace_dir(root, "tokenizer", lambda dst: shutil.copytree(tokenizer_dir, dst))
    atomic_write_text(root / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    atomic_write_text(root / "args.json", json.dumps(args, indent=2, default=str) + "\n")


def save_training_checkpoint(engine, save_dir: str, iteration: int, client_state: dict, *,
                             before_commit: Callable[[Path], None] | None = None) -> str:
    """Write CKPT/global_step{iteration} through DeepSpeed's `engine.save_checkpoint` and point `latest` at
    it; collective (every rank calls it). `before_commit(tmp_dir)` runs on every rank once all ranks' files
    are on disk in `tmp_dir`, before it is renamed and `latest` replaced."""
    root = Path(save_dir)
    tag = step_tag(iteration)
    tmp_tag = f"{TMP_PREFIX}{tag}"
    commits = _commits_folder(root)
    if commits:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left over from a crash mid-save
    _barrier()
    try:
        engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    except Exception as e:  # a full disk under torch.save on this rank, while the others may have finished
        outcome = _outcome(e, root)
        _barrier()  # the one save_checkpoint ends with, which this rank skipped
    else:
        # Each rank its own shards (on a node-local disk too): on disk before the rename.
        outcome = _try(fsync_tree, root / tmp_tag)
    _settle(outcome, root, tag, engine.device, commits)  # also the barrier: every rank's files are on disk
    if before_commit is not None:
        _settle(_try(before_commit, root / tmp_tag), root, tag, engine.device, commits)
    if _is_rank0():
        _commit(root, tag)
    _barrier()
    # Still there after rank 0's rename: this rank's folder is another disk (or nothing was written to it).
    if commits and not _is_rank0() and (root / tmp_tag).is_dir():
        _commit(root, tag, latest=False)
    _barrier()
    return tag


def save_checkpoint_folder(out_dir: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                           tokenizer=None, tag: str = "global_step0") -> Path:
    """Write a full state dict in the DeepSpeed layout (tp = 1) with model_config.json and tokenizer/, so
    training can `--load`/`--pretrained` it and every reader accepts it. Experts go to their per-(layer,
    expert) files as DeepSpeed writes them."""
    out = Path(out_dir)
    tmp_dir = out / f"{TMP_PREFIX}{tag}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    module, experts = {}, {}
    for k, v in state_dict.items():
        v = v.detach().contiguous().clone()
        if m := EXPERT_KEY.match(k):
            experts.setdefault((int(m["layer"]), int(m["expert"])), {})[k] = v
        else:
            module[k] = v
    needed = sum(v.numel() * v.element_size() for v in state_dict.values())
    try:
        torch.save({"module": module, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
                    "mp_world_size": 1, "num_experts": [config.num_experts] * config.num_layers if config.is_moe else 1,
                    "buffer_names": []}, tmp_dir / model_states_file(0))
        for (layer, e), sd in experts.items():
            torch.save(sd, tmp_dir / expert_states_file(layer, e))
        _save_model_config(out, config)
        if tokenizer is not None:
            _replace_dir(out, "tokenizer", lambda dst: tokenizer.save_pretrained(str(dst)))
        fsync_tree(tmp_dir)
    except Exception as e:
        if not _out_of_space(e, out, needed):
            raise
        full = True
    else:
        full = False
    if full:  # raised out here, the UserError does not keep the failed write (and its open file) as context
        gc.collect()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise _no_space_error(out, tag, needed, "free some space or choose another output folder")
    _commit(out, tag)
    return out
