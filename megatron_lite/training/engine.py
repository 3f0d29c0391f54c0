"""The DeepSpeed side of training: distributed start-up, the effective ds_config, the model/optimizer/engine,
and checkpoints.

Checkpoint folder (`--save CKPT`), the contract readers (eval, generate, convert) rely on:

    CKPT/latest                      tag of the newest *complete* checkpoint (written last, atomically)
    CKPT/global_stepN/               DeepSpeed `save_checkpoint` layout:
        mp_rank_00_model_states.pt       non-expert weights + client state (see `client_state`)
        zero_pp_rank_R_mp_rank_00_optim_states.pt   ZeRO optimizer shard of data-parallel rank R
        layer_L_expert_E_mp_rank_00_model_states.pt (MoE) one file per global expert E of MoE layer L
        expp_rank_R_mp_rank_00_optim_states.pt       (MoE) expert optimizer states
    CKPT/model_config.json           ModelConfig (vocab_size padded from the tokenizer)
    CKPT/tokenizer/                  copy of the tokenizer, so CKPT alone is enough to generate or convert
    CKPT/ds_config.json, args.json   effective DeepSpeed config and command-line arguments
    CKPT/metrics.jsonl               one JSON line per logged step (appended across resumes)

A checkpoint is first written under a temporary tag and renamed to `global_stepN` once every rank has
finished; only then is `latest` replaced, so `latest` never names a partial checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.parallel import ParallelDims
from megatron_lite.training.schedule import build_scheduler


# ---------------------------------------------------------------------------------------------- start-up

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) and return (rank, world size).

    Under `deepspeed`/torchrun the launcher's env vars are used; a plain `python launch/...` run becomes a
    world of one on a free port (DeepSpeed would otherwise take the fixed port 29500, which collides with
    any other run on the machine).
    """
    from megatron_lite.ds_runtime import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif "OMP_NUM_THREADS" not in os.environ:
        # N CPU ranks on one host share its cores; oversubscribing them costs far more than it gains.
        local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or
                    os.environ.get("WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------- ds_config

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
    """Apply command-line overrides and settle everything DeepSpeed cannot decide itself.

    Batch: global = micro x grad_accum x dp. A flag beats the JSON; the JSON's `train_batch_size`, when set,
    must agree. `bf16.enabled: "auto"` becomes true on GPUs with bf16 and false on CPU (bf16 matmuls are
    very slow there). The `scheduler` section is read by us (see `lr_settings`), not by DeepSpeed.
    """
    cfg = copy.deepcopy(cfg)
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
    if min_lr is not None:
        sp["cos_min_ratio"] = min_lr / params["lr"] if params["lr"] else 0.0
    sp.setdefault("cos_min_ratio", 0.1)

    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported()
    if cfg.get("fp16", {}).get("enabled") == "auto":
        cfg["fp16"]["enabled"] = False
    if not torch.cuda.is_available() and (bf16["enabled"] or cfg.get("fp16", {}).get("enabled")):
        print("warning: bf16/fp16 on CPU is very slow; ds_config 'bf16': {'enabled': 'auto'} picks fp32 here")
    cfg.setdefault("steps_per_print", 10**9)  # our monitor prints; DeepSpeed's own progress lines are noise

    # ZeRO shards optimizer state and gradients over data-parallel ranks; with one there is nothing to shard
    # and stage 1/2 only adds copies (grads into a contiguous buffer, an fp32 partition, weights copied back):
    # ~8 % of a CPU step on `tiny`. The math is the same, so a dp=1 run uses stage 0 (kept with offload,
    # whose point is memory, not sharding).
    zero = cfg.get("zero_optimization") or {}
    if dp == 1 and zero.get("stage", 0) in (1, 2) and not uses_optimizer_offload(cfg):
        cfg["zero_optimization"] = {"stage": 0}
        cfg["zero_note"] = f"stage {zero['stage']} -> 0: a single data-parallel rank has nothing to partition"
    return cfg


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


# ---------------------------------------------------------------------------------------------- model

def build_model(config: ModelConfig, dims: ParallelDims, seed: int) -> torch.nn.Module:
    """The GPT for this rank. Every rank seeds identically first so replicated weights agree before
    DeepSpeed's broadcast, and each expert gets the weights it would have with any ep (see GPT init)."""
    from megatron_lite.model.gpt import GPT

    torch.manual_seed(seed)
    ep_rank = dims.dp_rank % dims.ep  # rank inside DeepSpeed's expert-parallel group (consecutive dp ranks)
    kwargs = dict(ep_size=dims.ep, ep_rank=ep_rank)
    if dims.tp > 1:
        kwargs["tp_group"] = dims.tp_group
    return GPT(config, **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only — norms, biases and embeddings (the tied head included) keep their
    scale (as in Megatron/nanoGPT). Expert parameters then go to DeepSpeed-MoE's own groups, which ZeRO
    reduces over the expert-data-parallel group instead of the whole data-parallel group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


class NonFiniteSkippingAdamW(torch.optim.AdamW):
    """AdamW that drops an update whose gradients are not finite (NaN/inf), on every rank together.

    One bad batch (a loss spike overflowing, a corrupt sample) must not turn every weight into NaN. The
    check sits here, in the optimizer DeepSpeed calls at the accumulation boundary, because only here are the
    final (reduced, clipped, ZeRO-partitioned) gradients in one place for every ZeRO stage. Ranks hold
    different ZeRO shards, so the verdict is all-reduced: all ranks skip or none does (otherwise replicas
    diverge). A skipped update leaves weights and Adam moments untouched; the learning-rate schedule still
    advances. The loop also sets `bad_loss` (a device flag) when a loss on this rank was not finite.
    """

    bad_loss: torch.Tensor | None = None
    last_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        dev = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=dev)
        if grads:
            bad += (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()
        if self.bad_loss is not None:
            bad += self.bad_loss.to(dev)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.bad_loss = None
        self.last_skipped = bool(bad.item() > 0)
        if self.last_skipped:
            return None
        return super().step(closure)


def build_engine(model: torch.nn.Module, ds_config: dict, dims: ParallelDims, train: bool = True):
    """deepspeed.initialize with our optimizer and schedule.

    The optimizer is torch's AdamW (fused kernel on CPU and GPU): DeepSpeed's CPU FusedAdam path costs more
    than it saves here. With optimizer offload DeepSpeed needs its own CPU Adam, so it builds it from the
    JSON instead. The `scheduler` and `wandb` sections are ours and are not passed on.
    """
    from megatron_lite.ds_runtime import deepspeed

    cfg = copy.deepcopy(ds_config)
    sched = lr_settings(cfg) if train else None
    for key in ("scheduler", "wandb", "zero_note"):
        cfg.pop(key, None)
    kwargs = {}
    if train:
        opt = cfg["optimizer"]["params"]
        groups = param_groups(model, float(opt.get("weight_decay", 0.0)))
        kwargs["model_parameters"] = groups
        if not uses_optimizer_offload(cfg):
            cfg.pop("optimizer")
            cfg["zero_allow_untested_optimizer"] = True

            made = []

            def make_optimizer(params):
                made.append(NonFiniteSkippingAdamW(
                    params, lr=float(opt["lr"]), betas=tuple(opt.get("betas", (0.9, 0.999))),
                    eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 0.0)), fused=True))
                return made[-1]
            kwargs["optimizer"] = make_optimizer
        kwargs["lr_scheduler"] = lambda optimizer: build_scheduler(optimizer, **sched)
    else:
        cfg.pop("optimizer", None)
        cfg["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, mpu=dims.mpu, **kwargs)
    # The loop reads `last_skipped` of our optimizer (None with offload: DeepSpeed's CPU Adam, whose
    # non-finite steps DeepSpeed's own overflow check skips when gradient clipping computes the norm).
    engine.nonfinite_guard = made[0] if train and not uses_optimizer_offload(cfg) and made else None
    if train and engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        _record_fp32_grad_norm(engine)
    if dims.dp == 1 and engine.zero_optimization_stage() == 0:
        # A data-parallel "all-reduce" over one rank still flattens and unflattens every gradient.
        engine.enable_backward_allreduce = False
    return engine


def _record_fp32_grad_norm(engine) -> None:
    """Without ZeRO and mixed precision DeepSpeed clips fp32 gradients but throws the norm away; keep it
    (same DeepSpeed function, its return value stored) so stage-0 runs log grad_norm too."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                   mpu=engine.mpu)
    engine.clip_fp32_gradients = clip_and_record


# ---------------------------------------------------------------------------------------------- RNG

def seed_step(seed: int, dp_rank: int, iteration: int) -> None:
    """Reseed every RNG from (seed, data-parallel rank, iteration) at the start of each iteration.

    Tensor-parallel ranks of one replica share the stream, so replicated computations (router noise,
    dropout outside TP regions) agree across them.

    Dropout and router noise then depend only on where training is, not on how it got there, so a resumed
    run draws exactly the numbers an uninterrupted one would, on every rank (DeepSpeed saves client state
    from rank 0 only, so per-rank generator states could not be restored from it)."""
    s = np.random.SeedSequence([seed, dp_rank, iteration]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


def rng_state() -> dict:
    # numpy's state holds an ndarray; store its key as a tensor so the checkpoint stays loadable with
    # torch.load(weights_only=True), which refuses numpy objects.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpoints

def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_run_files(save_dir: str, config: ModelConfig, tokenizer_dir: str, ds_config: dict, args: dict) -> None:
    """model_config.json, tokenizer/, ds_config.json, args.json: what makes CKPT self-describing (rank 0)."""
    if not _is_rank0():
        return
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = root / "model_config.json"
    if existing.exists() and (root / "latest").exists() and ModelConfig.load(root) != config:
        raise UserError(f"--save {save_dir} already holds a checkpoint of a different model; "
                        f"choose another --save folder")
    tmp = root / f".model_config.json.tmp-{os.getpid()}"
    config.save(tmp)
    os.replace(tmp, existing)
    tok_dst = root / "tokenizer"
    if Path(tokenizer_dir).resolve() != tok_dst.resolve():
        staging = root / f".tokenizer.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(tokenizer_dir, staging)
        shutil.rmtree(tok_dst, ignore_errors=True)
        os.replace(staging, tok_dst)
    _atomic_write_text(root / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    _atomic_write_text(root / "args.json", json.dumps(args, indent=2, default=str) + "\n")


def save_checkpoint(engine, save_dir: str, iteration: int, client_state: dict,
                    before_commit: Callable[[Path], None] | None = None) -> str:
    """Write CKPT/global_step{iteration} and point `latest` at it; collective (every rank calls it).

    before_commit(tmp_folder) runs on every rank once all shards are on disk, before the rename and `latest`
    (tests use it to kill a run in the middle of a save)."""
    root = Path(save_dir)
    tag = f"global_step{iteration}"
    tmp_tag = f"tmp-{tag}"
    if _is_rank0():
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left over from a crash mid-save
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    _fsync_tree(root / tmp_tag)  # page cache survives SIGKILL, not a power cut: data on disk before the rename
    _barrier()  # every rank's shards are on disk
    if before_commit is not None:
        before_commit(root / tmp_tag)
    if _is_rank0():
        final, trash = root / tag, root / f"trash-{tag}"
        if final.exists():  # the same step saved again (e.g. a rerun into the same folder)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(root / tmp_tag, final)
        _atomic_write_text(root / "latest", tag)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    _barrier()
    return tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path` (each rank: its own shards on a node-local disk) and the folders."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def check_checkpoint_dir(path: str) -> str:
    """The tag `latest` names in `path`, or a one-line error when `path` is not a usable checkpoint."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist")
    latest = root / "latest"
    if not latest.exists():
        raise UserError(f"{path} has no 'latest' file: not a megatron_lite checkpoint, or no save finished")
    tag = latest.read_text().strip()
    if not (root / tag / "mp_rank_00_model_states.pt").exists():
        raise UserError(f"{path}/latest names {tag!r}, which has no mp_rank_00_model_states.pt")
    check_pickle_globals(root / tag)
    return tag


def _is_deepspeed_class(name: str) -> bool:
    """DeepSpeed's optimizer states pickle a few of its own classes (LossScaler, ZeroStageEnum,
    fragment_address, ...; which ones depends on precision and ZeRO stage). A class defined in deepspeed is
    fine to rebuild; a function (os.system, builtins.exec, or any deepspeed function) is not."""
    import importlib

    if not name.startswith("deepspeed."):
        return False
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and obj.__module__.startswith("deepspeed.")


def check_pickle_globals(tag_dir: Path) -> None:
    """Refuse a checkpoint whose pickles name anything but tensors, containers and DeepSpeed's own classes.

    DeepSpeed's `load_checkpoint` unpickles with weights_only=False (its optimizer states hold DeepSpeed
    classes), and unpickling can run any code a file names (`os.system` in a `__reduce__`). This scan reads
    only each file's pickle opcodes, never executes them, so a tampered checkpoint is refused before
    DeepSpeed touches it.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            unsafe = {g for g in get_unsafe_globals_in_checkpoint(f) if not _is_deepspeed_class(g)}
        except Exception as e:  # not a torch zip archive (truncated, or a raw pickle)
            raise UserError(f"cannot read {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            f"the checkpoint is corrupt, resume from an earlier one") from None
        if unsafe:
            raise UserError(f"{f} references {', '.join(sorted(unsafe))}, which loading would execute; refusing "
                            f"it (only load checkpoints written by megatron_lite/DeepSpeed)")


def check_resumable(path: str, dp: int, tp: int, zero_stage: int) -> None:
    """Exact resume restores the optimizer, whose ZeRO shards are cut per data-parallel rank: refuse (one
    line, before DeepSpeed starts) a layout that DeepSpeed would fail on with a traceback."""
    import re

    root = Path(path)
    tag_dir = root / (root / "latest").read_text().strip()
    shards = {int(m.group(1)) for f in tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")
              if (m := re.match(r"zero_pp_rank_(\d+)_", f.name))}
    saved_tp = len(list(tag_dir.glob("mp_rank_*_model_states.pt")))
    saved = f"{len(shards)} ZeRO shards (data-parallel {len(shards)})" if shards else "no ZeRO shards (one data-parallel rank or stage 0)"
    now = f"data-parallel {dp} with ZeRO stage {zero_stage}"
    if saved_tp != tp:
        raise UserError(f"--load {path}: saved with --tp {saved_tp}, this run has --tp {tp}; resume with --tp {saved_tp}")
    if (zero_stage > 0) != bool(shards) or (shards and len(shards) != dp):
        raise UserError(f"--load {path}: the optimizer state was saved as {saved}, this run is {now}; "
                        f"resume with the same number of data-parallel ranks (world size / --tp) and ds_config")


def check_same_model(path: str, config: ModelConfig) -> None:
    saved = ModelConfig.load(path)
    if saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items()
                if k != "name" and getattr(config, k) != v}
        raise UserError(f"checkpoint {path} holds a different model (saved vs requested: {diff})")


def load_checkpoint(engine, path: str, config: ModelConfig, module_only: bool = False) -> dict:
    """Restore from CKPT (`latest`). Returns the client state ({} for module_only)."""
    tag = check_checkpoint_dir(path)
    check_same_model(path, config)
    load_path, client = engine.load_checkpoint(path, tag=tag, load_module_only=module_only,
                                               load_optimizer_states=not module_only,
                                               load_lr_scheduler_states=not module_only)
    if load_path is None:
        raise UserError(f"could not load checkpoint {path}/{tag}")
    return {} if module_only else (client or {})
