"""Grouped-query causal self-attention with RoPE and an optional KV cache.

RoPE follows the HF Llama `rotate_half` convention (the two halves of each head are the rotation pairs),
so q/k weights convert to `LlamaForCausalLM` by a plain rename, with no permutation.
Backends: flash-attn on CUDA for fp16/bf16 when installed, otherwise torch SDPA.
Packed sequences (several documents per row, `document_ids`) attend block-diagonal-causally: with
flash-attn's varlen kernel over the documents' cu_seqlens where flash-attn is eligible, else through SDPA
with the boolean mask `document_mask` builds.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.model.norm import RMSNorm
from megatron_lite.tensor_parallel import column_linear, group_size, row_linear

_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def flash_attn_eligible(is_cuda: bool, dtype: torch.dtype, has_mask: bool, installed: bool = _FLASH_ATTN_INSTALLED) -> bool:
    """flash-attn only runs on CUDA in half precision and cannot take an arbitrary mask; else SDPA."""
    return installed and is_cuda and dtype in (torch.float16, torch.bfloat16) and not has_mask


def use_flash_attn(x: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return flash_attn_eligible(x.is_cuda, x.dtype, attn_mask is not None)


@dataclass
class Documents:
    """Packed rows as flash-attn's varlen kernel wants them: the flattened (B*T) tokens cut into runs.

    cu_seqlens: int32 (n_runs + 1,) start offsets of each run of equal document id (a row boundary
    always starts a new run), then B*T; max_seqlen: an upper bound on a run's length (T, so no host sync).
    """
    cu_seqlens: torch.Tensor
    max_seqlen: int


def documents(document_ids: torch.Tensor) -> Documents:
    """(B, T) document ids -> the runs of equal ids, row by row."""
    B, T = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::T] = True
    idx = torch.nonzero(starts).flatten()
    end = torch.tensor([B * T], device=flat.device, dtype=idx.dtype)
    return Documents(torch.cat([idx, end]).to(torch.int32), T)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> boolean (B, 1, T, T) mask: query i sees keys j <= i of its own document."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None] & causal


def packed_attention_inputs(document_ids: torch.Tensor, is_cuda: bool, dtype: torch.dtype,
                            installed: bool = _FLASH_ATTN_INSTALLED) -> Documents | torch.Tensor:
    """What the layers attend with for packed rows: varlen runs where flash-attn runs, else the SDPA mask."""
    if flash_attn_eligible(is_cuda, dtype, has_mask=False, installed=installed):
        return documents(document_ids)
    return document_mask(document_ids)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for the given positions: (B, T) -> two (B, 1, T, head_dim) tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    Buffers are (B, n_kv_heads, max_len, head_dim); `length` is the number of positions already filled.
    The model advances `length` after every forward so all layers write at the same offset.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, n_kv, T, D) keys/values after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        if self.length == 0:  # the prompt: attend to the fresh (contiguous) tensors, not strided cache slices
            return k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp_group=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        h, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
        # Tensor parallel: each rank owns a contiguous block of q heads and the kv heads that block uses
        # (column-parallel q/k/v), and o sums the ranks' partial outputs (row-parallel). With tp_group None
        # these are the plain nn.Linear layers.
        tp = group_size(tp_group)
        if config.num_kv_heads % tp:
            raise ValueError(f"num_kv_heads {config.num_kv_heads} is not divisible by tp {tp}")
        bias = config.attention_bias
        self.q_proj = column_linear(h, h, bias, tp_group)
        self.k_proj = column_linear(h, kv_dim, bias, tp_group)
        self.v_proj = column_linear(h, kv_dim, bias, tp_group)
        self.o_proj = row_linear(h, h, bias, tp_group)
        self.o_proj.is_output_projection = True  # gets the depth-scaled init
        self.q_norm = self.k_norm = None
        if config.qk_norm:  # one per-head weight for all heads, whichever tensor-parallel rank holds them
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, shared_over=tp_group)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, shared_over=tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | Documents | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.heads(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv, S, D), S = past + T
        y = self.attend(q, k, v, attn_mask)  # (B, T, n_head * D)
        return self.o_proj(y)

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, C) -> q (B, n_head, T, D), k and v (B, n_kv, T, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        # Head counts come from the projections' widths, so a tensor-parallel shard (fewer local heads) works unchanged.
        q, k = q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, -1, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q (B, T, n_head * D), k and v (B, T, n_kv * D)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | Documents | None) -> torch.Tensor:
        """q (B, n_head, T, D) over k/v (B, n_kv, S, D), the last T keys being the queries' own -> (B, T, n_head * D).

        attn_mask: None (causal), a boolean (B, 1, T, S) mask, True where a query may see a key, or
        `Documents` (packed rows, no cache: causal within each run, flash-attn's varlen kernel).
        """
        B, _, T, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        if isinstance(attn_mask, Documents):
            from flash_attn import flash_attn_varlen_func  # (total, H, D) layout; GQA handled natively
            q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]) for t in (q, k, v))
            cu, m = attn_mask.cu_seqlens, attn_mask.max_seqlen
            y = flash_attn_varlen_func(q, k, v, cu, cu, m, m, dropout_p=dropout, causal=True)
            return y.reshape(B, T, -1)
        if use_flash_attn(q, attn_mask) and k.shape[2] == T:
            from flash_attn import flash_attn_func  # (B, T, H, D) layout; GQA handled natively
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True)
            return y.reshape(B, T, -1)
        # Plain causal masking is only right when queries and keys start at the same position.
        is_causal = attn_mask is None and k.shape[2] == T
        if attn_mask is None and not is_causal and T > 1:  # new queries after cached keys
            attn_mask = causal_mask(T, k.shape[2], q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                                           enable_gqa=q.shape[1] != k.shape[1])  # (B, n_head, T, D)
        return y.transpose(1, 2).reshape(B, T, -1)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask where query i (at absolute position kv_len - q_len + i) sees keys <= itself."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(kv_len, device=device)[None, :] <= q_pos
