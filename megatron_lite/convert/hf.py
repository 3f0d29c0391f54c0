"""Conversion to and from stock transformers checkpoints, a weight-name map per architecture:

    dense, plain attention   LlamaForCausalLM      MoE, plain attention   MixtralForCausalLM
    dense, qk_norm           Qwen3ForCausalLM      MoE, qk_norm           Qwen3MoeForCausalLM

Our RoPE is HF's rotate_half, so q/k need no permutation:

    ours (layers.N.)                                   HF (model.layers.N.)
    {input,post_attention}_layernorm                   {input,post_attention}_layernorm
    self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm     the same names
    mlp.{gate,up,down}_proj                            mlp.{gate,up,down}_proj                 (Llama, Qwen3)
    mlp.moe.deepspeed_moe.gate.wg                      block_sparse_moe.gate | mlp.gate        (Mixtral | Qwen3-MoE)
    mlp.moe.deepspeed_moe.experts.deepspeed_experts.E. block_sparse_moe.experts.E.w1/w3/w2 |
        gate_proj / up_proj / down_proj                mlp.experts.E.gate_proj/up_proj/down_proj
    mlp.moe.deepspeed_moe.gate.w_noise                 (training-only router noise: dropped on export, zeros on import)
    embed_tokens / norm / lm_head                      model.embed_tokens / model.norm / lm_head

Files are what transformers 5.x `save_pretrained` writes and reads: config.json, generation_config.json,
model.safetensors (per-expert tensors on disk), plus the tokenizer with its chat template.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import EXPERT_KEY, expert_key
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

_NOISE = re.compile(r"^layers\.\d+\.mlp\.moe\.deepspeed_moe\.gate\.w_noise\.weight$")
_OUR_ROUTER = "mlp.moe.deepspeed_moe.gate.wg.weight"
_COMMON_RENAMES = [  # (our suffix, HF suffix) inside layers.N., the same in every architecture
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    *[(f"self_attn.{p}_proj.{w}", f"self_attn.{p}_proj.{w}") for p in "qkvo" for w in ("weight", "bias")],
    *[(f"self_attn.{p}_norm.weight", f"self_attn.{p}_norm.weight") for p in "qk"],
    *[(f"mlp.{p}_proj.weight", f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
]


@dataclass(frozen=True)
class HFArch:
    """One stock transformers class and where its MoE weights live."""
    architecture: str
    model_type: str
    router: str = ""  # HF suffix of the router weight inside model.layers.N.
    experts: str = ""  # HF prefix of expert E inside model.layers.N., with {e}
    expert_names: dict = field(default_factory=dict)  # our expert projection -> HF name

    def renames(self) -> list[tuple[str, str]]:
        return _COMMON_RENAMES + ([(_OUR_ROUTER, self.router)] if self.router else [])


ARCHS = {
    "llama": HFArch("LlamaForCausalLM", "llama"),
    "qwen3": HFArch("Qwen3ForCausalLM", "qwen3"),
    "mixtral": HFArch("MixtralForCausalLM", "mixtral", "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.",
                      {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen3_moe": HFArch("Qwen3MoeForCausalLM", "qwen3_moe", "mlp.gate.weight", "mlp.experts.{e}.",
                        {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}


def hf_arch(cfg: ModelConfig) -> HFArch:
    return ARCHS[("qwen3" if cfg.qk_norm else "mixtral" if cfg.is_moe else "llama")
                 + ("_moe" if cfg.is_moe and cfg.qk_norm else "")]


# ---------------------------------------------------------------- config

def check_exportable(cfg: ModelConfig) -> None:
    if cfg.ffn_type != "swiglu":
        raise UserError(f"ffn_type {cfg.ffn_type!r} has no stock transformers class (Llama/Mixtral/Qwen3 need "
                        "ffn_type 'swiglu'); this model cannot be exported to HF")
    if cfg.is_moe and cfg.attention_bias and not cfg.qk_norm:
        raise UserError("Mixtral has no attention biases; an MoE model with attention_bias cannot be exported")


def hf_config_dict(cfg: ModelConfig, tokenizer=None) -> dict:
    """config.json of the stock class `hf_arch(cfg)` names."""
    check_exportable(cfg)
    arch = hf_arch(cfg)
    d = {
        "architectures": [arch.architecture], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "use_cache": True, "dtype": "float32",
    }
    if cfg.is_moe:
        d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.topk,
                 router_aux_loss_coef=cfg.aux_loss_coeff, output_router_logits=False, sliding_window=None)
    if arch.model_type == "mixtral":
        d.update(router_jitter_noise=0.0)
    elif arch.model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:  # qwen3, qwen3_moe: combine weights renormalised over the chosen experts, as ours
        d.update(attention_bias=cfg.attention_bias, use_sliding_window=False, sliding_window=None)
        if cfg.is_moe:
            d.update(moe_intermediate_size=cfg.ffn_hidden_size, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[])
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    return d


def config_from_hf(d: dict) -> ModelConfig:
    """config.json of a Llama, Mixtral, Qwen3 or Qwen3-MoE -> ModelConfig; shapes we cannot represent are refused."""
    kind = d.get("model_type")
    if kind not in ARCHS:
        raise UserError(f"HF model_type {kind!r} is not supported; only {', '.join(repr(k) for k in ARCHS)}")

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
    refuse(d.get("use_sliding_window", sw is not None) and sw is not None and sw < max_len,
           f"sliding window attention ({sw} < {max_len})")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    common = dict(vocab_size=d["vocab_size"], num_layers=d["num_hidden_layers"], hidden_size=d["hidden_size"],
                  num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                  ffn_hidden_size=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
                  rope_theta=float(theta), max_seq_len=max_len,
                  tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  attention_bias=bool(d.get("attention_bias", False)), qk_norm=kind.startswith("qwen3"),
                  name=f"hf-{kind}")
    if kind == "qwen3_moe":
        refuse(not d.get("norm_topk_prob", False), "norm_topk_prob false (we renormalise over the chosen experts)")
        refuse(d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1, "dense layers between MoE layers")
        common.update(ffn_hidden_size=d["moe_intermediate_size"])
    if ARCHS[kind].router:
        common.update(num_experts=d.get("num_local_experts") or d["num_experts"], topk=d["num_experts_per_tok"],
                      aux_loss_coeff=d.get("router_aux_loss_coef", 0.01))
    return ModelConfig(**common)


# ---------------------------------------------------------------- weights

def hf_weight_names(cfg: ModelConfig):
    """A function: our weight name -> its HF name; None for the training-only router noise, a UserError for
    a weight with no counterpart."""
    check_exportable(cfg)
    arch = hf_arch(cfg)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        names.update({f"layers.{i}.{o}": f"model.layers.{i}.{h}" for o, h in arch.renames()})

    def hf_name(k: str) -> str | None:
        if (m := EXPERT_KEY.match(k)) and (hf_w := arch.expert_names.get(m["param"].removesuffix(".weight"))):
            return f"model.layers.{m['layer']}.{arch.experts.format(e=m['expert'])}{hf_w}.weight"
        if k in names:
            return names[k]
        if _NOISE.match(k):
            return None
        raise UserError(f"weight {k} has no HF {arch.architecture} counterpart")

    return hf_name


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf_name = hf_weight_names(cfg)
    out = {}
    for k, v in sd.items():
        if (h := hf_name(k)) is not None:  # everything but the training-only router noise lands somewhere
            out[h] = v
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    arch = hf_arch(cfg)
    back = {h: o for o, h in arch.renames()}
    sd = {}
    for k, v in hf.items():
        if k in ("model.embed_tokens.weight", "model.norm.weight"):
            sd[k[len("model."):]] = v
        elif k == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[k] = v
        elif m := re.match(r"^model\.layers\.(\d+)\.(.+)$", k):
            layer, rest = m.groups()
            ours = f"layers.{layer}.{back[rest]}" if rest in back else _our_expert_name(arch, layer, rest)
            if ours is None:
                raise UserError(f"HF weight {k} has no megatron_lite counterpart")
            sd[ours] = v
        elif not k.endswith("rotary_emb.inv_freq"):
            raise UserError(f"HF weight {k} has no megatron_lite counterpart")
    if cfg.is_moe and cfg.router_noise:
        for i in range(cfg.num_layers):
            sd[f"layers.{i}.mlp.moe.deepspeed_moe.gate.w_noise.weight"] = torch.zeros(cfg.num_experts, cfg.hidden_size)
    if not cfg.tie_embeddings and "lm_head.weight" not in sd:
        raise UserError("HF checkpoint has tie_word_embeddings false but no lm_head.weight")
    return sd


def _our_expert_name(arch: HFArch, layer: str, rest: str) -> str | None:
    """Layer N's `block_sparse_moe.experts.3.w1.weight` (HF, inside model.layers.N.) -> our name, else None."""
    head = arch.experts.split("{e}")[0]
    if not arch.experts or not rest.startswith(head):
        return None
    e, _, tail = rest[len(head):].partition(".")
    ours = {h: o for o, h in arch.expert_names.items()}.get(tail.removesuffix(".weight"))
    if not e.isdigit() or ours is None or not tail.endswith(".weight"):
        return None
    return expert_key(layer, e, f"{ours}.weight")


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
    """HF Llama/Mixtral/Qwen3/Qwen3-MoE folder -> (ModelConfig, our full state dict)."""
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
