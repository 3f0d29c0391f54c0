"""The effective DeepSpeed config of a run: the JSON file, command-line overrides, and what DeepSpeed cannot
decide itself. The `scheduler` and `wandb` sections are read by us (`lr_settings`, `wandb_settings`), not by
DeepSpeed."""
from __future__ import annotations

import copy
import json

import torch

from megatron_lite.errors import UserError
from megatron_lite.parallel import bf16_supported
from megatron_lite.training.recipe import DECAY_STYLES, FALLBACK, OPTIMIZERS, Recipe

# ds_config optimizer / scheduler type names of our choices (ours: WarmupStableDecayLR, see schedule.py)
OPTIMIZER_TYPES = {"adam": "AdamW", "adamw": "AdamW", "muon": "Muon"}
SCHEDULER_TYPES = {"cosine": "WarmupCosineLR", "wsd": "WarmupStableDecayLR"}
MUON_ONLY_PARAMS = ("muon_lr", "adam_lr", "momentum", "ns_method")
EMBEDDING_LR = "embedding_lr"  # ours, in optimizer.params: the input embedding's peak lr (training.engine.param_groups)


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
                      train_iters: int = 1, optimizer=None, muon_lr=None, lr_decay_style=None,
                      wsd_decay_frac=None, adam_beta1=None, adam_beta2=None, embedding_lr=None,
                      recipe: Recipe = FALLBACK) -> dict:
    """Apply command-line overrides (a flag beats the JSON; a JSON value of "auto", or none, takes the
    preset's `recipe`) and settle everything DeepSpeed cannot decide itself. Returns a new dict."""
    cfg = copy.deepcopy(cfg)
    _settle_batch(cfg, dp, micro_batch_size, grad_accum, global_batch_size)
    _settle_optimizer(cfg, recipe, optimizer, lr, muon_lr, weight_decay, grad_clip, (adam_beta1, adam_beta2),
                      embedding_lr)
    _settle_schedule(cfg, recipe, train_iters, warmup_iters, min_lr, lr_decay_style, wsd_decay_frac)
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


def _given(d: dict, key: str):
    """d[key], or None when absent or "auto" (then the recipe decides)."""
    v = d.get(key)
    return None if v is None or v == "auto" else v


def _pick(flag, d: dict, key: str, default):
    """A flag beats an explicit JSON value, which beats the recipe's `default`."""
    if flag is not None:
        return flag
    v = _given(d, key)
    return default if v is None else v


def _settle_optimizer(cfg: dict, recipe: Recipe, optimizer, lr, muon_lr, weight_decay, grad_clip, betas,
                      embedding_lr=None) -> None:
    opt = cfg.setdefault("optimizer", {})
    name = str(_pick(optimizer, opt, "type", recipe.optimizer)).lower()
    if name not in OPTIMIZER_TYPES:
        raise UserError(f"ds_config optimizer type {opt.get('type')!r} is not supported; use "
                        f"{' or '.join(OPTIMIZER_TYPES[o] for o in OPTIMIZERS)}")
    opt["type"] = OPTIMIZER_TYPES[name]
    params = opt.setdefault("params", {})
    params["lr"] = float(_pick(lr, params, "lr", recipe.lr))
    params["weight_decay"] = float(_pick(weight_decay, params, "weight_decay", recipe.weight_decay))
    params["betas"] = _settle_betas(params, recipe, betas)
    emb_lr = _pick(embedding_lr, params, EMBEDDING_LR, recipe.embedding_lr)
    if emb_lr is None:
        params.pop(EMBEDDING_LR, None)
    else:
        params[EMBEDDING_LR] = float(emb_lr)
    if opt["type"] == "Muon":
        # DeepSpeed's Muon reads `muon_lr` for its matrices and `lr` for its AdamW side
        params["muon_lr"] = float(_pick(muon_lr, params, "muon_lr", recipe.muon_lr))
        # Newton-Schulz: DeepSpeed's default "gram" iterates in fp16, which CPUs lack, so it falls back to fp32
        # there, where the plain quintic iteration in bf16 ("standard") is the faster one (benchmarks/results.md,
        # "A fast input embedding ...; Muon's Newton-Schulz on CPU")
        if params.get("ns_method", "auto") == "auto":
            params["ns_method"] = "gram" if torch.cuda.is_available() else "standard"
        if uses_optimizer_offload(cfg):
            raise UserError("Muon with ZeRO optimizer offload is not supported; use --optimizer adamw or a "
                            "ds_config without offload_optimizer (e.g. ds_configs/zero2.json)")
    else:
        if muon_lr is not None:
            raise UserError("--muon-lr needs --optimizer muon")
        for key in MUON_ONLY_PARAMS:  # DeepSpeed's CPU Adam (offload) takes no unknown keys
            params.pop(key, None)
    cfg["gradient_clipping"] = _settle_clip(cfg, recipe, grad_clip)


def _settle_clip(cfg: dict, recipe: Recipe, flag) -> float:
    """The global gradient-norm clip: the flag, else the JSON's `gradient_clipping`, else the recipe's, except
    that Muon's default is 0 (off). DeepSpeed's ZeRO optimizer orthogonalises Muon's matrices before it takes
    the norm, so the norm it clips covers the orthogonalised updates (about sqrt(sum of min(rows, cols)) over the
    matrices, ~95 for `tiny`): a clip of 1.0 would shrink every Muon step by that factor."""
    muon = cfg["optimizer"]["type"] == "Muon"
    clip = float(_pick(flag, cfg, "gradient_clipping", 0.0 if muon else recipe.grad_clip))
    if clip < 0:
        raise UserError(f"gradient clipping {clip} (--grad-clip or the ds_config's gradient_clipping) must be >= 0")
    return clip


def _settle_betas(params: dict, recipe: Recipe, flags: tuple) -> list[float]:
    """AdamW's [beta1, beta2]: each flag (--adam-beta1/2) beats the JSON's `betas`, which beats the recipe."""
    given = _given(params, "betas")
    if given is not None and (not isinstance(given, (list, tuple)) or len(given) != 2):
        raise UserError(f"ds_config optimizer betas {given!r} must be a list of two numbers (or \"auto\")")
    json_or_recipe = given or (recipe.adam_beta1, recipe.adam_beta2)
    betas = [float(f if f is not None else b) for f, b in zip(flags, json_or_recipe)]
    for i, b in enumerate(betas, 1):
        if not 0.0 <= b < 1.0:
            raise UserError(f"Adam beta{i} {b} (--adam-beta{i} or the ds_config's betas) must be in [0, 1)")
    return betas


def _settle_schedule(cfg: dict, recipe: Recipe, train_iters: int, warmup_iters, min_lr, decay_style,
                     wsd_decay_frac) -> None:
    """Linear warmup, then cosine (`WarmupCosineLR`) or warmup-stable-decay (`WarmupStableDecayLR`) down to
    `cos_min_ratio` x lr (the floor of either; the key keeps DeepSpeed's name). Read by `lr_settings`."""
    sched = cfg.setdefault("scheduler", {})
    sp = sched.setdefault("params", {})
    style = decay_style
    if style is None and _given(sched, "type") is not None:
        style = {v: k for k, v in SCHEDULER_TYPES.items()}.get(sched["type"])
        if style is None:
            raise UserError(f"ds_config scheduler type {sched.get('type')!r} is not supported; use "
                            f"{' or '.join(SCHEDULER_TYPES.values())} (linear warmup then cosine or "
                            f"warmup-stable-decay)")
    style = style or recipe.decay_style
    if style not in DECAY_STYLES:
        raise UserError(f"lr decay style {style!r} is not one of {', '.join(DECAY_STYLES)}")
    sched["type"] = SCHEDULER_TYPES[style]
    if _given(sp, "total_num_steps") is None:
        sp["total_num_steps"] = train_iters
    sp["warmup_num_steps"] = int(_pick(warmup_iters, sp, "warmup_num_steps", recipe.warmup_iters(train_iters)))
    lr = cfg["optimizer"]["params"]["lr"]
    ratio = (min_lr / lr if lr else 0.0) if min_lr is not None else None
    sp["cos_min_ratio"] = float(_pick(ratio, sp, "cos_min_ratio", recipe.min_lr_ratio))
    if style == "wsd":
        frac = float(_pick(wsd_decay_frac, sp, "decay_frac", recipe.wsd_decay_frac))
        if not 0.0 <= frac <= 1.0:
            raise UserError(f"--lr-wsd-decay-frac {frac} must be in [0, 1]")
        sp["decay_frac"] = frac
    else:
        if wsd_decay_frac is not None:
            raise UserError("--lr-wsd-decay-frac needs --lr-decay-style wsd")
        sp.pop("decay_frac", None)


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
    sharding).

    Muon keeps ZeRO (stage 1 at least, whatever dp): DeepSpeed's ZeRO 1/2 optimizer is where it runs
    Newton-Schulz on each full matrix gradient, the one path of DeepSpeed's Muon that every precision
    shares; without a ZeRO optimizer upstream releases step plain SGD on the matrices (DeepSpeed PR 8442)."""
    zero = cfg.get("zero_optimization") or {}
    if cfg["optimizer"]["type"] == "Muon":
        if zero.get("stage", 0) == 0:
            cfg["zero_optimization"] = {**zero, "stage": 1}
            cfg["zero_note"] = "stage 0 -> 1: DeepSpeed's Muon orthogonalises inside its ZeRO optimizer"
        elif zero.get("stage") == 3:
            raise UserError("Muon with ZeRO stage 3 is not supported here; use stage 1 or 2 (ds_configs/zero2.json)")
        return
    if dp == 1 and zero.get("stage", 0) in (1, 2) and not uses_optimizer_offload(cfg):
        cfg["zero_optimization"] = {"stage": 0}
        cfg["zero_note"] = f"stage {zero['stage']} -> 0: a single data-parallel rank has nothing to partition"


def lr_settings(cfg: dict) -> dict:
    """The schedule's arguments (`schedule.build_scheduler`): the peak is `lr` (with Muon each group keeps its
    own peak, `muon_lr` for the matrices, and follows the same shape)."""
    p, s = cfg["optimizer"]["params"], cfg["scheduler"]["params"]
    wsd = cfg["scheduler"]["type"] == SCHEDULER_TYPES["wsd"]
    return dict(max_lr=float(p["lr"]), min_lr=float(p["lr"]) * float(s["cos_min_ratio"]),
                warmup_iters=int(s["warmup_num_steps"]), decay_iters=int(s["total_num_steps"]),
                style="wsd" if wsd else "cosine", wsd_decay_frac=float(s.get("decay_frac", 0.0)))


def wandb_settings(cfg: dict) -> dict:
    w = cfg.get("wandb") or {}
    return w if w.get("enabled") else {}


def uses_optimizer_offload(cfg: dict) -> bool:
    off = (cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def uses_muon(cfg: dict) -> bool:
    return str((cfg.get("optimizer") or {}).get("type", "")).lower() == "muon"
