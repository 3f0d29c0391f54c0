"""Helpers for tests that launch real training processes (1 process, or 2 gloo ranks via `deepspeed`).

Same conventions as tests/test_training.py: the `deepspeed` launcher next to sys.executable, a free master
port per run, one thread per rank, a tiny model (SMALL) and a tiny corpus built once per module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_lite.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# A model small enough that start-up, not compute, dominates every run.
SMALL = ["--num-layers", "2", "--hidden-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
         "--ffn-hidden-size", "128", "--seq-length", "32"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") and not k.startswith("MEGATRON_LITE_")}
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return e


def command(script: str, args: list, ranks: int = 1, launcher: str = "deepspeed") -> list[str]:
    """ranks > 1: the `deepspeed` launcher, or torchrun (same env contract, a few seconds less start-up)."""
    if ranks == 1:
        cmd = [sys.executable, str(REPO / script)]
    elif launcher == "deepspeed":
        cmd = [DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", str(ranks), str(REPO / script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), str(REPO / script)]
    return cmd + [str(a) for a in args]


def run(script: str, args: list, ranks: int = 1, check: bool = True, launcher: str = "deepspeed",
        **extra_env) -> subprocess.CompletedProcess:
    cmd = command(script, args, ranks, launcher)
    p = subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def copy_at(src: Path, dst: Path, step: int) -> Path:
    """A checkpoint folder holding only `src`'s global_step{step}: what a run stopped there would leave."""
    dst.mkdir()
    for name in ("model_config.json", "tokenizer"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)
    shutil.copytree(src / f"global_step{step}", dst / f"global_step{step}")
    (dst / "latest").write_text(f"global_step{step}")
    return dst


def zero2_with(**optimizer_params) -> dict:
    """The shipped ds_configs/zero2.json with these optimizer.params set."""
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"]["params"].update(optimizer_params)
    return cfg


def metrics(ckpt) -> list[dict]:
    path = Path(ckpt) / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def losses(ckpt) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(ckpt) if "loss" in m}


def build_data(d: Path, sft: bool = False) -> dict:
    """Tiny corpus + 400-token BPE tokenizer + pretraining (and, with sft, SFT) datasets under `d`."""
    from megatron_lite.data.corpus import write_corpus

    write_corpus(str(d), pretrain_mb=0.3, sft_arith=200, seed=0)
    for cmd in (["tools/train_tokenizer.py", "--input", d / "pretrain_train.jsonl", "--vocab-size", "400",
                 "--output-dir", d / "tok"],
                ["tools/preprocess_data.py", "--input", d / "pretrain_train.jsonl", "--output-prefix", d / "pt",
                 "--tokenizer", d / "tok", "--append-eod"],
                *([["tools/preprocess_data.py", "--input", d / "sft_train.jsonl", "--output-prefix", d / "sft",
                    "--tokenizer", d / "tok", "--chat"]] if sft else [])):
        subprocess.run([sys.executable] + [str(c) for c in cmd], cwd=REPO, env=env(), check=True,
                       capture_output=True)
    return {"dir": d, "tok": d / "tok", "pt": str(d / "pt_text_document"), "sft": str(d / "sft_text_document")}


def pretrain_args(data: dict, save, iters, *extra) -> list:
    """A short run of the SMALL model. AdamW, not `tiny`'s recipe (Muon): the checkpoint, resharding and
    failure tests check AdamW's state files and ZeRO layouts; Muon's have their own tests (test_optim,
    test_reshard_resume). A later `--optimizer` in `extra` wins."""
    return ["--model", "tiny", *SMALL, "--tokenizer", data["tok"], "--data-path", data["pt"], "--train-iters", iters,
            "--lr", "3e-3", "--warmup-iters", "2", "--optimizer", "adamw", "--save", save, *extra]
