"""CPU decoding speed-ups, applied from outside the plain model (which never knows about them).

Decoding a few rows at a time is a chain of matrix-vector products that each read a weight once from memory,
plus many tiny element-wise ops. Two swap-ins attack those costs:

* `use_decode_layout(model)`: the weight layout for matrix-vector products. A weight W (out, in) stored
  column-major makes `x @ W.T` the plain "NN" GEMM, which streams weights faster than the "NT" GEMM that
  nn.Linear's row-major default gets; q/k/v (and SwiGLU gate/up) become column blocks of one matrix, so a
  decode-sized input runs one larger GEMM instead of three (two). Attention and SwiGLU modules change class
  to subclasses that only override the projection; parameters, their values and state-dict names stay.
  MoE layers skip the router's balancing loss (`DecodeMoE`), which generation never reads.
* `compile_decoder(model)`: every decode step becomes one `torch.compile`d graph (`DecodeStep`) over a static
  cache (`StaticKVCache`): the cache length is the graph's one dynamic dimension, so there is one graph per
  batch size, whatever the prompt and reply lengths (`warm_up` compiles it ahead of the first request; a
  compile takes a minute or more on a 2-core CPU, far too long to pay inside a request). Inside it the
  single query attends by broadcast multiply + sum (fused by inductor with the masked softmax), RoPE comes
  from a table, MoE layers run every expert with the unchosen ones weighted 0 (static shapes), and the
  greedy argmax is computed in the graph.

Both are for inference only (training, optimizers and ZeRO expect contiguous, unfused parameters) and give
the plain model's greedy tokens (tested). GPU models are left as they are. Measurements:
benchmarks/results.md ("Decoding").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.errors import UserError
from megatron_lite.model.attention import Attention, KVCache, rope_cos_sin
from megatron_lite.model.ffn import SwiGLU
from megatron_lite.model.moe import MoEFeedForward

# Fused projections pay off while a step reads weights more than it computes; on long prefills the strided
# q/k/v (gate/up) slices they produce slow the element-wise ops down more than that.
FUSED_MAX_ROWS = 32
# The compiled step's cache holds whole blocks of this many positions.
CACHE_BLOCK = 64


# ---------------------------------------------------------------- weight layout (eager and compiled)

class FusedQKVAttention(Attention):
    """Attention whose q/k/v weights are column blocks of one (in, q+k+v) matrix `qkv_t`."""
    qkv_t: torch.Tensor

    def project_qkv(self, x: torch.Tensor):
        if x.shape[0] * x.shape[1] > FUSED_MAX_ROWS:
            return super().project_qkv(x)
        return (x @ self.qkv_t).split([self.q_proj.out_features, self.k_proj.out_features,
                                       self.v_proj.out_features], dim=-1)


class FusedSwiGLU(SwiGLU):
    """SwiGLU whose gate/up weights are column blocks of one (in, 2 * ffn) matrix `gate_up_t`."""
    gate_up_t: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > FUSED_MAX_ROWS * x.shape[-1]:
            return super().forward(x)
        gate, up = (x @ self.gate_up_t).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecodeMoE(MoEFeedForward):
    """MoE layer for generation: the eval forward's expert outputs, without the router's balancing loss, which
    only training reads and which costs a dozen small ops per layer and step."""

    def forward(self, x: torch.Tensor):
        if self.training or self.moe.ep_size != 1:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])  # (S, C)
        _, chosen, weights = self.gate.route(flat)
        out = self.mix_experts(flat, chosen, weights, chosen.unique().tolist())  # unique: sorted, as eval's
        return out.to(x.dtype).view_as(x), None, None  # no aux loss: the model then reports no expert counts


def use_decode_layout(model: nn.Module) -> nn.Module:
    """Lay a CPU model's weights out for decoding (in place; values and names unchanged). Returns the model."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        if type(module) is Attention and (fused := _fuse_columns(module.q_proj, module.k_proj, module.v_proj)) is not None:
            module.__class__, module.qkv_t = FusedQKVAttention, fused
        elif type(module) is SwiGLU and (fused := _fuse_columns(module.gate_proj, module.up_proj)) is not None:
            module.__class__, module.gate_up_t = FusedSwiGLU, fused
        elif type(module) is MoEFeedForward:
            module.__class__ = DecodeMoE
    for param in model.parameters():
        if param.dim() == 2 and param.is_contiguous():
            param.data = param.data.t().contiguous().t()
    return model


def _fuse_columns(*linears) -> torch.Tensor | None:
    """(in, sum of outs) contiguous matrix whose column blocks become the linears' weights (as views, so
    the parameters and this matrix share memory and a later load_state_dict updates both)."""
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None  # biases or tensor-parallel shards: keep the separate projections
    fused = torch.cat([m.weight.detach().t() for m in linears], dim=1).contiguous()
    start = 0
    for m in linears:
        m.weight.data = fused[:, start:start + m.out_features].t()
        start += m.out_features
    return fused


# ---------------------------------------------------------------- the compiled step

class StaticKVCache(KVCache):
    """A KVCache whose decode steps write at `write_at` and return the whole buffer (fixed shapes).

    Keys live in (B, n_kv, head_dim, max_len) buffers `k_t` (`k` holds their (B, n_kv, max_len, head_dim)
    views, which the eager prefill writes through), so the compiled step's query-key products run along
    contiguous cache positions. Buffers start zeroed: masked-out attention weights are 0, and 0 * (garbage
    NaN) would still be NaN.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, 0, dtype, device)
        self.k_t = [torch.zeros((batch_size, num_kv_heads, head_dim, max_len), dtype=dtype, device=device)
                    for _ in range(num_layers)]
        self.k = [kt.transpose(2, 3) for kt in self.k_t]
        self.v = [torch.zeros((batch_size, num_kv_heads, max_len, head_dim), dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.max_len = max_len

    def write_step(self, layer: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one step's (B, n_kv, 1, D) keys/values at position `at` (a (1,) tensor); return the buffers."""
        # only the transposed buffers themselves, never their `k` views, enter the compiled graph: an
        # in-place write through a view (or aliased inputs) makes it copy the whole buffer every step
        self.k_t[layer].index_copy_(3, at, k.transpose(2, 3))
        self.v[layer].index_copy_(2, at, v)
        return self.k_t[layer].transpose(2, 3), self.v[layer]


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k/v (B, H_kv, S, D) where mask (B, 1, 1, S) is True.

    The query heads sharing a kv head are stacked as rows, so GQA needs no K/V copies. Both products are
    broadcast multiply + sum so that inductor fuses them with the masked softmax into one loop nest; at
    decode sizes that beats SDPA's flash kernel, whose tiling is built for long query blocks, and dozens of
    tiny batched GEMMs, whose per-matrix overhead dominates. Returns (B, H, 1, D).
    """
    B, H, _, D = q.shape
    groups = H // k.shape[1]
    qg = q.reshape(B, k.shape[1], groups, D)
    scores = (qg[..., None] * k.transpose(-1, -2)[:, :, None]).sum(-2) * D ** -0.5  # (B, H_kv, groups, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs[..., None] * v[:, :, None]).sum(-2).reshape(B, H, 1, D)


def all_experts_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """MoE output with shapes fixed by the input's alone: every expert runs on every token and the unchosen
    ones are weighted by exactly 0, so the graph has no data-dependent indexing; the sum adds the chosen
    experts' outputs in the same order as the sparse dispatch, hence the same values. Costs E/k times the
    expert FLOPs, so it serves decode-sized inputs only, where reading the weights dominates."""
    flat = x.reshape(-1, x.shape[-1])  # (S, C)
    logits, chosen, weights = moe.gate.route(flat)
    dense = torch.zeros_like(logits).scatter(1, chosen, weights)  # (S, E)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    for e, expert in enumerate(moe.local_experts):
        out = out + expert(flat).float() * dense[:, e, None]
    return out.to(x.dtype).view_as(x)


class DecodeStep(nn.Module):
    """One token per row against a StaticKVCache: the function `compile_decoder` compiles.

    Wraps the plain model (same parameters) and a (2, max_seq_len, head_dim) cos/sin table of every position.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        p, cfg = model.embed_tokens.weight, model.config
        cos, sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=p.device)[None], cfg.head_dim, cfg.rope_theta,
                                p.dtype)  # (1, 1, max_seq_len, head_dim) each
        self.register_buffer("rope_table", torch.stack([cos[0, 0], sin[0, 0]]), persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor, at: torch.Tensor,
                cache: StaticKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, position_ids: (B, 1); allowed: (B, L) bool, False at cache positions a row must never see
        (its prompt padding); at: (1,) the cache position written now (later ones are hidden).
        Returns the (B, vocab) fp32 logits and their (B,) argmax, the greedy pick."""
        m = self.model
        x = m.embed_tokens(input_ids)  # (B, 1, C)
        cos, sin = self.rope_table[0][position_ids][:, None], self.rope_table[1][position_ids][:, None]  # (B, 1, 1, D)
        cache_pos = torch.arange(allowed.shape[1], device=allowed.device)
        mask = (allowed & (cache_pos <= at))[:, None, None, :]  # (B, 1, 1, L)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = attn.heads(layer.input_layernorm(x), cos, sin)  # (B, n_head | n_kv, 1, D)
            k, v = cache.write_step(i, at, k, v)  # (B, n_kv, L, D)
            x = x + attn.o_proj(single_query_attention(q, k, v, mask).reshape(x.shape[0], 1, -1))
            h = layer.post_attention_layernorm(x)
            x = x + (all_experts_moe(layer.mlp, h) if isinstance(layer.mlp, MoEFeedForward) else layer.mlp(h))
        logits = F.linear(m.norm(x[:, -1]), m.output_weight()).float()
        return logits, logits.argmax(-1)


class CompiledDecoder:
    """A model's compiled decode step; `compile_decoder` attaches one, the generator uses it when present.

    `warmed_up` holds the batch sizes whose graph `warm_up` compiled."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        if getattr(model, "tp_size", 1) > 1:
            raise UserError("compiled decoding runs on one rank; load the checkpoint at tp 1 for generation")
        compile_kwargs.setdefault("dynamic", False)
        if next(model.parameters()).device.type == "cpu":
            # freezing folds the weights into the graph (a second, prepacked copy): compile after loading
            compile_kwargs.setdefault("options", {"freezing": True})
        self.model = model
        self.step = torch.compile(DecodeStep(model), **compile_kwargs)
        self.warmed_up: set[int] = set()

    def start(self, batch_size: int, prompt_mask: torch.Tensor, needed_len: int) -> "CompiledDecoding":
        return CompiledDecoding(self, batch_size, prompt_mask, needed_len)

    @torch.inference_mode()  # the mode generation runs in: a graph compiled outside it would not be reused
    def warm_up(self, batch_size: int = 1) -> None:
        """Compile the step for `batch_size` rows now (one prefill and one step of a 1-token prompt)."""
        device = self.model.embed_tokens.weight.device
        ids = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        decoding = self.start(batch_size, torch.ones_like(ids), needed_len=2)
        decoding.prefill(ids, ids)
        decoding.step(ids, ids + 1)
        self.warmed_up.add(batch_size)


class CompiledDecoding:
    """One generation on the compiled step: eager prefill into a static cache, then compiled steps."""

    def __init__(self, decoder: CompiledDecoder, batch_size: int, prompt_mask: torch.Tensor, needed_len: int):
        model = self.model = decoder.model
        cfg, p = model.config, model.embed_tokens.weight
        # whole blocks of positions (aligned rows); the compiled graph takes any length, see below
        cache_len = min(cfg.max_seq_len, -(-needed_len // CACHE_BLOCK) * CACHE_BLOCK)
        self.cache = StaticKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, cache_len,
                                   p.dtype, p.device)
        self.step_fn = decoder.step
        self.prompt_mask = prompt_mask
        self.allowed = torch.ones((batch_size, cache_len), dtype=torch.bool, device=p.device)
        self.allowed[:, :prompt_mask.shape[1]] = prompt_mask.bool()  # prompt padding stays hidden
        # The cache length is a symbolic size in the compiled graph, so every generation length reuses the
        # batch size's one graph instead of compiling another.
        for k_t, v in zip(self.cache.k_t, self.cache.v):
            torch._dynamo.mark_dynamic(k_t, 3)
            torch._dynamo.mark_dynamic(v, 2)
        torch._dynamo.mark_dynamic(self.allowed, 1)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attn = self.prompt_mask if bool((self.prompt_mask == 0).any()) else None
        return self.model(ids, position_ids=positions, attention_mask=attn, kv_cache=self.cache,
                          logits_to_keep=1).logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.tensor([self.cache.length], device=tokens.device)
        logits, argmax = self.step_fn(tokens, positions, self.allowed, at, self.cache)
        self.cache.length += 1
        return logits, argmax


def compile_decoder(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Lay the model out for decoding and attach its compiled decode step; returns the model.

    torch.compile is lazy: each new batch size pays a compile on first use; `model.compiled_decoder.warm_up(B)`
    pays it ahead of time. Greedy tokens equal the eager path's.
    """
    use_decode_layout(model)
    model.compiled_decoder = CompiledDecoder(model, **compile_kwargs)
    return model


def compiled_decoder_of(model: nn.Module) -> CompiledDecoder | None:
    return getattr(model, "compiled_decoder", None)
