"""Sparse MoE feed-forward on DeepSpeed-MoE with a noisy top-k router.

Dispatch, capacity, all-to-all and expert placement (`ep_size`) are DeepSpeed's (`deepspeed.moe.layer.MoE`);
we only replace its gate with `NoisyTopKGate`:
  * learned noise (Shazeer et al. 2017): logits + N(0,1) * softplus(x @ W_noise), only while training;
  * combine weights = softmax over the k chosen logits (what Mixtral computes), for every k;
  * our own load-balancing loss (`switch` or `kl_uniform`) plus an optional router z-loss;
  * no token dropping at inference, so eval/chat/export match a dense Mixtral computation exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, topkgating

from megatron_lite.config import ModelConfig
from megatron_lite.model.ffn import build_ffn


def load_balancing_loss(probs: torch.Tensor, topk_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """probs: (S, E) router probabilities; topk_mask: (S, E) bool, the experts each token chose.

    switch:     E * sum_i f_i * P_i, f_i = share of routed slots taken by expert i, P_i = mean prob (1 when even)
    kl_uniform: KL(U || P) = sum_i (1/E) * log((1/E) / P_i), P = mean prob per expert (0 when even)
    """
    num_experts = probs.shape[1]
    mean_prob = probs.mean(dim=0)  # (E,)
    if kind == "switch":
        frac = topk_mask.float().mean(dim=0) / topk_mask.sum(dim=1).float().mean()  # sums to 1 over experts
        return num_experts * torch.sum(frac * mean_prob)
    if kind == "kl_uniform":
        uniform = 1.0 / num_experts
        return torch.sum(uniform * (torch.log(torch.tensor(uniform)) - torch.log(mean_prob)))
    raise ValueError(f"unknown aux loss {kind!r}")


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE): keeps logits small and routing stable."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class NoisyTopKGate(TopKGate):
    """A DeepSpeed `TopKGate` whose routing is the noisy top-k of the module docstring.

    Returns the tuple DeepSpeed's `MOELayer` expects, with our weighted aux loss as `l_aux`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.num_experts, k=config.topk,
                         capacity_factor=config.capacity_factor, eval_capacity_factor=config.eval_capacity_factor,
                         min_capacity=config.min_capacity, drop_tokens=config.drop_tokens)
        self.w_noise = nn.Linear(config.hidden_size, config.num_experts, bias=False) if config.router_noise else None
        self.aux_loss_type = config.aux_loss_type
        self.aux_loss_coeff = config.aux_loss_coeff
        self.z_loss_coeff = config.router_z_loss_coeff

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = False, use_tutel: bool = False):
        logits = self.router_logits(input)  # (S, E)
        # DeepSpeed's top-k dispatch: softmax, top-k, capacity, renormalise the kept gates over the chosen k.
        drop = self.drop_tokens and self.training
        out = topkgating(logits, self.k, self.capacity_factor, self.min_capacity, drop_tokens=drop,
                         ep_group=self.ep_group, sparse_routes=sparse_routes)
        return (self.aux_loss(logits, logits.topk(self.k, dim=-1).indices),) + tuple(out[1:])

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(S, C) tokens -> (S, E) fp32 router logits (routing decisions in fp32, as DeepSpeed's); noisy while training."""
        x = x.float()
        logits = F.linear(x, self.wg.weight.float())
        if self.training and self.w_noise is not None:
            noise_std = F.softplus(F.linear(x, self.w_noise.weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """No-drop routing of (S, C) tokens: (S, E) logits, (S, k) chosen experts and their combine weights
        (softmax over the chosen logits, as Mixtral)."""
        logits = self.router_logits(x)
        top = logits.topk(self.k, dim=-1)
        return logits, top.indices, F.softmax(top.values, dim=-1)

    def aux_loss(self, logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Weighted balancing loss (+ z-loss) of (S, E) router logits whose chosen experts are topk_idx (S, k)."""
        probs = F.softmax(logits, dim=-1)
        topk_mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, topk_idx, True)
        aux = self.aux_loss_coeff * load_balancing_loss(probs, topk_mask, self.aux_loss_type)
        if self.z_loss_coeff > 0:
            aux = aux + self.z_loss_coeff * router_z_loss(logits)
        return aux


class MoEFeedForward(nn.Module):
    """Every FFN of MiniMoE: DeepSpeed `MoE` holding `num_experts / ep_size` local experts."""

    def __init__(self, config: ModelConfig, ep_size: int = 1):
        super().__init__()
        if config.num_experts % ep_size:
            raise ValueError(f"num_experts {config.num_experts} is not divisible by ep {ep_size}")
        self.num_experts = config.num_experts
        self.moe = MoE(config.hidden_size, build_ffn(config), num_experts=config.num_experts, ep_size=ep_size,
                       k=config.topk, min_capacity=config.min_capacity, drop_tokens=config.drop_tokens)
        self.moe.deepspeed_moe.gate = NoisyTopKGate(config)

    @property
    def gate(self) -> NoisyTopKGate:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor):
        """(B, T, C) -> (B, T, C), weighted aux loss (scalar), tokens routed to each expert (E,)."""
        if not self.training and self.moe.ep_size == 1:
            return self._eval_forward(x)
        y, aux, counts = self.moe(x)
        return y, aux, counts

    def _eval_forward(self, x: torch.Tensor):
        """Inference with every expert on this rank: the same result as DeepSpeed's no-drop dispatch, but each
        expert only sees its own tokens, so one decoded token runs k experts instead of all E."""
        flat = x.reshape(-1, x.shape[-1])  # (S, C)
        logits, chosen, weights = self.gate.route(flat)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts)
        out = self.mix_experts(flat, chosen, weights, counts.nonzero().flatten().tolist())
        return out.to(x.dtype).view_as(x), self.gate.aux_loss(logits, chosen), counts

    def mix_experts(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: list[int]):
        """(S, C) tokens -> (S, C) fp32 sum of their chosen experts' outputs times the combine weights; `experts`:
        the chosen ones, ascending (each runs on its own tokens only)."""
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for e in experts:
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.local_experts[e](flat[token]).float() * weights[token, slot, None])
        return out
