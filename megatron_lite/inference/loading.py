"""A model and tokenizer for inference and evaluation from our checkpoint folder or an HF folder."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.checkpoint.load import load_full_state_dict, model_from_state_dict
from megatron_lite.errors import UserError

TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "model_config.json").is_file()


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
    """CKPT folder (ours, any ZeRO/ep layout) or HF Llama/Mixtral/Qwen3 folder -> (plain GPT in eval mode,
    tokenizer). Decoding speed-ups are the caller's choice (`inference.fast_decode`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; give the checkpoint or HF folder, e.g. {path.parent}")
    if is_hf_folder(path):
        from megatron_lite.convert.hf import load_hf_folder
        config, sd = load_hf_folder(path)
    else:
        config, sd = load_full_state_dict(path, tag)
    dtype = parse_dtype(dtype)
    model = model_from_state_dict(config, sd, device, dtype)
    tokenizer = load_tokenizer_for(path)
    if tokenizer is None and require_tokenizer:
        raise UserError(f"no tokenizer found in {path}/tokenizer or {path}; copy the training tokenizer there")
    return model, tokenizer
