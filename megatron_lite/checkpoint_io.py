"""Read trained weights back for inference and export: our DeepSpeed checkpoint folders or HF folders.

Checkpoint folder contract (what training writes, DeepSpeed 0.19 layout):
    CKPT/model_config.json              ModelConfig
    CKPT/tokenizer/                     HF fast tokenizer with the ChatML chat template
    CKPT/latest                         text file holding the tag of the newest checkpoint, e.g. global_step30
    CKPT/<tag>/mp_rank_{tp:02d}_model_states.pt
        {"module": state dict without the MoE experts, ...engine bookkeeping}
    CKPT/<tag>/layer_{L}_expert_{E}_mp_rank_{tp:02d}_model_states.pt        (MoE only)
        {"layers.<i>.mlp.moe.deepspeed_moe.experts.deepspeed_experts.<E>.<w>.weight": tensor}
        L counts MoE layers (= decoder layer here), E is the *global* expert id, so the files look the same
        whatever the expert-parallel size of the run that wrote them.
With tp > 1 there is one mp_rank file (and one set of expert files) per tensor-parallel rank; they are
gathered into one full state dict with the specs of `megatron_lite.tensor_parallel.reshard`.

All files are read with `torch.load(weights_only=True)`: DeepSpeed's model-state files hold only tensors,
plain containers and numbers, so no pickle code ever runs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

_MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_EXPERT_STATES = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "model_config.json").is_file()


def _resolve_tag_dir(ckpt_dir: Path, tag: str | None) -> tuple[Path, Path]:
    """(folder holding model_config.json, folder holding the mp_rank files)."""
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist")
    # A tag folder itself (CKPT/global_step30) is accepted too; its config sits one level up.
    if tag is None and any(_MODEL_STATES.match(p.name) for p in ckpt_dir.iterdir()):
        return ckpt_dir.parent, ckpt_dir
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise UserError(f"{ckpt_dir} has no 'latest' file and no mp_rank_00_model_states.pt: "
                            "is this a megatron_lite checkpoint folder? (use --tag to pick one)")
        tag = latest.read_text().strip()
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint tag {tag!r} not found in {ckpt_dir}")
    return ckpt_dir, tag_dir


# Plain numpy arrays and scalars (e.g. RNG states older checkpoints kept in their client state) rebuild
# from a dtype and raw bytes and run no code, so they are allowed; anything else stays refused.
_NUMPY_DATA_GLOBALS = re.compile(r"^numpy(\._core|\.core)\.multiarray\.(_reconstruct|scalar)$|^numpy\.(ndarray|dtype)$"
                                 r"|^numpy\.dtypes\.\w+DType$")


def _numpy_data_types() -> list:
    import numpy as np
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # corrupt/truncated file, or globals beyond the weights-only defaults
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = None
        if names and all(_NUMPY_DATA_GLOBALS.match(n) for n in names):
            try:
                with torch.serialization.safe_globals(_numpy_data_types()):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as second:
                first = second
        what = f"it needs unsafe globals {names}" if names else str(first).splitlines()[0]
        raise UserError(f"cannot read {path} with weights_only=True: {what}") from None


def _read_rank(tag_dir: Path, tp_rank: int, expert_files: dict) -> dict[str, torch.Tensor]:
    states = _torch_load(tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt")
    if not isinstance(states, dict) or "module" not in states:
        raise UserError(f"{tag_dir}/mp_rank_{tp_rank:02d}_model_states.pt has no 'module' state dict")
    sd = dict(states["module"])
    for (_layer, _expert), path in sorted(expert_files.get(tp_rank, {}).items()):
        sd.update(_torch_load(path))  # keys already carry global expert ids
    return sd


def load_full_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our checkpoint folder -> (config, full single-device state dict of `GPT(config)` with ep = tp = 1)."""
    root, tag_dir = _resolve_tag_dir(Path(ckpt_dir), tag)
    config = ModelConfig.load(root)
    ranks = sorted(int(m.group(1)) for p in tag_dir.iterdir() if (m := _MODEL_STATES.match(p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        raise UserError(f"{tag_dir} has model-state files for tp ranks {ranks}, expected 0..tp-1")
    expert_files: dict[int, dict] = {}
    for p in tag_dir.iterdir():
        if m := _EXPERT_STATES.match(p.name):
            expert_files.setdefault(int(m.group(3)), {})[(int(m.group(1)), int(m.group(2)))] = p
    if config.is_moe:
        want = config.num_layers * config.num_experts
        got = len(expert_files.get(0, {}))
        if got != want:
            raise UserError(f"{tag_dir} holds {got} expert files for tp rank 0, expected "
                            f"{config.num_layers} layers x {config.num_experts} experts = {want}")
    shards = [_read_rank(tag_dir, r, expert_files) for r in ranks]
    if len(shards) == 1:
        return config, shards[0]
    return config, _gather_tp(config, shards, tag_dir)


def _gather_tp(config: ModelConfig, shards: list[dict], tag_dir: Path) -> dict[str, torch.Tensor]:
    from megatron_lite.model.gpt import GPT
    from megatron_lite.tensor_parallel.reshard import gather_state_dicts, tp_shard_specs

    specs = tp_shard_specs(GPT(config))
    if not specs:
        raise UserError(f"{tag_dir} is a tp={len(shards)} checkpoint but this model has no tensor-parallel "
                        "shard specs; gather it on a megatron_lite version with tensor-parallel layers")
    return gather_state_dicts(shards, specs)


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], device="cpu",
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


_EXPERT_KEY = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


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
        m = _EXPERT_KEY.fullmatch(k)
        if m is None:
            out[k] = v
        elif first <= int(m.group(2)) < first + n_local:
            out[f"{m.group(1)}{int(m.group(2)) - first}{m.group(3)}"] = v
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


def load_tokenizer_for(path: str | Path):
    """The tokenizer stored beside a checkpoint (CKPT/tokenizer) or inside an HF folder; None if absent."""
    path = Path(path)
    for cand in (path / "tokenizer", path, path.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer
            try:
                return AutoTokenizer.from_pretrained(str(cand))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load tokenizer from {cand}: {str(e).splitlines()[0]}") from None
    return None


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
               tag: str | None = None, require_tokenizer: bool = True):
    """CKPT folder (ours, any ZeRO/ep layout) or HF Llama/Mixtral folder -> (plain GPT in eval mode, tokenizer)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if is_hf_folder(path):
        from megatron_lite.convert.hf import load_hf_folder
        config, sd = load_hf_folder(path)
    else:
        config, sd = load_full_state_dict(path, tag)
    dtype = parse_dtype(dtype)
    model = build_model(config, sd, device, dtype)
    tokenizer = load_tokenizer_for(path)
    if tokenizer is None and require_tokenizer:
        raise UserError(f"no tokenizer found in {path}/tokenizer or {path}; copy the training tokenizer there")
    return model, tokenizer


def save_checkpoint_folder(out_dir: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                           tokenizer=None, tag: str = "global_step0") -> Path:
    """Write a full state dict in the DeepSpeed layout above (tp = 1), so training can `--load`/`--pretrained`
    it and every reader here accepts it. Experts go to their per-(layer, expert) files as DeepSpeed writes them."""
    out = Path(out_dir)
    tag_dir = out / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    expert_key = re.compile(r"^layers\.(\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")
    module, experts = {}, {}
    for k, v in state_dict.items():
        v = v.detach().contiguous().clone()
        if m := expert_key.match(k):
            experts.setdefault((int(m.group(1)), int(m.group(2))), {})[k] = v
        else:
            module[k] = v
    torch.save({"module": module, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
                "mp_world_size": 1, "num_experts": [config.num_experts] * config.num_layers if config.is_moe else 1,
                "buffer_names": []}, tag_dir / "mp_rank_00_model_states.pt")
    for (layer, e), sd in experts.items():
        torch.save(sd, tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
    (out / "latest").write_text(tag)
    config.save(out / "model_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


__all__ = ["load_model", "load_full_state_dict", "build_model", "save_checkpoint_folder", "load_tokenizer_for",
           "is_hf_folder", "parse_dtype", "DTYPES", "read_json"]
