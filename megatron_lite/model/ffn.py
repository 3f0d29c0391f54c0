"""Position-wise feed-forward blocks: SwiGLU (Llama/Mixtral) or the plain 4x SiLU MLP with biases."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.tensor_parallel import column_linear, row_linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names match Llama's `mlp.{gate,up,down}_proj` for a rename-only export."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp_group=None):
        super().__init__()
        # tensor parallel: gate/up split the hidden dim (column), down sums the partial outputs (row)
        self.gate_proj = column_linear(hidden_size, ffn_hidden_size, False, tp_group)
        self.up_proj = column_linear(hidden_size, ffn_hidden_size, False, tp_group)
        self.down_proj = row_linear(ffn_hidden_size, hidden_size, False, tp_group)
        self.down_proj.is_output_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SiLUMLP(nn.Module):
    """fc2(silu(fc1(x))) with biases: the original mini-llm FFN (no stock HF class matches it)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp_group=None):
        super().__init__()
        self.fc1 = column_linear(hidden_size, ffn_hidden_size, True, tp_group)
        self.fc2 = row_linear(ffn_hidden_size, hidden_size, True, tp_group)
        self.fc2.is_output_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def build_ffn(config: ModelConfig, tp_group=None) -> nn.Module:
    cls = SwiGLU if config.ffn_type == "swiglu" else SiLUMLP
    return cls(config.hidden_size, config.ffn_hidden_size, tp_group)
