"""Conversion to and from stock transformers checkpoints: Llama for dense SwiGLU, Mixtral for MoE.

Our RoPE is HF's rotate_half, so q/k need no permutation and the conversion is a weight-name map:

    ours                                                          HF (model. prefix)
    embed_tokens / norm / lm_head                                 embed_tokens / norm / lm_head (no model.)
    layers.N.{input,post_attention}_layernorm                     layers.N.{input,post_attention}_layernorm
    layers.N.self_attn.{q,k,v,o}_proj                             layers.N.self_attn.{q,k,v,o}_proj
    layers.N.mlp.{gate,up,down}_proj                              layers.N.mlp.{gate,up,down}_proj     (Llama)
    layers.N.mlp.moe.deepspeed_moe.gate.wg                        layers.N.block_sparse_moe.gate       (Mixtral)
    layers.N.mlp.moe.deepspeed_moe.experts.deepspeed_experts.E.   layers.N.block_sparse_moe.experts.E.
        gate_proj / up_proj / down_proj                               w1 / w3 / w2
    layers.N.mlp.moe.deepspeed_moe.gate.w_noise                   (training-only router noise: dropped on
                                                                   export, zeros on import)

Files are what transformers 5.x `save_pretrained` writes and reads: config.json, generation_config.json,
model.safetensors (per-expert Mixtral tensors on disk), plus the tokenizer with its chat template.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import EXPERT_KEY, expert_key
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

_LAYER_RENAMES = [  # (our suffix, HF suffix) inside layers.N.
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    *[(f"self_attn.{p}_proj.{w}", f"self_attn.{p}_proj.{w}") for p in "qkvo" for w in ("weight", "bias")],
    *[(f"mlp.{p}_proj.weight", f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
    ("mlp.moe.deepspeed_moe.gate.wg.weight", "block_sparse_moe.gate.weight"),
]
_EXPERT_RENAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_NOISE = re.compile(r"^layers\.\d+\.mlp\.moe\.deepspeed_moe\.gate\.w_noise\.weight$")


# ---------------------------------------------------------------- config

def check_exportable(cfg: ModelConfig) -> None:
    if cfg.ffn_type != "swiglu":
        raise UserError(f"ffn_type {cfg.ffn_type!r} has no stock transformers class (Llama/Mixtral need "
                        "ffn_type 'swiglu'); this model cannot be exported to HF")
    if cfg.is_moe and cfg.attention_bias:
        raise UserError("Mixtral has no attention biases; an MoE model with attention_bias cannot be exported")


def hf_config_dict(cfg: ModelConfig, tokenizer=None) -> dict:
    """config.json for LlamaForCausalLM (dense) or MixtralForCausalLM (MoE)."""
    check_exportable(cfg)
    d = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "use_cache": True, "dtype": "float32",
    }
    if cfg.is_moe:
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=cfg.num_experts,
                 num_experts_per_tok=cfg.topk, router_aux_loss_coef=cfg.aux_loss_coeff, router_jitter_noise=0.0,
                 output_router_logits=False, sliding_window=None)
    else:
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=cfg.attention_bias,
                 mlp_bias=False, pretraining_tp=1)
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    return d


def config_from_hf(d: dict) -> ModelConfig:
    """config.json of a Llama or Mixtral -> ModelConfig; shapes we cannot represent are refused."""
    kind = d.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise UserError(f"HF model_type {kind!r} is not supported; only 'llama' (dense) and 'mixtral' (MoE)")

    def refuse(cond, what):
        if cond:
            raise UserError(f"this {kind} checkpoint has {what}, which megatron_lite's model does not support")

    refuse(d.get("hidden_act", "silu") != "silu", f"hidden_act {d.get('hidden_act')!r} (need silu)")
    refuse(d.get("mlp_bias", False), "mlp_bias")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    refuse(rope.get("rope_type", rope.get("type", "default")) != "default", f"rope scaling {rope}")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    refuse(head_dim * heads != d["hidden_size"], f"head_dim {head_dim} * heads {heads} != hidden_size")
    max_len = d.get("max_position_embeddings", 2048)
    sw = d.get("sliding_window")
    refuse(sw is not None and sw < max_len, f"sliding window attention ({sw} < {max_len})")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    common = dict(vocab_size=d["vocab_size"], num_layers=d["num_hidden_layers"], hidden_size=d["hidden_size"],
                  num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                  ffn_hidden_size=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
                  rope_theta=float(theta), max_seq_len=max_len,
                  tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  attention_bias=bool(d.get("attention_bias", False)), name=f"hf-{kind}")
    if kind == "mixtral":
        common.update(num_experts=d["num_local_experts"], topk=d["num_experts_per_tok"],
                      aux_loss_coeff=d.get("router_aux_loss_coef", 0.01))
    return ModelConfig(**common)


# ---------------------------------------------------------------- weights

def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    check_exportable(cfg)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        names.update({f"layers.{i}.{o}": f"model.layers.{i}.{h}" for o, h in _LAYER_RENAMES})
    out = {}
    for k, v in sd.items():
        if (m := EXPERT_KEY.match(k)) and (hf_w := _EXPERT_RENAMES.get(m["param"].removesuffix(".weight"))):
            out[f"model.layers.{m['layer']}.block_sparse_moe.experts.{m['expert']}.{hf_w}.weight"] = v
        elif k in names:
            out[names[k]] = v
        elif not _NOISE.match(k):  # everything but the training-only router noise must land somewhere
            raise UserError(f"weight {k} has no HF {'Mixtral' if cfg.is_moe else 'Llama'} counterpart")
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    back = {f"model.layers.{{i}}.{h}": f"layers.{{i}}.{o}" for o, h in _LAYER_RENAMES}
    inv_expert = {v: k for k, v in _EXPERT_RENAMES.items()}
    sd = {}
    for k, v in hf.items():
        if k in ("model.embed_tokens.weight", "model.norm.weight"):
            sd[k[len("model."):]] = v
        elif k == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[k] = v
        elif m := _HF_EXPERT.match(k):
            layer, e, w = m.groups()
            sd[expert_key(layer, e, f"{inv_expert[w]}.weight")] = v
        elif m := re.match(r"^model\.layers\.(\d+)\.(.+)$", k):
            ours = back.get("model.layers.{i}." + m.group(2))
            if ours is None:
                raise UserError(f"HF weight {k} has no megatron_lite counterpart")
            sd[ours.format(i=m.group(1))] = v
        elif k.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise UserError(f"HF weight {k} has no megatron_lite counterpart")
    if cfg.is_moe and cfg.router_noise:
        for i in range(cfg.num_layers):
            sd[f"layers.{i}.mlp.moe.deepspeed_moe.gate.w_noise.weight"] = torch.zeros(cfg.num_experts, cfg.hidden_size)
    if not cfg.tie_embeddings and "lm_head.weight" not in sd:
        raise UserError("HF checkpoint has tie_word_embeddings false but no lm_head.weight")
    return sd


# ---------------------------------------------------------------- folders

def save_hf_folder(out_dir: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], tokenizer=None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer to `out_dir`."""
    from safetensors.torch import save_file

    hf_sd = to_hf_state_dict(cfg, sd)
    if dtype is not None:
        hf_sd = {k: v.to(dtype) for k, v in hf_sd.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = hf_config_dict(cfg, tokenizer)
    conf["dtype"] = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
    conf["transformers_version"] = _transformers_version()
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    gen = {"do_sample": False}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        gen.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # safetensors refuses tensors that share storage; clone each to its own buffer.
    save_file({k: v.clone().contiguous() for k, v in hf_sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise UserError(f"{hf_dir} has no model.safetensors (or sharded index); only safetensors are read")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_hf_folder(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """HF Llama/Mixtral folder -> (ModelConfig, our full state dict)."""
    hf_dir = Path(hf_dir)
    try:
        conf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {hf_dir}/config.json: {e}") from None
    cfg = config_from_hf(conf)
    return cfg, from_hf_state_dict(cfg, load_hf_state_dict(hf_dir))


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "unknown"
