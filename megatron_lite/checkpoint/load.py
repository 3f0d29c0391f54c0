"""Read checkpoint folders (layout.py): full state dicts for inference and export, weights into a model of
any tp / ep, the checks training runs before `--load`, and the exact resume of a DeepSpeed engine (on the
layout that saved it through DeepSpeed, on any other through universal.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import (EXPERT_KEY, EXPERT_STATES_FILE, MODEL_STATES_FILE, check_pickle_globals,
                                             expert_key, latest_tag, load_weights_only, model_states_file)
from megatron_lite.checkpoint.lora import merge_adapters, read_lora_record
from megatron_lite.checkpoint.universal import (UNIVERSAL_META, Layout, apply_training_state, check_reshardable,
                                                check_universal, half_without_zero, is_universal, read_training_state,
                                                read_universal_weights, saved_layout, saved_optimizer)
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError


# ---------------------------------------------------------------------------------------------- full state dicts

def _require_folder(path: Path, what: str) -> None:
    if path.is_file():
        raise UserError(f"{what} {path} is a file, not a folder: pass the checkpoint folder that holds it")
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist")


def _resolve_tag_dir(ckpt_dir: Path, tag: str | None) -> tuple[Path, Path]:
    """(folder holding model_config.json, folder holding the mp_rank files)."""
    _require_folder(ckpt_dir, "checkpoint folder")
    # A tag folder itself (CKPT/global_step30) is accepted too; its config sits one level up.
    if tag is None and any(MODEL_STATES_FILE.match(p.name) or p.name == UNIVERSAL_META for p in ckpt_dir.iterdir()):
        return ckpt_dir.parent, ckpt_dir
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            # Name a finished tag folder it holds: that is itself a valid path, for the CLI and the app alike.
            tags = sorted((p.name for p in ckpt_dir.iterdir() if not p.name.startswith("tmp-")
                           and ((p / model_states_file(0)).is_file() or is_universal(p))), key=lambda t: (len(t), t))
            raise UserError(f"{ckpt_dir} has no 'latest' file and no {model_states_file(0)}: " + (
                f"give one of its checkpoints, e.g. {ckpt_dir / tags[-1]}" if tags else
                "not a megatron_lite checkpoint folder"))
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint tag {tag!r} not found in {ckpt_dir}")
    return ckpt_dir, tag_dir


def _read_rank(tag_dir: Path, tp_rank: int, expert_files: dict) -> dict[str, torch.Tensor]:
    states = load_weights_only(tag_dir / model_states_file(tp_rank))
    if not isinstance(states, dict) or "module" not in states:
        raise UserError(f"{tag_dir}/{model_states_file(tp_rank)} has no 'module' state dict")
    sd = dict(states["module"])
    for (_layer, _expert), path in sorted(expert_files.get(tp_rank, {}).items()):
        sd.update(load_weights_only(path))  # keys already carry global expert ids
    return sd


def load_full_state_dict(ckpt_dir: str | Path, tag: str | None = None,
                         merge_lora: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our checkpoint folder -> (config, full single-device state dict of `GPT(config)` with ep = tp = 1).
    A LoRA checkpoint's adapters are merged into the weights (merge_lora=False: peft's names, unmerged)."""
    root, tag_dir = _resolve_tag_dir(Path(ckpt_dir), tag)
    config = ModelConfig.load(root)
    lora = read_lora_record(root) if merge_lora else None
    if is_universal(tag_dir):
        sd = read_universal_weights(tag_dir, config)
        return config, (merge_adapters(sd, lora) if lora else sd)
    ranks = sorted(int(m.group(1)) for p in tag_dir.iterdir() if (m := MODEL_STATES_FILE.match(p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        raise UserError(f"{tag_dir} has model-state files for tp ranks {ranks}, expected 0..tp-1")
    expert_files: dict[int, dict] = {}
    for p in tag_dir.iterdir():
        if m := EXPERT_STATES_FILE.match(p.name):
            expert_files.setdefault(int(m.group(3)), {})[(int(m.group(1)), int(m.group(2)))] = p
    if config.is_moe:
        want = config.num_layers * config.num_experts
        got = len(expert_files.get(0, {}))
        if got != want:
            raise UserError(f"{tag_dir} holds {got} expert files for tp rank 0, expected "
                            f"{config.num_layers} layers x {config.num_experts} experts = {want}")
    shards = [_read_rank(tag_dir, r, expert_files) for r in ranks]
    sd = shards[0] if len(shards) == 1 else _gather_tp(config, shards, tag_dir)
    return config, (merge_adapters(sd, lora) if lora else sd)


def _gather_tp(config: ModelConfig, shards: list[dict], tag_dir: Path) -> dict[str, torch.Tensor]:
    from megatron_lite.model.gpt import GPT
    from megatron_lite.tensor_parallel.reshard import gather_state_dicts, tp_shard_specs

    specs = tp_shard_specs(GPT(config))
    if not specs:
        raise UserError(f"{tag_dir} is a tp={len(shards)} checkpoint but this model has no tensor-parallel "
                        "shard specs; gather it on a megatron_lite version with tensor-parallel layers")
    return gather_state_dicts(shards, specs)


def model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], device="cpu",
                          dtype: torch.dtype | None = None):
    """A GPT in eval mode holding `state_dict` (ep = tp = 1). Missing/unexpected keys are an error."""
    from megatron_lite.model.gpt import GPT

    dtype = dtype or torch.float32
    model = GPT(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise UserError(f"checkpoint does not match its model_config.json: missing {missing[:4]}"
                        f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                        f"{'...' if len(unexpected) > 4 else ''}")
    model.load_state_dict(state_dict)
    model = model.to(device=device, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------- weights into a model

def local_state_dict(full: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Cut a full (tp = ep = 1) state dict down to what `model` holds on this rank: its tensor-parallel
    shard of every split weight and its own experts (global expert ep_rank * n_local + j is local j)."""
    from megatron_lite.tensor_parallel.reshard import shard_state_dict, tp_shard_specs

    if model.tp_size > 1:
        import torch.distributed as dist

        full = shard_state_dict(full, tp_shard_specs(model), dist.get_rank(model.tp_group), model.tp_size)
    if model.ep_size == 1:
        return full
    n_local = model.config.num_experts // model.ep_size
    first = model.ep_rank * n_local
    out = {}
    for k, v in full.items():
        m = EXPERT_KEY.match(k)
        if m is None:
            out[k] = v
        elif first <= int(m["expert"]) < first + n_local:
            out[expert_key(m["layer"], int(m["expert"]) - first, m["param"])] = v
    return out


def load_weights_into(model, path: str | Path, tag: str | None = None) -> None:
    """Load the weights of checkpoint `path` (any tp / ep / ZeRO layout it was saved with) into `model`
    (any tp / ep it was built with). Used before the DeepSpeed engine exists (eval, SFT --pretrained), so
    no optimizer copy of the weights has to be refreshed afterwards."""
    config, full = load_full_state_dict(path, tag)
    if config != model.config:  # (the preset name is not compared)
        raise UserError(f"checkpoint {path} holds a different model than the one being built; "
                        f"see {Path(path) / 'model_config.json'}")
    model.load_state_dict(local_state_dict(full, model))


# ---------------------------------------------------------------------------------------------- training resume

def resolve_load(load: str | None, save: str | None) -> tuple[str | None, str | None]:
    """(the folder to resume from, a note to print): the requeue idiom `--save X --load X`, passed on every
    (re)start of a job, starts from scratch while X holds no complete checkpoint yet; a --load folder other
    than --save must hold one (an empty or missing one is a typo, refused later)."""
    if load is None:
        return None, None
    if Path(load).is_file():
        raise UserError(f"--load {load} is a file, not a checkpoint folder: pass the folder that holds 'latest'")
    if save is None or latest_tag(Path(load)) is not None or Path(load).resolve() != Path(save).resolve():
        return load, None
    return None, f"--load {load}: no checkpoint there yet (it is the --save folder): starting from scratch"


def check_checkpoint_dir(path: str) -> str:
    """The tag `latest` names in `path`, or a one-line error when `path` is not a usable checkpoint."""
    root = Path(path)
    _require_folder(root, "checkpoint folder")
    tag = latest_tag(root)
    if tag is None:
        raise UserError(f"{path} has no 'latest' file: not a megatron_lite checkpoint, or no save finished")
    if not (root / tag / model_states_file(0)).exists() and not is_universal(root / tag):
        raise UserError(f"{path}/latest names {tag!r}, which has no {model_states_file(0)}")
    check_pickle_globals(root / tag)
    return tag


def resume_plan(path: str, config: ModelConfig, dp: int, tp: int, ep: int, ds_config: dict) -> str | None:
    """None when `path`'s latest checkpoint was saved with this run's layout (DeepSpeed's own exact load),
    else the line to print: the training state is resharded from the saved layout to this one (before
    DeepSpeed starts, so what cannot be resharded is one line, not a traceback)."""
    tag_dir = Path(path) / latest_tag(Path(path))
    now = Layout(dp=dp, tp=tp, ep=ep, zero=(ds_config.get("zero_optimization") or {}).get("stage", 0) > 0)
    if is_universal(tag_dir):
        check_universal(tag_dir, config)
        saved = None
    else:
        saved = saved_layout(tag_dir)
        same = saved == now or (half_without_zero(ds_config) and (saved.dp, saved.tp, saved.ep) == (dp, tp, ep))
        if same:
            return None
        check_reshardable(tag_dir)
    source = "a universal checkpoint" if saved is None else f"a checkpoint saved with {saved}"
    if half_without_zero(ds_config):
        raise UserError(f"--load {path}: {source} cannot be resharded into this bf16/fp16 run without ZeRO "
                        f"({now}) yet; resume with the saved layout or a ZeRO config")
    was, now_opt = saved_optimizer(tag_dir), "muon" if ds_config["optimizer"]["type"] == "Muon" else "adamw"
    if was != now_opt:
        raise UserError(f"--load {path}: {source} holds {was} optimizer state, this run uses --optimizer {now_opt}; "
                        f"resume with --optimizer {was}")
    if saved is None:
        return f"--load {path}: universal checkpoint, resharding the training state to {now}"
    return f"--load {path}: resharding the training state from {saved} to {now}"


# The training flag behind each ModelConfig field it sets; the preset (--model) sets the others.
_FIELD_FLAGS = {"vocab_size": "--tokenizer", "num_layers": "--num-layers", "hidden_size": "--hidden-size",
                "num_heads": "--num-heads", "num_kv_heads": "--num-kv-heads", "ffn_hidden_size": "--ffn-hidden-size",
                "num_experts": "--num-experts", "topk": "--topk"}


def check_same_model(path: str, config: ModelConfig) -> None:
    """Exact resume needs the very model of the checkpoint: every field of its model_config.json but the
    preset's name (shapes, and what changes the losses: dropout, router noise, capacity, aux-loss weights)."""
    saved = ModelConfig.load(path)
    if saved != config:
        diff = ", ".join(f"{k} {v} there, {getattr(config, k)} from {_FIELD_FLAGS.get(k, '--model')}"
                         for k, v in saved.to_dict().items() if k != "name" and getattr(config, k) != v)
        raise UserError(f"checkpoint {path} holds a different model than the flags ask for ({diff}); pass the "
                        f"flags it was trained with (see {Path(path) / 'model_config.json'}), or start the new model "
                        f"in another folder")


def load_training_checkpoint(engine, path: str, config: ModelConfig, reshard: tuple[int, int] | None = None) -> dict:
    """Restore a DeepSpeed engine exactly (weights, optimizer, scheduler) from CKPT (`latest`). Returns the
    client state the training loop saved. `reshard` (tp rank, tp size): the checkpoint has another layout
    (`resume_plan`); its layout-free form fills the engine instead of DeepSpeed's loader."""
    tag = check_checkpoint_dir(path)
    check_same_model(path, config)
    if reshard is not None:
        state = read_training_state(Path(path) / tag, config)
        apply_training_state(engine, state, *reshard)
        return state.client
    load_path, client = engine.load_checkpoint(path, tag=tag)
    if load_path is None:
        raise UserError(f"could not load checkpoint {path}/{tag}")
    return client or {}
