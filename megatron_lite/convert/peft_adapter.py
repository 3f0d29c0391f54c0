"""A LoRA checkpoint's adapters as a `peft` adapter folder for the stock transformers export of its base:

    DIR/adapter_config.json        peft's LoraConfig (r, lora_alpha, target_modules, and for MoE
                                   target_parameters, CAUSAL_LM)
    DIR/adapter_model.safetensors  the lora_{A,B} weights under the keys peft's save_pretrained writes for
                                   the HF class (Llama / Qwen3 / Mixtral / Qwen3-MoE)

so that `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF export of the base), DIR)` is the
adapter model. The safetensors metadata carry the base's fingerprint (checkpoint/lora.py).

MoE: transformers holds a layer's experts as two fused 3-D tensors, `experts.gate_up_proj` (E, 2F, H: every
expert's gate rows, then its up rows) and `experts.down_proj` (E, H, F). peft adapts those through
`target_parameters` (its ParamWrapper): one (A, B) pair per tensor, rank R per expert. Our gate and up
adapters of rank r become one rank-2r adapter of the fused tensor (A stacked, B block-diagonal), so R is r
times the number of {gate, up} targets; every other adapter is padded to R with zero rows and columns and
lora_alpha scaled by R / r, which leaves each delta and its scale alpha / r unchanged. ParamWrapper has no
dropout, so the MoE folder says lora_dropout 0 (dropout only ever acted in training).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import EXPERT_KEY
from megatron_lite.checkpoint.lora import LoraRecord, split_adapters
from megatron_lite.config import ModelConfig
from megatron_lite.convert.hf import hf_config_dict, hf_weight_names
from megatron_lite.errors import UserError

PEFT_PREFIX = "base_model.model."
# transformers' fused expert tensor -> our expert projections in its row order
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def peft_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our unmerged LoRA state dict of a dense model -> peft's saved adapter keys for its HF class."""
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


def moe_rank(record: LoraRecord) -> int:
    return record.rank * max(1, len({"gate", "up"} & set(record.targets)))


def moe_lora_config(record: LoraRecord):
    from peft import LoraConfig

    rank = moe_rank(record)
    fused = [f"experts.{name}" for name, ours in FUSED_EXPERTS.items()
             if {p.removesuffix("_proj") for p in ours} & set(record.targets)]
    attention = [m for m in record.target_modules if m not in ("gate_proj", "up_proj", "down_proj")]
    return LoraConfig(r=rank, lora_alpha=record.alpha * rank / record.rank, lora_dropout=0.0,
                      target_modules=attention or None, target_parameters=fused, bias="none",
                      task_type="CAUSAL_LM")


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) -> the same delta at rank `rank`: A with zero rows, B with zero columns."""
    extra = rank - a.shape[0]
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))


def _fused_expert_adapter(experts: dict, layer: int, fused: str, num_experts: int, rank: int):
    """peft's (A (E*R, in), B (out, R*E)) for one fused tensor of one layer: A's rows expert-major
    (e*R + k), B's columns rank-major (k*E + e), as ParamWrapper reshapes them."""
    a_all, b_all = [], []
    for e in range(num_experts):
        pairs = [experts.get((layer, e, proj)) for proj in FUSED_EXPERTS[fused]]
        like = next(p for p in pairs if p is not None)
        pairs = [p or (like[0][:0], like[1][:, :0]) for p in pairs]  # not targeted: rank 0, zero rows of B
        a, b = _pad(torch.cat([a for a, _ in pairs]), torch.block_diag(*[b for _, b in pairs]), rank)
        a_all.append(a)
        b_all.append(b)
    a = torch.stack(a_all)  # (E, R, in)
    b = torch.stack(b_all)  # (E, out, R)
    return a.reshape(-1, a.shape[-1]).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()


def peft_moe_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                        record: LoraRecord) -> dict[str, torch.Tensor]:
    """Our unmerged LoRA state dict of an MoE model -> peft's saved keys for its HF class. The keys are read
    off peft itself, wrapping the HF class built on the meta device (no weights), so their nesting
    (ParamWrappers around ParamWrappers) is peft's own."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_name = hf_weight_names(config)
    _, adapters = split_adapters(state_dict)
    if not adapters:
        raise UserError("the checkpoint's state dict holds no LoRA adapter weights")
    experts, linear = {}, {}
    for module, (a, b) in adapters.items():
        pair = (a.detach(), b.detach())
        if m := EXPERT_KEY.match(f"{module}.weight"):
            experts[(int(m["layer"]), int(m["expert"]), m["param"].removesuffix(".weight"))] = pair
        else:
            linear[hf_name(f"{module}.weight").removesuffix(".weight")] = pair
    hf_config = hf_config_dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    peft_model = get_peft_model(model, moe_lora_config(record))
    rank, out = moe_rank(record), {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        hf_module = name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(layer, ParamWrapper):
            index = int(re.match(r"model\.layers\.(\d+)\.", hf_module)[1])
            a, b = _fused_expert_adapter(experts, index, layer.parameter_name, config.num_experts, rank)
        else:
            a, b = _pad(*linear[hf_module], rank)
        want = (layer.lora_A["default"].weight.shape, layer.lora_B["default"].weight.shape)
        if (a.shape, b.shape) != want:  # a transformers/peft layout we do not know: refuse, never write wrong
            raise UserError(f"--adapter-only: peft expects {name} lora_A/B of shapes {[tuple(s) for s in want]}, "
                            f"the checkpoint gives {[tuple(a.shape), tuple(b.shape)]}; export the merged model")
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
    return out


def save_peft_adapter(out_dir: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      record: LoraRecord, dtype: torch.dtype | None = None) -> Path:
    """Write DIR/adapter_config.json (peft's own writer) and DIR/adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if record.experts:  # every check before anything is written
        tensors, lora_config = peft_moe_state_dict(config, state_dict, record), moe_lora_config(record)
    else:
        tensors = peft_state_dict(config, state_dict)
        lora_config = LoraConfig(r=record.rank, lora_alpha=record.alpha, lora_dropout=record.dropout,
                                 target_modules=sorted(record.target_modules), bias="none", task_type="CAUSAL_LM")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt", "megatron_lite_base_fingerprint": record.base.get("fingerprint", "")})
    return out
