"""Grouped-query causal self-attention with RoPE and an optional KV cache.

RoPE follows the HF Llama `rotate_half` convention (the two halves of each head are the rotation pairs),
so q/k weights convert to `LlamaForCausalLM` by a plain rename, with no permutation.
Backends: flash-attn on CUDA for fp16/bf16 when installed, otherwise torch SDPA.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.tensor_parallel import column_linear, group_size, row_linear

_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
# Fused projections (inference layout) pay off while a step reads weights more than it computes; on long
# prefills the strided q/k/v (gate/up) slices they produce slow the elementwise ops down more than that.
FUSED_MAX_ROWS = 32


def flash_attn_eligible(is_cuda: bool, dtype: torch.dtype, has_mask: bool, installed: bool = _FLASH_ATTN_INSTALLED) -> bool:
    """flash-attn only runs on CUDA in half precision and cannot take an arbitrary mask; else SDPA."""
    return installed and is_cuda and dtype in (torch.float16, torch.bfloat16) and not has_mask


def use_flash_attn(x: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return flash_attn_eligible(x.is_cuda, x.dtype, attn_mask is not None)


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

    Static mode (`write_at` set, a (T,) index tensor; needs keys_transposed): keys/values are written at
    those positions and the whole buffer is returned, so every decode step has the same shapes and
    torch.compile builds one graph (`GPT.decode_step`); the caller's mask hides the positions not yet
    written. The buffers start zeroed because masked-out attention weights are 0 and 0 * (garbage NaN)
    would still be NaN.

    keys_transposed: keys live in (B, n_kv_heads, head_dim, max_len) buffers (`k_t`; `k` holds the
    (B, n_kv, max_len, head_dim) views of them), so the compiled step's query-key products run along
    contiguous cache positions, vectorised without a horizontal sum per score.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, keys_transposed: bool = False):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k_t = None
        if keys_transposed:
            kshape = (batch_size, num_kv_heads, head_dim, max_len)
            self.k_t = [torch.zeros(kshape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.k = [kt.transpose(2, 3) for kt in self.k_t]
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0
        self.write_at: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, n_kv, T, D) keys/values after the cached ones; return all keys/values so far
        (in static mode: at `write_at`, returning the whole buffer)."""
        if self.write_at is not None:
            if self.k_t is None:
                raise ValueError("static mode (write_at) needs KVCache(keys_transposed=True)")
            # only the transposed buffers themselves, never their `k` views, enter the compiled graph: an
            # in-place write through a view (or aliased inputs) makes it copy the whole buffer every step
            self.k_t[layer].index_copy_(3, self.write_at, k.transpose(2, 3))
            self.v[layer].index_copy_(2, self.write_at, v)
            return self.k_t[layer].transpose(2, 3), self.v[layer]
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
        # Inference only (`use_cpu_decode_layout`): q/k/v weights as column blocks of one (in, q+k+v) matrix.
        self.qkv_t: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts are read off the projections so a tensor-parallel shard (fewer local heads) works unchanged.
        if self.qkv_t is not None and B * T <= FUSED_MAX_ROWS:  # decoding: one GEMM instead of three
            q, k, v = (x @ self.qkv_t).split([self.q_proj.out_features, self.k_proj.out_features,
                                              self.v_proj.out_features], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_head, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv, S, D), S = past + T
        dropout = self.dropout if self.training else 0.0

        if T == 1 and kv_cache is not None and kv_cache.write_at is not None and attn_mask is not None:
            y = single_query_attention(q, k, v, attn_mask).reshape(B, 1, -1)  # the compiled decode step
        elif use_flash_attn(x, attn_mask) and (kv_cache is None or kv_cache.length == 0):
            from flash_attn import flash_attn_func  # (B, T, H, D) layout; GQA handled natively
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True)
            y = y.reshape(B, T, -1)
        else:
            # Plain causal masking is only right when queries and keys start at the same position.
            is_causal = attn_mask is None and k.shape[2] == T
            if attn_mask is None and not is_causal and T > 1:  # one new query sees every cached key
                attn_mask = causal_mask(T, k.shape[2], x.device)
            gqa = q.shape[1] != k.shape[1]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                               is_causal=is_causal, enable_gqa=gqa)  # (B, n_head, T, D)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k/v (B, H_kv, S, D) where mask (B, 1, 1, S) is True.

    The query heads sharing a kv head are stacked as rows, so GQA needs no K/V copies. Both products are
    written as broadcast multiply + sum so that inductor fuses them with the masked softmax into one loop
    nest (with `KVCache(keys_transposed=True)` the score sum runs along contiguous positions); at decode
    sizes that beats SDPA's flash kernel, whose tiling is built for long query blocks, and 32-odd tiny
    batched GEMMs, whose per-matrix overhead dominates. Returns (B, H, 1, D).
    """
    B, H, _, D = q.shape
    groups = H // k.shape[1]
    qg = q.reshape(B, k.shape[1], groups, D)
    scores = (qg[..., None] * k.transpose(-1, -2)[:, :, None]).sum(-2) * D ** -0.5  # (B, H_kv, groups, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs[..., None] * v[:, :, None]).sum(-2).reshape(B, H, 1, D)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask where query i (at absolute position kv_len - q_len + i) sees keys <= itself."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(kv_len, device=device)[None, :] <= q_pos
