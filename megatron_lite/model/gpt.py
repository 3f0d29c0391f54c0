"""The decoder: MiniLLM (dense) or MiniMoE (every FFN a sparse MoE), chosen by `config.num_experts`.

Pre-norm blocks (RMSNorm in fp32) -> final norm -> output head tied to the input embedding.
With ep = tp = 1 this is plain single-device PyTorch; expert parallelism only changes how many experts
each rank holds (DeepSpeed-MoE does the all-to-all). Tensor parallelism (`tp_group`) swaps in Megatron's
layers: attention heads and the dense FFN hidden dim are split across the group, the embedding and the tied
head are split over the vocabulary and the loss is the vocab-parallel cross entropy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import IGNORE_INDEX, ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.model.attention import Attention, KVCache, packed_attention_inputs, rope_cos_sin
from megatron_lite.model.ffn import build_ffn
from megatron_lite.model.moe import MoEFeedForward
from megatron_lite.model.norm import RMSNorm
from megatron_lite.tensor_parallel import (TENSOR_PARALLEL_LAYERS, column_linear, gather_from_tensor_parallel_region,
                                           group_size, parallel_lm_logits, vocab_embedding,
                                           vocab_parallel_cross_entropy)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ep_size: int = 1, tp_group=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer_idx, tp_group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MoEFeedForward(config, ep_size) if config.is_moe else build_ffn(config, tp_group)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            h, aux, counts = self.mlp(h)
        else:
            h, aux, counts = self.mlp(h), None, None
        return x + self.dropout(h), aux, counts


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, T, vocab); (B, T, vocab/tp) this rank's slice if forward(gather_logits=False)
    loss: torch.Tensor | None = None  # mean next-token CE over labels != IGNORE_INDEX (LM loss only)
    aux_loss: torch.Tensor | None = None  # MoE: sum over layers of the weighted balancing (+ z) losses
    expert_counts: torch.Tensor | None = None  # MoE: (num_layers, num_experts) tokens routed per expert


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, ep_size: int = 1, ep_rank: int = 0, tp_group=None):
        """tp_group: the tensor-parallel process group (`ParallelDims.tp_group`); None for a single rank."""
        super().__init__()
        self.config = config
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.tp_group, self.tp_size = tp_group, group_size(tp_group)
        if config.is_moe and self.tp_size > 1:
            # experts would be replicated over tp while DeepSpeed-MoE splits their tokens across it; the
            # expert-gradient reduction for that layout is not verified yet
            raise UserError("tensor parallelism (--tp > 1) is supported for dense models only; use --ep for MoE")
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, tp_group)
        self.layers = nn.ModuleList(Block(config, i, ep_size, tp_group) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = (None if config.tie_embeddings
                        else column_linear(config.hidden_size, config.vocab_size, False, tp_group))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, std) everywhere, std / sqrt(2 * num_layers) on projections that write into the residual stream.

        Experts are drawn from per-(layer, expert) generators so the weights of expert e do not depend on the
        expert-parallel size: an ep=2 run starts from exactly the weights of an ep=1 run with the same seed.
        """
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        expert_seed = int(torch.randint(0, 2**62, (1,)).item())

        def init_module(m: nn.Module, generator=None):
            for sub in m.modules():
                if isinstance(sub, TENSOR_PARALLEL_LAYERS):
                    # draws the full weight from the same RNG stream and keeps this rank's shard, so the
                    # model is the tp=1 model whatever the tp size (biases zero, as below)
                    std = out_std if getattr(sub, "is_output_projection", False) else cfg.init_std
                    sub.reset_parameters(lambda w, std=std: w.normal_(0.0, std, generator=generator))
                elif isinstance(sub, (nn.Linear, nn.Embedding)):
                    std = out_std if getattr(sub, "is_output_projection", False) else cfg.init_std
                    sub.weight.normal_(0.0, std, generator=generator)
                    if getattr(sub, "bias", None) is not None:
                        sub.bias.zero_()
                elif isinstance(sub, RMSNorm):
                    sub.weight.fill_(1.0)

        init_module(self.embed_tokens)
        for i, layer in enumerate(self.layers):
            for name, child in layer.named_children():
                if isinstance(child, MoEFeedForward):
                    init_module(child.gate)
                    if child.gate.w_noise is not None:
                        child.gate.w_noise.weight.zero_()  # start with unit-ish noise: softplus(0) = 0.69
                    n_local = len(child.local_experts)
                    for j, expert in enumerate(child.local_experts):
                        e = self.ep_rank * n_local + j  # global expert index
                        g = torch.Generator().manual_seed(expert_seed + 1000 * i + e)
                        init_module(expert, g)
                else:
                    init_module(child)
        init_module(self.norm)
        if self.lm_head is not None:
            init_module(self.lm_head)

    # ------------------------------------------------------------------ forward
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None, gather_logits: bool = True,
                logits_to_keep: int = 0) -> GPTOutput:
        """input_ids, labels: (B, T); labels are already aligned to positions (label t = token t+1), IGNORE_INDEX ignored.

        With tensor parallelism the loss never needs the full logits; gather_logits=False skips gathering
        them (training), and `logits` is then this rank's vocabulary slice.

        attention_mask: optional (B, S) with 1 for real tokens and 0 for padding over all S = past + T key
        positions (left-padded batched generation). position_ids default to past + arange(T).
        document_ids: optional (B, T) for packed rows (several documents each, no cache): a token attends
        only to earlier tokens of equal id; pass position_ids restarting at each document with it.
        logits_to_keep > 0 computes logits for the last that many positions only (generation's prefill).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = None
        if document_ids is not None:
            if kv_cache is not None or attention_mask is not None:
                raise ValueError("document_ids (packed rows) cannot be combined with a KV cache or attention_mask")
            mask = packed_attention_inputs(document_ids, x.is_cuda, x.dtype)
        elif attention_mask is not None:
            S = past + T
            key_pos, query_pos = torch.arange(S, device=x.device)[None, :], torch.arange(T, device=x.device)[:, None] + past
            mask = (key_pos <= query_pos)[None, None] & attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
            # A padding query would see no key at all and give NaN, which then leaks through V into real
            # tokens (0 * NaN); letting every query see itself keeps padded rows finite and changes nothing else.
            mask = mask | (key_pos == query_pos)[None, None]
        aux_total, counts = None, []
        for layer in self.layers:
            x, aux, cnt = layer(x, cos, sin, mask, kv_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
                counts.append(cnt)
        if kv_cache is not None:
            kv_cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        if self.tp_size > 1:
            logits = parallel_lm_logits(x, self.output_weight(), self.tp_group).float()  # (B, T, vocab/tp)
            loss = None if labels is None else vocab_parallel_cross_entropy(logits, labels, self.tp_group)
            if gather_logits:
                logits = gather_from_tensor_parallel_region(logits, self.tp_group)  # (B, T, vocab)
            return GPTOutput(logits, loss, aux_total, torch.stack(counts) if counts else None)
        logits = F.linear(x, self.output_weight()).float()  # (B, T, vocab), fp32 for a stable softmax
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return GPTOutput(logits, loss, aux_total, torch.stack(counts) if counts else None)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        local_kv_heads = self.config.num_kv_heads // self.tp_size  # tp: this rank's kv heads only
        return KVCache(self.config.num_layers, batch_size, local_kv_heads, self.config.head_dim,
                       max_len or self.config.max_seq_len, p.dtype, p.device)
