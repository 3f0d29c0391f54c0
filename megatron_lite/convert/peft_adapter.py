"""A LoRA checkpoint's adapters as a `peft` adapter folder for the stock transformers export of its base:

    DIR/adapter_config.json        peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules, CAUSAL_LM)
    DIR/adapter_model.safetensors  base_model.model.<HF module>.lora_{A,B}.weight, what peft's save_pretrained
                                   writes for the HF class (Llama / Qwen3)

so that `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF export of the base), DIR)` is the
adapter model. The safetensors metadata carry the base's fingerprint (checkpoint/lora.py).

MoE LoRA checkpoints are refused: their adapters always include expert projections (training/lora.py), and
transformers keeps each Mixtral / Qwen3-MoE layer's experts as fused 3-D tensors (`experts.gate_up_proj`,
`experts.down_proj`), not per-expert Linear modules, so peft cannot place a per-module LoRA there; the
merged export carries them instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.checkpoint.lora import LoraRecord, split_adapters
from megatron_lite.config import ModelConfig
from megatron_lite.convert.hf import hf_weight_names
from megatron_lite.errors import UserError

PEFT_PREFIX = "base_model.model."


def check_adapter_exportable(config: ModelConfig, record: LoraRecord, where: str) -> None:
    if record.experts:
        raise UserError(f"--adapter-only: {where} has adapters on MoE expert projections "
                        f"({','.join(t for t in record.targets if t in ('gate', 'up', 'down'))}), which transformers "
                        "stores as fused 3-D expert tensors that peft's LoRA layers cannot target; export the merged "
                        "model instead (drop --adapter-only)")


def peft_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our unmerged LoRA state dict -> peft's saved adapter keys for the HF class of `config`."""
    hf_name = hf_weight_names(config)
    _, adapters = split_adapters(state_dict)
    out = {}
    for module, (a, b) in adapters.items():
        hf_module = PEFT_PREFIX + hf_name(f"{module}.weight").removesuffix(".weight")
        out[f"{hf_module}.lora_A.weight"] = a.detach().contiguous().clone()
        out[f"{hf_module}.lora_B.weight"] = b.detach().contiguous().clone()
    if not out:
        raise UserError("the checkpoint's state dict holds no LoRA adapter weights")
    return out


def save_peft_adapter(out_dir: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      record: LoraRecord, dtype: torch.dtype | None = None) -> Path:
    """Write DIR/adapter_config.json (peft's own writer) and DIR/adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    check_adapter_exportable(config, record, "the checkpoint")
    tensors = peft_state_dict(config, state_dict)  # every check before anything is written
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=record.rank, lora_alpha=record.alpha, lora_dropout=record.dropout,
               target_modules=sorted(record.target_modules), bias="none", task_type="CAUSAL_LM").save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt", "megatron_lite_base_fingerprint": record.base.get("fingerprint", "")})
    return out
