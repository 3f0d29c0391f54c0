"""The effective DeepSpeed config of a run: the JSON file, command-line overrides, and what DeepSpeed cannot
decide itself. The `scheduler` and `wandb` sections are read by us (`lr_settings`, `wandb_settings`), not by
DeepSpeed."""
from __future__ import annotations

import copy
import json

import torch

from megatron_lite.errors import UserError
from megatron_lite.parallel import bf16_supported


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--deepspeed {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--deepspeed {path} must hold a JSON object")
    return cfg


def resolve_ds_config(cfg: dict, dp: int, *, micro_batch_size=None, grad_accum=None, global_batch_size=None,
                      lr=None, min_lr=None, weight_decay=None, grad_clip=None, warmup_iters=None,
                      train_iters: int = 1) -> dict:
    """Apply command-line overrides (a flag beats the JSON) and settle everything DeepSpeed cannot decide
    itself. Returns a new dict."""
    cfg = copy.deepcopy(cfg)
    _settle_batch(cfg, dp, micro_batch_size, grad_accum, global_batch_size)
    _settle_optimizer(cfg, lr, weight_decay, grad_clip)
    _settle_schedule(cfg, train_iters, warmup_iters, min_lr)
    _settle_precision(cfg)
    cfg.setdefault("steps_per_print", 10**9)  # our monitor prints; DeepSpeed's own progress lines are noise
    _settle_zero(cfg, dp)
    return cfg


def _settle_batch(cfg: dict, dp: int, micro_batch_size, grad_accum, global_batch_size) -> None:
    """global = micro x grad_accum x dp. The JSON's `train_batch_size`, when set, must agree."""
    mbs = micro_batch_size or cfg.get("train_micro_batch_size_per_gpu")
    if not mbs:
        raise UserError("set --micro-batch-size or train_micro_batch_size_per_gpu in the ds_config")
    json_gbs = cfg.get("train_batch_size")
    if global_batch_size and grad_accum and global_batch_size != mbs * grad_accum * dp:
        raise UserError(f"--global-batch-size {global_batch_size} != --micro-batch-size {mbs} x "
                        f"--grad-accum {grad_accum} x data-parallel size {dp}")
    if global_batch_size:
        if global_batch_size % (mbs * dp):
            raise UserError(f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
                            f"{mbs} x data-parallel size {dp}")
        gas = global_batch_size // (mbs * dp)
    elif grad_accum:
        gas = grad_accum
    elif micro_batch_size is None and json_gbs and "gradient_accumulation_steps" not in cfg:
        if json_gbs % (mbs * dp):
            raise UserError(f"ds_config train_batch_size {json_gbs} is not divisible by micro batch {mbs} x "
                            f"data-parallel size {dp}")
        gas = json_gbs // (mbs * dp)
    else:
        gas = cfg.get("gradient_accumulation_steps", 1)
    if mbs < 1 or gas < 1:
        raise UserError(f"micro batch size ({mbs}) and gradient accumulation ({gas}) must be >= 1")
    gbs = mbs * gas * dp
    flags_set_batch = micro_batch_size or grad_accum or global_batch_size
    if json_gbs and not flags_set_batch and json_gbs != gbs:
        raise UserError(f"ds_config is inconsistent: train_batch_size {json_gbs} != micro batch {mbs} x "
                        f"gradient_accumulation_steps {gas} x data-parallel size {dp}")
    cfg.update(train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas, train_batch_size=gbs)


def _settle_optimizer(cfg: dict, lr, weight_decay, grad_clip) -> None:
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        raise UserError(f"ds_config optimizer type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    params.setdefault("lr", 1e-3)
    if lr is not None:
        params["lr"] = lr
    if weight_decay is not None:
        params["weight_decay"] = weight_decay
    if grad_clip is not None:
        cfg["gradient_clipping"] = grad_clip


def _settle_schedule(cfg: dict, train_iters: int, warmup_iters, min_lr) -> None:
    """Linear warmup then cosine decay to `cos_min_ratio` x lr over the whole run (`lr_settings`)."""
    sched = cfg.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    sp = sched.setdefault("params", {})
    if sched.get("type") != "WarmupCosineLR":
        raise UserError(f"ds_config scheduler type {sched.get('type')!r} is not supported; use WarmupCosineLR "
                        f"(linear warmup then cosine decay)")
    if sp.get("total_num_steps", "auto") == "auto":
        sp["total_num_steps"] = train_iters
    if warmup_iters is not None:
        sp["warmup_num_steps"] = warmup_iters
    sp.setdefault("warmup_num_steps", 0)
    lr = cfg["optimizer"]["params"]["lr"]
    if min_lr is not None:
        sp["cos_min_ratio"] = min_lr / lr if lr else 0.0
    sp.setdefault("cos_min_ratio", 0.1)


def _settle_precision(cfg: dict) -> None:
    """`bf16.enabled: "auto"` becomes true on GPUs with bf16 and false on CPU (bf16 matmuls are very slow
    there)."""
    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported()
    if cfg.get("fp16", {}).get("enabled") == "auto":
        cfg["fp16"]["enabled"] = False
    if not torch.cuda.is_available() and (bf16["enabled"] or cfg.get("fp16", {}).get("enabled")):
        print("warning: bf16/fp16 on CPU is very slow; ds_config 'bf16': {'enabled': 'auto'} picks fp32 here")


def _settle_zero(cfg: dict, dp: int) -> None:
    """ZeRO shards optimizer state and gradients over data-parallel ranks; with one there is nothing to shard
    and stage 1/2 only adds copies (grads into a contiguous buffer, an fp32 partition, weights copied back).
    The math is the same, so a dp=1 run uses stage 0 (kept with offload, whose point is memory, not
    sharding)."""
    zero = cfg.get("zero_optimization") or {}
    if dp == 1 and zero.get("stage", 0) in (1, 2) and not uses_optimizer_offload(cfg):
        cfg["zero_optimization"] = {"stage": 0}
        cfg["zero_note"] = f"stage {zero['stage']} -> 0: a single data-parallel rank has nothing to partition"


def lr_settings(cfg: dict) -> dict:
    p, s = cfg["optimizer"]["params"], cfg["scheduler"]["params"]
    return dict(max_lr=float(p["lr"]), min_lr=float(p["lr"]) * float(s["cos_min_ratio"]),
                warmup_iters=int(s["warmup_num_steps"]), decay_iters=int(s["total_num_steps"]))


def wandb_settings(cfg: dict) -> dict:
    w = cfg.get("wandb") or {}
    return w if w.get("enabled") else {}


def uses_optimizer_offload(cfg: dict) -> bool:
    off = (cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)
