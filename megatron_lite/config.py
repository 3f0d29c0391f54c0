"""Model configuration: one dataclass for MiniLLM (dense) and MiniMoE, named presets, JSON round trip.

The config is saved as `model_config.json` beside every checkpoint so a checkpoint is self-describing:
conversion, evaluation and chat rebuild the model from it without any training flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_lite.errors import UserError

# Label value that carries no loss (user turns, padding): the ignore_index of torch's cross entropy.
IGNORE_INDEX = -100
FFN_TYPES = ("swiglu", "mlp")
AUX_LOSS_TYPES = ("switch", "kl_uniform")


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    ffn_hidden_size: int = 704
    ffn_type: str = "swiglu"  # "swiglu" (Llama/Mixtral) or "mlp" (4x, SiLU, with biases)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tie_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3; exports as Qwen3 classes)
    dropout: float = 0.0
    init_std: float = 0.02
    # --- Mixture of Experts (num_experts == 0 means a dense model) ---
    num_experts: int = 0
    topk: int = 2
    router_noise: bool = True  # learned noise on the router logits while training (Shazeer et al. 2017)
    aux_loss_type: str = "switch"  # "switch": E * sum_i f_i * P_i ; "kl_uniform": KL(uniform || mean P)
    aux_loss_coeff: float = 0.01
    router_z_loss_coeff: float = 0.0
    capacity_factor: float = 1.25  # expert capacity while training, relative to a perfectly even split
    eval_capacity_factor: float = 2.0  # handed to DeepSpeed's gate; unused, since inference never drops tokens
    min_capacity: int = 4
    drop_tokens: bool = True  # while training; at inference no token is ever dropped (as in Mixtral)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise UserError(f"invalid model config ({self.name}): {msg}")

        need(self.hidden_size % self.num_heads == 0, f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        need(0 < self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
             f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        need(self.ffn_type in FFN_TYPES, f"ffn_type {self.ffn_type!r} is not one of {FFN_TYPES}")
        need(self.aux_loss_type in AUX_LOSS_TYPES, f"aux_loss_type {self.aux_loss_type!r} is not one of {AUX_LOSS_TYPES}")
        need(self.num_experts >= 0, "num_experts must be >= 0")
        if self.is_moe:
            need(1 <= self.topk <= self.num_experts, f"topk {self.topk} must be in [1, num_experts={self.num_experts}]")
        need(self.vocab_size > 0 and self.num_layers > 0 and self.max_seq_len > 0, "sizes must be positive")

    # ------------------------------------------------------------------ parameter count
    def num_params(self, active_only: bool = False) -> int:
        """Exact parameter count of the model this config builds (tied head counted once).

        active_only counts only the experts a token passes through (topk of num_experts)."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv_dim * 2  # q, o + k, v
        if self.attention_bias:
            attn += h * 2 + kv_dim * 2
        if self.ffn_type == "swiglu":
            ffn = 3 * h * self.ffn_hidden_size
        else:
            ffn = 2 * h * self.ffn_hidden_size + self.ffn_hidden_size + h
        if self.is_moe:
            n = self.topk if active_only else self.num_experts
            ffn = n * ffn + h * self.num_experts * (2 if self.router_noise else 1)
        per_layer = attn + ffn + 2 * h + (2 * self.head_dim if self.qk_norm else 0)  # RMSNorm weights
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return emb + self.num_layers * per_layer + h  # final norm

    def muon_params(self) -> int:
        """Parameters Muon trains (training.engine.tag_muon_params): the layers' weight matrices, attention
        q/k/v/o and every FFN or expert matrix; not the router, norms, biases, embedding or head."""
        h, f = self.hidden_size, self.ffn_hidden_size
        ffn = (3 if self.ffn_type == "swiglu" else 2) * h * f * max(1, self.num_experts)
        return self.num_layers * (h * h * 2 + h * self.num_kv_heads * self.head_dim * 2 + ffn)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config has unknown fields {unknown}; was it written by a newer megatron_lite?")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "model_config.json"
        if not path.exists():
            raise UserError(f"no model config at {path}: is this a megatron_lite checkpoint folder?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"model config {path} is not valid JSON: {e}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def pad_vocab_size(n: int, multiple: int = 64) -> int:
    """Round the tokenizer's vocabulary up so embedding shards and GEMMs stay aligned (as Megatron does)."""
    return int(math.ceil(n / multiple) * multiple)


# Named presets. Parameter counts: tiny ~3.6M and tiny-moe ~8.8M total (each with its own output head), small ~25M,
# mini-llm ~171M, mini-moe ~876M total (tied embeddings). tiny is shallow and narrow because on the main job's
# minutes of CPU more steps of a smaller model beat fewer of a larger one (benchmarks/results.md).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=6400, num_layers=3, hidden_size=192, num_heads=6, num_kv_heads=2,
                 ffn_hidden_size=512, max_seq_len=512, qk_norm=True, tie_embeddings=False),
    "tiny-moe": dict(vocab_size=6400, num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4,
                     ffn_hidden_size=384, max_seq_len=512, num_experts=4, topk=2, tie_embeddings=False),
    "small": dict(vocab_size=8192, num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4,
                  ffn_hidden_size=1216, max_seq_len=1024),
    "mini-llm": dict(vocab_size=32000, num_layers=12, hidden_size=1024, num_heads=16, num_kv_heads=8,
                     ffn_hidden_size=2752, max_seq_len=2048),
    "mini-moe": dict(vocab_size=32000, num_layers=12, hidden_size=1024, num_heads=16, num_kv_heads=8,
                     ffn_hidden_size=2752, max_seq_len=2048, num_experts=8, topk=4),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "name": name, **overrides})
