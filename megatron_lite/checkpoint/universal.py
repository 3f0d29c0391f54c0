"""The layout-free form of a training checkpoint, and resuming it on another parallel layout.

`TrainingState` holds what an exact resume needs with no trace of the layout that saved it: per parameter
(full tp = 1 tensors, global expert ids) the fp32 master weight, every optimizer moment (AdamW's exp_avg /
exp_avg_sq and step count; Muon's momentum_buffer), plus the learning-rate scheduler, DeepSpeed's step
counters and the training loop's client state (iteration, consumed samples, RNG). It is read from any
DeepSpeed checkpoint we write:

  ZeRO 1/2   each `zero_pp_rank_R_mp_rank_T_optim_states.pt` holds rank R's slice of every parameter group's
             flat fp32 partition and of the AdamW moments, and `param_slice_mappings` (name -> offset, numel
             in that partition). Concatenating a parameter's fragments in partition order gives it back
             (Muon's momentum is stored per rank for whole matrices instead: see `_read_zero_rank`). Expert
             groups (DeepSpeed-MoE names them `ep_size_E`) are partitioned over the expert-data-parallel
             group of ranks R with the same R % E; their names carry local expert ids, global = local +
             (R % E) x experts per rank. DeepSpeed's own `ds_to_universal` merges such fragments by local
             name across expert ranks and fails (DeepSpeed issues 5716, 4497): that is why this module exists.
  stage 0    the plain torch optimizer's state dict in `mp_rank_T_model_states.pt`: per-parameter moments in
             the order of `training.engine.param_groups`; the module's weights are the fp32 masters.
  tp > 1     one of the above per tensor-parallel rank T, gathered with the shard specs of
             `tensor_parallel.reshard` (moments are split like their weights).

`apply_training_state` fills a freshly built engine of any layout from it: ZeRO partitions through
DeepSpeed's `safe_set_full_fp32_param` / `safe_set_full_optimizer_state` (deepspeed.utils.tensor_fragment),
a plain optimizer's per-parameter state directly. A universal folder (`write_universal`,
tools/convert_checkpoint.py) stores the same form as safetensors files that `--load` takes at any layout.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import (EXPERT_KEY, EXPERT_STATES_FILE, MODEL_STATES_FILE, TMP_PREFIX,
                                             ZERO_SHARD_FILE, expert_key, fsync_path, fsync_tree, load_weights_only,
                                             model_states_file, zero_shard_path)
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

MOE_GROUP = re.compile(r"^ep_size_(\d+)$")  # DeepSpeed-MoE's name for an expert parameter group
UNIVERSAL_META = "universal.json"
UNIVERSAL_FORMAT = "megatron_lite-universal"
UNIVERSAL_VERSION = 1
# The files of a universal tag folder: tensors as safetensors (name -> full tensor), the rest as a
# weights-only pickle (ints, floats, strings, tuples, tensors: the RNG states and the scheduler).
UNIVERSAL_STATE = "state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's, per parameter (and the AdamW side of Muon)
MUON_MOMENTUM = "momentum_buffer"  # Muon's, on the matrices it trains
# fp32 holds every parameter; each optimizer-state file the parameters that have that state.
UNIVERSAL_TENSORS = {k: f"{k}.safetensors" for k in ("fp32", *MOMENTS, MUON_MOMENTUM)}
UNIVERSAL_MUON = UNIVERSAL_TENSORS[MUON_MOMENTUM]
# Keys of DeepSpeed's model-states file that are not the training loop's client state.
_DS_KEYS = {"module", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
            "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps", "global_samples",
            "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
            "buffer_names", "num_experts"}


@dataclass(frozen=True)
class Layout:
    """How a run cut its training state: data-, tensor-, expert-parallel sizes and ZeRO (0, or 1/2)."""
    dp: int
    tp: int
    ep: int
    zero: bool

    def __str__(self) -> str:
        return f"dp {self.dp}, tp {self.tp}, ep {self.ep}, " + ("ZeRO stage 1/2" if self.zero else "no ZeRO (stage 0)")


@dataclass
class TrainingState:
    params: dict[str, torch.Tensor]  # full fp32 master weights
    moments: dict[str, dict[str, torch.Tensor]]  # "exp_avg" / "exp_avg_sq" -> name -> full tensor
    steps: dict[str, int]  # optimizer step count per parameter
    lr_scheduler: dict
    counters: dict  # DeepSpeed's global_steps, global_samples, skipped_steps
    client: dict = field(default_factory=dict)  # the training loop's client state (iteration, rng, ...)


def is_universal(tag_dir: Path) -> bool:
    return (Path(tag_dir) / UNIVERSAL_META).is_file()


# ---------------------------------------------------------------------------------------------- saved layout

def saved_layout(tag_dir: Path) -> Layout:
    """The layout of a DeepSpeed checkpoint tag folder, from its file names and the rank-0 ZeRO file's group
    names (memory-mapped: nothing but the pickle's small header is read)."""
    tag_dir = Path(tag_dir)
    tp = sum(1 for f in tag_dir.iterdir() if MODEL_STATES_FILE.match(f.name))
    shards = sorted(int(m.group(1)) for f in tag_dir.iterdir()
                    if (m := ZERO_SHARD_FILE.match(f.name)) and m.group(2) == "00")
    if not shards:
        return Layout(dp=1, tp=tp, ep=1, zero=False)
    groups = _zero_file(tag_dir, 0, 0, mmap=True)["base_optimizer_state"]["param_groups"]
    eps = [int(m.group(1)) for g in groups if (m := MOE_GROUP.match(str(g.get("name", ""))))]
    return Layout(dp=len(shards), tp=tp, ep=max(eps, default=1), zero=True)


def _zero_file(tag_dir: Path, dp_rank: int, tp_rank: int, mmap: bool = False) -> dict:
    path = zero_shard_path(tag_dir, dp_rank, tp_rank)
    sd = load_weights_only(path, mmap=mmap)
    if not isinstance(sd, dict) or "optimizer_state_dict" not in sd:
        raise UserError(f"{path} holds no DeepSpeed ZeRO optimizer state")
    return sd["optimizer_state_dict"]


def half_without_zero(ds_config: dict) -> bool:
    """bf16/fp16 at ZeRO stage 0: DeepSpeed wraps our optimizer in its fp16 optimizer, whose fp32 masters
    this module does not read or fill yet (the case of dp = 1 runs on GPUs)."""
    return ((ds_config.get("zero_optimization") or {}).get("stage", 0) == 0
            and any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16")))


def check_reshardable(tag_dir: Path) -> None:
    """Refuse (one line) what this module cannot read: bf16/fp16 without ZeRO, whose DeepSpeed optimizer
    keeps its fp32 masters in a format of its own; a checkpoint without optimizer state."""
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        return
    layout = saved_layout(tag_dir)
    states = load_weights_only(tag_dir / model_states_file(0), mmap=True)
    if half_without_zero(states.get("ds_config") or {}):
        raise UserError(f"{tag_dir} was saved in bf16/fp16 without ZeRO, which cannot be resharded yet; resume "
                        f"it with the layout it was saved with ({layout})")
    if saved_optimizer(tag_dir) is None:
        raise UserError(f"{tag_dir}/{model_states_file(0)} holds no optimizer state to reshard")


def saved_optimizer(tag_dir: Path) -> str | None:
    """"muon" or "adamw": the optimizer whose state the checkpoint holds (None: no optimizer state)."""
    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        return "muon" if (tag_dir / UNIVERSAL_MUON).is_file() else "adamw"
    if saved_layout(tag_dir).zero:
        groups = _zero_file(tag_dir, 0, 0, mmap=True)["base_optimizer_state"]["param_groups"]
    else:
        states = load_weights_only(tag_dir / model_states_file(0), mmap=True)
        groups = (states.get("optimizer") or {}).get("param_groups")
    if groups is None:
        return None
    return "muon" if any(g.get("use_muon") for g in groups) else "adamw"


# ---------------------------------------------------------------------------------------------- reading

def _global_expert_name(name: str, ep_rank: int, n_local: int) -> str:
    m = EXPERT_KEY.match(name)
    return name if m is None else expert_key(m["layer"], int(m["expert"]) + ep_rank * n_local, m["param"])


def _read_zero_rank(tag_dir: Path, tp_rank: int, layout: Layout, config: ModelConfig, shapes: dict) -> tuple:
    """One tensor-parallel rank's ZeRO shards -> (params, moments, steps) of its local (tp-sharded) tensors.

    AdamW groups keep exp_avg / exp_avg_sq as flat partitions like the fp32 weights. Muon groups (DeepSpeed's
    MuonWithAuxAdam, `use_muon` set on the group) keep one `momentum_buffer` per rank instead: the *full*
    momenta of the parameters that have a fragment in that rank's partition, one after the other in group
    order (what `param_slice_mappings` lists), as ZeRO orthogonalises whole matrices."""
    n_local = config.num_experts // layout.ep if config.is_moe else 0
    frags: dict[str, dict[str, list]] = {"fp32": {}, **{k: {} for k in MOMENTS}}
    momentum: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    for rank in range(layout.dp):
        osd = _zero_file(tag_dir, rank, tp_rank)
        base = osd["base_optimizer_state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            group = base["param_groups"][g]
            moe = MOE_GROUP.match(str(group.get("name", "")))
            ep_rank, part = (rank % layout.ep, rank // layout.ep) if moe else (0, rank)
            state = base["state"].get(g, {})
            muon = bool(group.get("use_muon"))
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g],
                    **({} if muon else {k: state.get(k) for k in MOMENTS})}
            if muon:
                flat[MUON_MOMENTUM] = state.get(MUON_MOMENTUM)
            offset = 0
            for name, addr in mapping.items():
                gname = _global_expert_name(name, ep_rank, n_local)
                for key, t in flat.items():
                    if t is None:
                        raise UserError(f"{tag_dir}: ZeRO file of rank {rank} has no {key} for group {g} "
                                        "(saved before the first optimizer step?)")
                    if key == MUON_MOMENTUM:
                        numel = shapes[_local_shape_name(gname, n_local)].numel()
                        momentum.setdefault(gname, t.narrow(0, offset, numel))
                        offset += numel
                    else:
                        frags[key].setdefault(gname, []).append((part, t.narrow(0, addr.start, addr.numel)))
                if "step" in state:
                    steps[gname] = int(state["step"])
    out = {}
    for key, by_name in frags.items():
        out[key] = {}
        for name, pieces in by_name.items():
            shape = shapes[_local_shape_name(name, n_local)]
            flat = torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])])
            if flat.numel() != shape.numel():
                raise UserError(f"{tag_dir}: ZeRO fragments of {name} hold {flat.numel()} values, its shape "
                                f"{tuple(shape)} needs {shape.numel()}; the checkpoint is incomplete")
            out[key][name] = flat.view(shape).clone()
    if momentum:
        out[MUON_MOMENTUM] = {k: v.view(shapes[_local_shape_name(k, n_local)]).clone() for k, v in momentum.items()}
    return out.pop("fp32"), out, steps


def _local_shape_name(name: str, n_local: int) -> str:
    m = EXPERT_KEY.match(name)
    return name if m is None else expert_key(m["layer"], int(m["expert"]) % n_local, m["param"])


def _param_shapes(states: dict) -> dict[str, torch.Size]:
    return {k: torch.Size(v) for group in states.get("param_shapes") or [] for k, v in group.items()}


def _skeleton(config: ModelConfig):
    """A tp = ep = 1 GPT(config), for its parameter names, groups and shard specs only. Built on the CPU (its
    init draws numbers, which the meta device cannot) without moving the caller's torch RNG."""
    from megatron_lite.model.gpt import GPT

    with torch.random.fork_rng(devices=[]):
        return GPT(config)


def _optimizer_order(config: ModelConfig) -> list[list[str]]:
    """Parameter names per optimizer group, in the order `training.engine.param_groups` gives a dp = 1 run
    (the only one with no ZeRO): what a plain torch optimizer's state-dict indices count."""
    from megatron_lite.training.engine import param_groups

    model = _skeleton(config)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]


def _read_stage0_rank(tag_dir: Path, states: dict, config: ModelConfig, module: dict) -> tuple:
    opt = states.get("optimizer")
    if not isinstance(opt, dict) or "state" not in opt:
        raise UserError(f"{tag_dir}: {model_states_file(0)} holds no optimizer state to resume from")
    order = _optimizer_order(config)
    if [len(g) for g in order] != [len(g["params"]) for g in opt["param_groups"]]:
        raise UserError(f"{tag_dir}: its optimizer groups do not match this model's parameters")
    params, moments, steps = {}, {k: {} for k in MOMENTS}, {}
    for names, group in zip(order, opt["param_groups"]):
        for name, idx in zip(names, group["params"]):
            st = opt["state"].get(idx)
            if st is None:
                raise UserError(f"{tag_dir}: no optimizer state for {name} (saved before the first step?)")
            if st["exp_avg"].shape != module[name].shape:
                raise UserError(f"{tag_dir}: optimizer state of {name} has shape {tuple(st['exp_avg'].shape)}, "
                                f"the weight {tuple(module[name].shape)}")
            params[name] = module[name].float()
            for k in MOMENTS:
                moments[k][name] = st[k]
            steps[name] = int(st["step"])
    return params, moments, steps


def read_training_state(tag_dir: Path, config: ModelConfig) -> TrainingState:
    """A DeepSpeed checkpoint tag folder (any layout we train with) or a universal one -> TrainingState."""
    from megatron_lite.checkpoint.load import _read_rank

    tag_dir = Path(tag_dir)
    if is_universal(tag_dir):
        return read_universal(tag_dir, config)
    check_reshardable(tag_dir)
    layout = saved_layout(tag_dir)
    expert_files: dict[int, dict] = {}
    for p in tag_dir.iterdir():
        if m := EXPERT_STATES_FILE.match(p.name):
            expert_files.setdefault(int(m.group(3)), {})[(int(m.group(1)), int(m.group(2)))] = p
    per_tp = []
    for t in range(layout.tp):
        states = load_weights_only(tag_dir / model_states_file(t))
        if t == 0:
            head = states
        if layout.zero:
            per_tp.append(_read_zero_rank(tag_dir, t, layout, config, _param_shapes(states)))
        else:
            per_tp.append(_read_stage0_rank(tag_dir, states, config, _read_rank(tag_dir, t, expert_files)))
    params, moments, steps = per_tp[0]
    if layout.tp > 1:
        from megatron_lite.tensor_parallel.reshard import gather_state_dicts, tp_shard_specs

        specs = tp_shard_specs(_skeleton(config))
        params = gather_state_dicts([x[0] for x in per_tp], specs)
        moments = {k: gather_state_dicts([x[1][k] for x in per_tp], specs) for k in per_tp[0][1]}
    return TrainingState(params=params, moments=moments, steps=steps, lr_scheduler=head.get("lr_scheduler") or {},
                         counters={k: head.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")},
                         client={k: v for k, v in head.items() if k not in _DS_KEYS})


# ---------------------------------------------------------------------------------------------- into an engine

def _local_name(model, name: str) -> str | None:
    """The global (checkpoint) name of a parameter of this rank's `model`: local expert ids made global."""
    if getattr(model, "ep_size", 1) == 1:
        return name
    return _global_expert_name(name, model.ep_rank, model.config.num_experts // model.ep_size)


def apply_training_state(engine, state: TrainingState, tp_rank: int, tp_size: int) -> None:
    """Fill a freshly built engine (no step taken yet) of any layout with `state`: weights, fp32 masters,
    AdamW moments and step counts (Muon's momenta) of this rank's part, scheduler position, DeepSpeed's
    counters. The engine's optimizer must be the saved one (`resume_plan` checks that first)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron_lite.tensor_parallel.reshard import shard_tensor, tp_shard_specs

    model = engine.module
    specs = tp_shard_specs(model)

    def local(source: dict, name: str) -> torch.Tensor:
        full = source[_local_name(model, name)]
        return shard_tensor(full, specs[name], tp_rank, tp_size) if name in specs and tp_size > 1 else full

    names = {id(p): n for n, p in model.named_parameters()}
    missing = sorted(_local_name(model, n) for n in names.values() if _local_name(model, n) not in state.params)
    if missing:
        raise UserError(f"the checkpoint has no weights for {missing[:3]}: it holds a different model")
    opt = engine.optimizer
    with torch.no_grad():
        if isinstance(opt, DeepSpeedZeroOptimizer):  # parameters linked to slices of flat fp32 partitions
            lp_groups, flats = opt.bit16_groups, opt.single_partition_of_fp32_groups
            muon_groups = {i for i, g in enumerate(opt.optimizer.param_groups) if g.get("use_muon")}
            for i, (flat, lp_group) in enumerate(zip(flats, lp_groups)):
                if i in muon_groups:  # full momenta of the parameters with a fragment here (see _read_zero_rank)
                    here = [p for p in lp_group if p._hp_mapping is not None]
                    opt.optimizer.state[flat] = {MUON_MOMENTUM: torch.cat(
                        [local(state.moments[MUON_MOMENTUM], names[id(p)]).reshape(-1) for p in here]).to(flat.device)}
                    continue
                group_steps = {state.steps[_local_name(model, names[id(p)])] for p in lp_group}
                if len(group_steps) != 1:
                    raise UserError(f"parameters of one ZeRO group were saved at different optimizer steps "
                                    f"{sorted(group_steps)}; cannot merge them into one flat partition")
                opt.optimizer.state[flat] = {"step": _step_value(opt.optimizer, group_steps.pop(), flat.device),
                                             **{k: torch.zeros_like(flat) for k in MOMENTS}}
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()  # links each parameter to its slice of those moments
            for i, group in enumerate(lp_groups):
                for p in group:
                    name = names[id(p)]
                    value = local(state.params, name)
                    safe_set_full_fp32_param(p, value)
                    for k in () if i in muon_groups else MOMENTS:
                        safe_set_full_optimizer_state(p, local(state.moments[k], name), k)
                    p.data.copy_(value)
        else:
            base = getattr(engine, "basic_optimizer", None) or opt
            for group in base.param_groups:
                for p in group["params"]:
                    name = names[id(p)]
                    p.data.copy_(local(state.params, name))
                    base.state[p] = {"step": _step_value(base, state.steps[_local_name(model, name)], p.device),
                                     **{k: local(state.moments[k], name).to(p.device).clone() for k in MOMENTS}}
    _apply_scheduler(engine.lr_scheduler, state.lr_scheduler)
    engine.global_steps = int(state.counters.get("global_steps", 0))
    engine.global_samples = int(state.counters.get("global_samples", 0))
    engine.skipped_steps = int(state.counters.get("skipped_steps", 0))


def _step_value(optimizer, step: int, device):
    """The step count as `optimizer` keeps it: DeepSpeed's CPU Adam (optimizer offload) a plain int; torch's
    Adam/AdamW (also Muon's AdamW side) a float32 tensor, on the parameter's device for the fused kernel."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if isinstance(optimizer, DeepSpeedCPUAdam):
        return int(step)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _apply_scheduler(sched, saved: dict) -> None:
    """Move this run's LambdaLR (its groups and peak rates come from this run's flags, like an exact resume
    with the same flags) to the saved step, and set every group's rate for it."""
    if sched is None or "last_epoch" not in saved:
        return
    sched.last_epoch = int(saved["last_epoch"])
    sched._step_count = int(saved.get("_step_count", sched.last_epoch + 1))
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


# ---------------------------------------------------------------------------------------------- universal folder

def write_universal(state: TrainingState, out_tag_dir: Path) -> None:
    """Write `state` into `out_tag_dir` (created; the caller commits it atomically): safetensors files, the
    rest in state.pt, and universal.json last, listing every file with its size."""
    from safetensors.torch import save_file

    out_tag_dir.mkdir(parents=True)
    tensors = {"fp32": state.params, **{k: v for k, v in state.moments.items() if v}}
    for key, values in tensors.items():
        save_file({k: v.detach().contiguous().clone() for k, v in values.items()},
                  str(out_tag_dir / UNIVERSAL_TENSORS[key]))
    torch.save({"steps": state.steps, "lr_scheduler": state.lr_scheduler, "counters": state.counters,
                "client": state.client}, out_tag_dir / UNIVERSAL_STATE)
    files = {f: (out_tag_dir / f).stat().st_size for f in [*(UNIVERSAL_TENSORS[k] for k in tensors), UNIVERSAL_STATE]}
    meta = {"format": UNIVERSAL_FORMAT, "version": UNIVERSAL_VERSION, "files": files,
            "iteration": state.client.get("iteration")}
    (out_tag_dir / UNIVERSAL_META).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(out_tag_dir)


def check_universal(tag_dir: Path, config: ModelConfig | None = None) -> dict:
    """universal.json of a universal tag folder, after checking that every file it lists is there, whole,
    and (given the model's config) that the tensor files' headers hold this model's names and shapes: a
    truncated or mismatched folder is one line naming the file, before anything is loaded."""
    tag_dir = Path(tag_dir)
    path = tag_dir / UNIVERSAL_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if meta.get("format") != UNIVERSAL_FORMAT or meta.get("version") != UNIVERSAL_VERSION:
        raise UserError(f"{path} is not a {UNIVERSAL_FORMAT} v{UNIVERSAL_VERSION} description")
    files = meta.get("files", {})
    for fname in (UNIVERSAL_TENSORS["fp32"], UNIVERSAL_STATE):
        if fname not in files:
            raise UserError(f"{path} lists no {fname}: convert the checkpoint again")
    for fname, size in files.items():
        f = tag_dir / fname
        if not f.is_file():
            raise UserError(f"{f} is missing from the universal checkpoint")
        if f.stat().st_size != size:
            raise UserError(f"{f} has {f.stat().st_size} bytes, {UNIVERSAL_META} says {size}: truncated or "
                            "replaced; convert the checkpoint again")
    if config is None:
        return meta
    expected = {n: tuple(p.shape) for n, p in _skeleton(config).named_parameters()}
    held = {}
    for key, fname in UNIVERSAL_TENSORS.items():
        if fname not in files:
            continue
        held[key] = shapes = _tensor_shapes(tag_dir / fname)
        extra = sorted(set(shapes) - set(expected))
        missing = sorted(set(expected) - set(shapes)) if key == "fp32" else []
        wrong = sorted(n for n in set(shapes) & set(expected) if shapes[n] != expected[n])
        if extra or missing or wrong:
            raise UserError(f"{tag_dir / fname} does not match the model in model_config.json: missing "
                            f"{missing[:3]}, unexpected {extra[:3]}, other shapes {wrong[:3]}")
    uncovered = sorted(n for n in expected if n not in held.get(MUON_MOMENTUM, {})
                       and not all(n in held.get(k, {}) for k in MOMENTS))
    if uncovered:
        raise UserError(f"{tag_dir} holds no optimizer state for {uncovered[:3]}: convert the checkpoint again")
    return meta


def _tensor_shapes(path: Path) -> dict[str, tuple]:
    """Names and shapes from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own errors: bad header, short file
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # changed since check_universal looked at it
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_universal_weights(tag_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Only the fp32 weights of a universal folder (inference, export)."""
    check_universal(tag_dir, config)
    return _read_tensors(Path(tag_dir) / UNIVERSAL_TENSORS["fp32"])


def read_universal(tag_dir: Path, config: ModelConfig) -> TrainingState:
    tag_dir = Path(tag_dir)
    files = check_universal(tag_dir, config)["files"]
    params = _read_tensors(tag_dir / UNIVERSAL_TENSORS["fp32"])
    moments = {k: _read_tensors(tag_dir / f) for k, f in UNIVERSAL_TENSORS.items() if k != "fp32" and f in files}
    rest = load_weights_only(tag_dir / UNIVERSAL_STATE)
    if not isinstance(rest, dict) or not set(moments.get(MOMENTS[0], {})) <= set(rest.get("steps", {})):
        raise UserError(f"{tag_dir / UNIVERSAL_STATE} does not hold a step count for every AdamW parameter")
    return TrainingState(params=params, moments=moments, steps=rest["steps"],
                         lr_scheduler=rest.get("lr_scheduler") or {}, counters=rest.get("counters") or {},
                         client=rest.get("client") or {})


def convert_to_universal(ckpt: Path, out: Path, tag: str | None = None) -> Path:
    """CKPT (any layout) -> OUT, a checkpoint folder holding the universal form under the same tag, with
    model_config.json and tokenizer/; written under tmp-<tag> and renamed, so OUT never holds half of it."""
    from megatron_lite.checkpoint.load import _resolve_tag_dir
    from megatron_lite.checkpoint.save import _commit, _replace_dir, _save_model_config

    root, tag_dir = _resolve_tag_dir(Path(ckpt), tag)
    config = ModelConfig.load(root)
    state = read_training_state(tag_dir, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{TMP_PREFIX}{tag_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_universal(state, tmp)
        _save_model_config(out, config)
        if (root / "tokenizer").is_dir():
            _replace_dir(out, "tokenizer", lambda dst: shutil.copytree(root / "tokenizer", dst))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(out, tag_dir.name)
    return out / tag_dir.name


FP32_WEIGHTS = "model.safetensors"


def convert_to_fp32(ckpt: Path, out: Path, tag: str | None = None) -> Path:
    """CKPT (any layout, MoE included) -> OUT/model.safetensors: the full fp32 master weights (tp = 1, global
    expert ids: the keys of `GPT(config).state_dict()`), with model_config.json and tokenizer/. The file is
    written under a temporary name and renamed."""
    import os

    from safetensors.torch import save_file

    from megatron_lite.checkpoint.load import _resolve_tag_dir
    from megatron_lite.checkpoint.save import _replace_dir, _save_model_config

    root, tag_dir = _resolve_tag_dir(Path(ckpt), tag)
    config = ModelConfig.load(root)
    params = read_training_state(tag_dir, config).params
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FP32_WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().float().contiguous().clone() for k, v in params.items()}, str(tmp),
                  metadata={"format": "pt", "source": str(tag_dir)})
        fsync_path(tmp)
        _save_model_config(out, config)
        if (root / "tokenizer").is_dir():
            _replace_dir(out, "tokenizer", lambda dst: shutil.copytree(root / "tokenizer", dst))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / FP32_WEIGHTS)
    return out / FP32_WEIGHTS
