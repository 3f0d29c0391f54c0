"""MoE unit tests: exact top-k routing, aux-loss formulas, capacity dropping, noise only while training."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.model.moe import MoEFeedForward, load_balancing_loss, router_z_loss

CFG = dict(vocab_size=64, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=2, ffn_hidden_size=24,
           num_experts=4, topk=2, min_capacity=1)


def make_moe(seed=0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(ModelConfig(**{**CFG, **kw}))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def reference_moe(moe: MoEFeedForward, x: torch.Tensor, k: int) -> torch.Tensor:
    """Mixtral's computation, token by token: softmax over the k largest router logits, weighted expert sum."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.gate.wg.weight.T
    out = torch.zeros_like(flat)
    for s in range(flat.shape[0]):
        top = logits[s].topk(k)
        w = F.softmax(top.values, dim=-1)
        for weight, e in zip(w, top.indices):
            out[s] += weight * moe.local_experts[int(e)](flat[s])
    return out.view_as(x)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eval_routing_is_exact_topk(k):
    moe = make_moe(topk=k).eval()
    x = torch.randn(2, 7, 16)
    y, _, counts = moe(x)
    torch.testing.assert_close(y, reference_moe(moe, x, k), rtol=0, atol=1e-5)
    assert counts.sum().item() == 14 * k


def test_switch_and_kl_uniform_losses_on_hand_computed_case():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    mask = torch.tensor([[True, False], [True, False]])  # top-1: both tokens chose expert 0
    # f = [1, 0], P = [0.7, 0.3] -> E * sum f_i P_i = 2 * 0.7
    assert load_balancing_loss(probs, mask, "switch").item() == pytest.approx(1.4)
    kl = 0.5 * (math.log(0.5 / 0.7) + math.log(0.5 / 0.3))
    assert load_balancing_loss(probs, mask, "kl_uniform").item() == pytest.approx(kl)
    # perfectly balanced routing: switch = 1, KL = 0
    even = torch.full((4, 4), 0.25)
    even_mask = torch.eye(4, dtype=torch.bool)
    assert load_balancing_loss(even, even_mask, "switch").item() == pytest.approx(1.0)
    assert load_balancing_loss(even, even_mask, "kl_uniform").item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_gate_returns_weighted_aux_loss():
    moe = make_moe(router_noise=False, aux_loss_coeff=0.5, router_z_loss_coeff=0.1, aux_loss_type="switch").train()
    x = torch.randn(3, 5, 16)
    _, aux, _ = moe(x)
    logits = x.reshape(-1, 16) @ moe.gate.wg.weight.T
    probs = F.softmax(logits, -1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, logits.topk(2).indices, True)
    want = 0.5 * load_balancing_loss(probs, mask, "switch") + 0.1 * router_z_loss(logits)
    torch.testing.assert_close(aux, want)


def test_capacity_drops_overflow_tokens_in_training_but_not_in_eval():
    moe = make_moe(topk=1, router_noise=False, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():  # every token prefers expert 0
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = 1.0
    x = torch.rand(1, 16, 16) + 0.1  # positive features -> expert 0 logit largest
    expert0 = moe.local_experts[0](x)
    moe.train()
    y, _, counts = moe(x)
    assert counts.tolist() == [16, 0, 0, 0]
    kept = (y.abs().sum(-1) > 0).squeeze(0)
    assert kept.sum().item() == 4  # capacity = ceil(16 / 4 * 1.0) = 4 slots on expert 0
    torch.testing.assert_close(y[0, kept], expert0[0, kept])  # k=1: gate renormalised to 1
    moe.eval()
    y_eval, _, _ = moe(x)
    torch.testing.assert_close(y_eval, expert0)  # inference drops nothing


def test_router_noise_only_while_training():
    moe = make_moe(router_noise=True)
    with torch.no_grad():
        moe.gate.w_noise.weight.fill_(1.0)  # large noise
    x = torch.randn(2, 9, 16)
    moe.train()
    torch.manual_seed(1)
    noisy1, noisy2 = moe(x)[0], moe(x)[0]
    assert (noisy1 - noisy2).abs().max() > 1e-3  # fresh noise each call changes the routing
    moe.eval()
    y1, y2 = moe(x)[0], moe(x)[0]
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, reference_moe(moe, x, 2), rtol=0, atol=1e-5)
    assert (noisy1 - y1).abs().max() > 1e-3


def test_eval_fast_path_equals_deepspeed_dispatch():
    """Eval skips DeepSpeed's dispatch on a single rank; with no noise and no dropping both must agree."""
    moe = make_moe(topk=2, router_noise=False, drop_tokens=False)
    x = torch.randn(3, 11, 16)
    moe.train()
    y_ds, aux_ds, counts_ds = moe(x)
    moe.eval()
    y_fast, aux_fast, counts_fast = moe(x)
    torch.testing.assert_close(y_fast, y_ds, rtol=0, atol=1e-5)
    torch.testing.assert_close(aux_fast, aux_ds)
    assert counts_fast.tolist() == counts_ds.tolist()
