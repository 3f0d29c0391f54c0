"""Write checkpoint folders (layout.py): a training checkpoint through the DeepSpeed engine, the run files
beside it, and a weights-only folder from a full state dict. Both writers commit the same way: files under
`tmp-<tag>`, on disk, renamed to `<tag>`, then `latest` replaced atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.layout import (EXPERT_KEY, LATEST, TMP_PREFIX, atomic_write_text, expert_states_file,
                                             fsync_path, fsync_tree, model_states_file, step_tag)
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _commit(root: Path, tag: str) -> None:
    """`tmp-<tag>` (complete, on disk) becomes `<tag>`, replacing an earlier save of the same tag (e.g. a
    rerun into the same folder); then `latest` names it."""
    final, trash = root / tag, root / f"trash-{tag}"
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(root / f"{TMP_PREFIX}{tag}", final)
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
    if _is_rank0():
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left over from a crash mid-save
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    fsync_tree(root / tmp_tag)  # each rank its own shards (on a node-local disk too): on disk before the rename
    _barrier()
    if before_commit is not None:
        before_commit(root / tmp_tag)
    if _is_rank0():
        _commit(root, tag)
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
    torch.save({"module": module, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
                "mp_world_size": 1, "num_experts": [config.num_experts] * config.num_layers if config.is_moe else 1,
                "buffer_names": []}, tmp_dir / model_states_file(0))
    for (layer, e), sd in experts.items():
        torch.save(sd, tmp_dir / expert_states_file(layer, e))
    _save_model_config(out, config)
    if tokenizer is not None:
        _replace_dir(out, "tokenizer", lambda dst: tokenizer.save_pretrained(str(dst)))
    fsync_tree(tmp_dir)
    _commit(out, tag)
    return out
