"""LoRA in the checkpoint folder: `CKPT/lora_config.json` and the adapters it describes.

A LoRA run (`launch/sft.py --lora-rank R`) saves the whole model through DeepSpeed as any run does, so
`CKPT` alone is still enough to generate or convert; its state dict holds peft's names for every adapted
linear layer (`<module>.base_layer.weight`, `<module>.lora_A.default.weight`, `<module>.lora_B.default.weight`)
and `lora_config.json` holds what rebuilds or merges them:

    {"format": 1, "rank": R, "alpha": A, "dropout": p, "targets": ["q", ...], "experts": true|false,
     "base": {"path": "PRETRAINED", "fingerprint": "sha256:..."}}

Readers (`checkpoint.load.load_full_state_dict`) merge the adapters into plain weights,
W' = W + (alpha / rank) * B @ A, so every tool sees the plain model. `base.fingerprint` identifies the frozen
model the adapters were trained on (see `base_fingerprint`), which is what an adapter may be applied to.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

LORA_CONFIG_FILE = "lora_config.json"
FORMAT = 1
ADAPTER = "default"  # peft's adapter name; one adapter per model here
# Our short target names -> the module names they adapt (attention and FFN projections; experts included,
# since a DeepSpeed-MoE expert is our SwiGLU with the same projection names).
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
LORA_KEY = re.compile(rf"^(?P<module>.+)\.lora_(?P<ab>[AB])\.{ADAPTER}\.weight$")
BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class LoraRecord:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    experts: bool = False  # whether DeepSpeed-MoE expert projections carry adapters
    base: dict = field(default_factory=dict, compare=False)  # {"path", "fingerprint"}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        return [TARGET_MODULES[t] for t in self.targets]

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none")

    def settings(self) -> dict:
        """What must agree between a run and the checkpoint it resumes (everything but the base's path)."""
        return {k: v for k, v in asdict(self).items() if k != "base"}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self), "targets": list(self.targets)}, indent=2) + "\n"


def read_lora_record(ckpt_root: str | Path) -> LoraRecord | None:
    """The LoRA record of a checkpoint folder (the folder holding model_config.json); None for a plain one."""
    path = Path(ckpt_root) / LORA_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"unknown format (this version reads format {FORMAT})")
        return LoraRecord(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                          dropout=float(d.get("dropout", 0.0)), experts=bool(d.get("experts", False)),
                          base=dict(d.get("base") or {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def base_fingerprint(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of the model config (shapes and behaviour, not the preset's name) and of every weight, in key
    order: two bases agree only if they compute the same function, whatever folder or layout they came from."""
    h = hashlib.sha256(json.dumps({k: v for k, v in config.to_dict().items() if k != "name"},
                                  sort_keys=True).encode())
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def split_adapters(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, tuple]]:
    """A LoRA model's state dict -> (the base weights under the plain model's names,
    {adapted module: (A (rank, in), B (out, rank))})."""
    base, a, b = {}, {}, {}
    for k, v in state_dict.items():
        if m := LORA_KEY.match(k):
            (a if m["ab"] == "A" else b)[m["module"]] = v
        else:
            base[k.replace(BASE_LAYER, ".")] = v
    if set(a) != set(b):
        raise UserError(f"LoRA checkpoint has lora_A without lora_B (or the reverse) for {sorted(set(a) ^ set(b))[:3]}")
    return base, {m: (a[m], b[m]) for m in sorted(a)}


def merge_adapters(state_dict: dict[str, torch.Tensor], record: LoraRecord) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged: W' = W + scale * B @ A, computed in fp32.

    The same sum peft's `LoraLayer.merge` computes, here on the state dict: peft's needs the model built
    first, a full random initialisation for nothing. Tests hold it to peft's unmerged forward."""
    base, adapters = split_adapters(state_dict)
    for module, (a, b) in adapters.items():
        key = f"{module}.weight"
        if key not in base:
            raise UserError(f"LoRA adapter for {module} has no base weight {key} in the checkpoint")
        w = base[key]
        base[key] = (w.float() + record.scale * (b.float() @ a.float())).to(w.dtype)
    return base


def lora_record_for(path: str | Path) -> tuple[Path, LoraRecord | None]:
    """(checkpoint root, its LoRA record or None) for a checkpoint folder or one of its tag folders."""
    path = Path(path)
    root = path if (path / "model_config.json").is_file() or not (path.parent / "model_config.json").is_file() \
        else path.parent
    return root, read_lora_record(root)
