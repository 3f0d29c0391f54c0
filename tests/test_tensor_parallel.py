"""Tensor-parallel building blocks against single-rank torch references.

Two real gloo processes run every multi-rank check once (one spawn per module); each check compares the
tp=2 result — forward values, input and weight gradients — with torch.nn / F.cross_entropy computed on
the full tensors on the same rank (fp32, atol 1e-6). Single-process tests cover the tp=1 degenerate path,
ParallelDims validation and the rank layout.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dist_utils import assert_check_passed, run_checks, run_distributed
from megatron_lite.errors import UserError
from megatron_lite.parallel import ParallelDims, group_ranks
from megatron_lite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, ShardSpec,
                                           VocabParallelEmbedding, copy_to_tensor_parallel_region,
                                           gather_from_tensor_parallel_region, gather_state_dict,
                                           gather_state_dicts, gather_tensor, parallel_lm_logits,
                                           reduce_from_tensor_parallel_region, reshard_state_dicts,
                                           scatter_to_tensor_parallel_region, shard_state_dict, shard_tensor,
                                           tp_shard_specs, vocab_parallel_cross_entropy)

ATOL = 1e-6
TP = 2


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def chunk(t, rank, dim=-1):
    return t.chunk(TP, dim=dim)[rank]


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- multi-rank checks (run in each rank)
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@check
def parallel_dims_groups(dims):
    r = dist.get_rank()
    mpu = dims.mpu
    one = ParallelDims.from_world(TP, tp=1).build()  # same world, tp=1: everyone is data parallel
    got_tp = [dims.tp, dims.tp_rank, dims.dp, dims.dp_rank, dims.dp_group is None,
              dist.get_world_size(dims.tp_group)]
    got_mpu = [mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(),
               mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
               mpu.get_tensor_model_parallel_src_rank(), mpu.get_data_parallel_world_size(),
               mpu.get_data_parallel_rank(), mpu.get_data_parallel_group_ranks(),
               dist.get_world_size(mpu.get_data_parallel_group())]
    got_one = [one.tp_group is None, one.tp, one.dp, one.dp_rank,
               dist.get_world_size(one.dp_group), one.mpu.get_model_parallel_world_size(),
               # DeepSpeed all-reduces over the model-parallel group unguarded: it must be a real group
               dist.get_world_size(one.mpu.get_model_parallel_group())]
    assert got_tp == [2, r, 1, 0, True, 2], got_tp
    assert got_mpu == [2, r, 2, r, 0, 1, 0, [r], 1], got_mpu
    assert got_one == [True, 1, 2, r, 2, 1, 1], got_one
    assert dims.build() is dims  # idempotent, no new groups


@check
def copy_to(dims):
    r, g = dims.tp_rank, dims.tp_group
    x = randn(0, 3, 8).requires_grad_()
    y = copy_to_tensor_parallel_region(x, g)
    y.backward(randn(10 + r, 3, 8))
    close(y, x.detach(), "forward is the identity")
    close(x.grad, randn(10, 3, 8) + randn(11, 3, 8), "backward sums the ranks' gradients")


@check
def reduce_from(dims):
    r, g = dims.tp_rank, dims.tp_group
    x = randn(r, 3, 8).requires_grad_()
    y = reduce_from_tensor_parallel_region(x, g)
    y.backward(randn(20, 3, 8))
    close(y, randn(0, 3, 8) + randn(1, 3, 8), "forward sums the ranks' inputs")
    close(x.grad, randn(20, 3, 8), "backward is the identity")
    assert torch.equal(x.detach(), randn(r, 3, 8)), "the input was reduced in place"


@check
def scatter_to(dims):
    r, g = dims.tp_rank, dims.tp_group
    x = randn(0, 2, 3, 8).requires_grad_()
    y = scatter_to_tensor_parallel_region(x, g)
    y.backward(randn(30 + r, 2, 3, 4))
    close(y, chunk(x.detach(), r), "forward keeps this rank's last-dim chunk")
    close(x.grad, torch.cat([randn(30, 2, 3, 4), randn(31, 2, 3, 4)], -1), "backward all-gathers")


@check
def gather_from(dims):
    r, g = dims.tp_rank, dims.tp_group
    x = randn(r, 2, 3, 4).requires_grad_()
    y = gather_from_tensor_parallel_region(x, g)
    y.backward(randn(40, 2, 3, 8))
    close(y, torch.cat([randn(0, 2, 3, 4), randn(1, 2, 3, 4)], -1), "forward all-gathers")
    close(x.grad, chunk(randn(40, 2, 3, 8), r), "backward keeps this rank's chunk")


def _linear_pair(make_parallel, seed=5):
    """The same layer built as a tp layer and as nn.Linear from the same seed (identical RNG draws)."""
    torch.manual_seed(seed)
    par = make_parallel()
    torch.manual_seed(seed)
    ref = nn.Linear(par.in_features, par.out_features, bias=par.bias is not None)
    return par, ref


@check
def column_parallel_linear(dims):
    r, g = dims.tp_rank, dims.tp_group
    for bias in (True, False):
        for gather in (True, False):
            par, ref = _linear_pair(lambda: ColumnParallelLinear(6, 8, bias=bias, gather_output=gather, group=g))
            x, x_ref = randn(1, 2, 3, 6).requires_grad_(), randn(1, 2, 3, 6).requires_grad_()
            y, y_ref = par(x), ref(x_ref)
            dy = randn(2, 2, 3, 8)
            y.backward(dy if gather else chunk(dy, r))
            y_ref.backward(dy)
            what = f"bias={bias} gather_output={gather}"
            assert par.weight.shape == (4, 6)
            close(y, y_ref if gather else chunk(y_ref, r), f"{what} output")
            close(x.grad, x_ref.grad, f"{what} input grad")
            close(par.weight.grad, chunk(ref.weight.grad, r, 0), f"{what} weight grad")
            if bias:
                close(par.bias.grad, chunk(ref.bias.grad, r, 0), f"{what} bias grad")


@check
def column_parallel_linear_fused_sections(dims):
    # q|k|v fused: q has 8 outputs, k and v 4 each; rank r must own [q_r; k_r; v_r]
    r, g = dims.tp_rank, dims.tp_group
    sections = (8, 4, 4)
    spec = ShardSpec(0, sections)
    par, ref = _linear_pair(lambda: ColumnParallelLinear(6, 16, gather_output=False, group=g, sections=sections))
    x, x_ref = randn(1, 5, 6).requires_grad_(), randn(1, 5, 6).requires_grad_()
    y, y_ref = par(x), ref(x_ref)
    dy = randn(2, 5, 16)
    y.backward(shard_tensor(dy, ShardSpec(1, sections), r, TP))
    y_ref.backward(dy)
    expected_y = shard_tensor(y_ref.detach(), ShardSpec(1, sections), r, TP)
    close(y, expected_y, "output")
    close(y[:, :4], y_ref[:, 4 * r:4 * r + 4], "local q block is this rank's q heads")
    close(x.grad, x_ref.grad, "input grad")
    close(par.weight.grad, shard_tensor(ref.weight.grad, spec, r, TP), "weight grad")
    close(par.bias.grad, shard_tensor(ref.bias.grad, spec, r, TP), "bias grad")


@check
def row_parallel_linear(dims):
    r, g = dims.tp_rank, dims.tp_group
    for bias in (True, False):
        for input_is_parallel in (True, False):
            par, ref = _linear_pair(lambda: RowParallelLinear(8, 6, bias=bias, input_is_parallel=input_is_parallel,
                                                              group=g))
            x_full = randn(1, 2, 3, 8)
            x = (chunk(x_full, r) if input_is_parallel else x_full).clone().requires_grad_()
            x_ref = x_full.clone().requires_grad_()
            y, y_ref = par(x), ref(x_ref)
            dy = randn(2, 2, 3, 6)
            y.backward(dy)
            y_ref.backward(dy)
            what = f"bias={bias} input_is_parallel={input_is_parallel}"
            assert par.weight.shape == (6, 4)
            close(y, y_ref, f"{what} output")
            close(x.grad, chunk(x_ref.grad, r) if input_is_parallel else x_ref.grad, f"{what} input grad")
            close(par.weight.grad, chunk(ref.weight.grad, r, 1), f"{what} weight grad")
            if bias:
                close(par.bias.grad, ref.bias.grad, f"{what} bias grad")


@check
def column_then_row_mlp(dims):
    # the Megatron MLP: one all-reduce forward (row), one backward (column's copy_to)
    g = dims.tp_group
    torch.manual_seed(3)
    up, down = ColumnParallelLinear(6, 8, gather_output=False, group=g), RowParallelLinear(8, 6, input_is_parallel=True,
                                                                                          group=g)
    torch.manual_seed(3)
    up_ref, down_ref = nn.Linear(6, 8), nn.Linear(8, 6)
    x, x_ref = randn(1, 4, 6).requires_grad_(), randn(1, 4, 6).requires_grad_()
    y, y_ref = down(F.gelu(up(x))), down_ref(F.gelu(up_ref(x_ref)))
    y.square().sum().backward()
    y_ref.square().sum().backward()
    close(y, y_ref, "output")
    close(x.grad, x_ref.grad, "input grad")


@check
def vocab_parallel_embedding(dims):
    r, g = dims.tp_rank, dims.tp_group
    torch.manual_seed(7)
    emb = VocabParallelEmbedding(10, 4, group=g)
    torch.manual_seed(7)
    ref = nn.Embedding(10, 4)
    ids = torch.tensor([[0, 4, 5, 9, 5], [1, 1, 8, 3, 6]])  # both ranges, repeats on both sides
    y, y_ref = emb(ids), ref(ids)
    dy = randn(2, 2, 5, 4)
    y.backward(dy)
    y_ref.backward(dy)
    assert emb.weight.shape == (5, 4)
    close(y, y_ref, "output")
    close(emb.weight.grad, chunk(ref.weight.grad, r, 0), "weight grad")


@check
def vocab_parallel_cross_entropy_matches(dims):
    r, g = dims.tp_rank, dims.tp_group
    target = torch.tensor([[3, 9, -100, 0, 5, 4], [7, -100, 2, 6, 1, 8]])  # (2, 6), both vocab halves
    full = randn(1, 2, 6, 10) * 3
    for reduction in ("mean", "sum", "none"):
        logits = chunk(full, r).clone().requires_grad_()
        logits_ref = full.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, target, g, reduction=reduction)
        loss_ref = F.cross_entropy(logits_ref.reshape(-1, 10), target.reshape(-1), reduction=reduction)
        loss_ref = loss_ref.reshape(target.shape) if reduction == "none" else loss_ref
        dl = randn(3, 2, 6) if reduction == "none" else torch.tensor(1.7)
        loss.backward(dl)
        loss_ref.backward(dl)
        close(loss, loss_ref, f"{reduction} loss")
        close(logits.grad, chunk(logits_ref.grad, r), f"{reduction} logits grad")
    # large logits (loss ~6e3): the max shift keeps exp() finite; equal to fp32 precision (1 ulp ~ 5e-4)
    loss = vocab_parallel_cross_entropy(chunk(full * 1000, r), target, g)
    loss_ref = F.cross_entropy((full * 1000).reshape(-1, 10), target.reshape(-1))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)


@check
def tied_head_with_vocab_parallel_ce(dims):
    # embedding -> hidden -> logits with the same (sharded) embedding weight -> CE, against the tp=1 model
    g = dims.tp_group
    ids = torch.tensor([[1, 7, 3, 9], [0, 5, 2, 8]])
    target = torch.tensor([[7, 3, 9, -100], [5, 2, 8, 6]])
    torch.manual_seed(11)
    emb = VocabParallelEmbedding(10, 4, group=g)
    torch.manual_seed(11)
    ref = nn.Embedding(10, 4)
    h, h_ref = emb(ids).tanh(), ref(ids).tanh()
    loss = vocab_parallel_cross_entropy(parallel_lm_logits(h, emb.weight, g), target, g)
    loss_ref = F.cross_entropy(F.linear(h_ref, ref.weight).reshape(-1, 10), target.reshape(-1))
    loss.backward()
    loss_ref.backward()
    close(loss, loss_ref, "loss")
    close(emb.weight.grad, chunk(ref.weight.grad, dims.tp_rank, 0), "tied weight grad (lookup + head)")


class _Tiny(nn.Module):
    """Every tp layer kind, for init and state-dict checks."""

    def __init__(self, g):
        super().__init__()
        init = lambda w: nn.init.normal_(w, std=0.02)  # noqa: E731
        self.emb = VocabParallelEmbedding(10, 6, group=g, init_method=init)
        self.qkv = ColumnParallelLinear(6, 16, gather_output=False, group=g, sections=(8, 4, 4), init_method=init)
        self.o = RowParallelLinear(8, 6, input_is_parallel=True, group=g)
        self.up = ColumnParallelLinear(6, 4, bias=False, group=g)
        self.norm = nn.LayerNorm(6)


@check
def init_independent_of_tp(dims):
    g = dims.tp_group
    torch.manual_seed(123)
    par = _Tiny(g)
    after_par = torch.rand(1)  # the RNG must be in the same state afterwards too
    torch.manual_seed(123)
    full = _Tiny(None)
    after_full = torch.rand(1)
    specs = tp_shard_specs(par)
    gathered = gather_state_dict(par.state_dict(), specs, g)
    ref = full.state_dict()
    assert tp_shard_specs(full) == specs, "specs must not depend on tp"
    assert set(specs) == {"emb.weight", "qkv.weight", "qkv.bias", "o.weight", "up.weight"}, specs
    assert gathered.keys() == ref.keys()
    for k in ref:
        assert torch.equal(gathered[k], ref[k]), f"{k}: the gathered tp=2 init differs from tp=1"
    assert torch.equal(after_par, after_full), "tp layers consumed the RNG differently"


@check
def state_dict_reshard(dims):
    r, g = dims.tp_rank, dims.tp_group
    torch.manual_seed(9)
    par = _Tiny(g)
    torch.manual_seed(9)
    full = _Tiny(None).state_dict()
    specs = tp_shard_specs(par)
    shards = [None] * TP
    dist.all_gather_object(shards, par.state_dict())
    sharded = shard_state_dict(full, specs, r, TP)
    for k, v in par.state_dict().items():
        assert torch.equal(sharded[k], v), f"{k}: shard_state_dict differs from the tp=2 layer's shard"
    offline = gather_state_dicts(shards, specs)
    back_to_one = reshard_state_dicts(shards, specs, 1)[0]
    for k in full:
        assert torch.equal(offline[k], full[k]), f"{k}: gather_state_dicts"
        assert torch.equal(back_to_one[k], full[k]), f"{k}: reshard_state_dicts to tp=1"
    # a tp=1 model loads the gathered checkpoint, a tp=2 model loads its shard
    _Tiny(None).load_state_dict(offline)
    _Tiny(g).load_state_dict(sharded)


@check
def deepspeed_zero2_accepts_mpu(dims):
    # Last: deepspeed.initialize sets process-wide DeepSpeed state. ZeRO-2 over dims.mpu must treat the
    # sharded weights as tp-parallel (norm summed over the tp group) and the row bias as replicated
    # (counted once): the global grad norm then equals the full model's.
    import logging

    import deepspeed
    from deepspeed.utils import logger

    from megatron_lite.ds_runtime import skip_shm_comm_build
    skip_shm_comm_build()  # before deepspeed.initialize builds DeepSpeed's comm backend
    logger.setLevel(logging.WARNING)
    g = dims.tp_group
    torch.manual_seed(0)
    model = nn.Sequential(ColumnParallelLinear(8, 16, gather_output=False, group=g), nn.GELU(),
                          RowParallelLinear(16, 8, input_is_parallel=True, group=g))
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                      config=cfg, mpu=dims.mpu)
    x = randn(1, 2, 8)
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    loss_ref = ref(x).square().mean()
    loss_ref.backward()
    ref_norm = torch.stack([p.grad.norm() for p in ref.parameters()]).norm()
    assert engine.dp_world_size == 1, engine.dp_world_size  # both ranks are one tp group, not replicas
    close(loss.detach(), loss_ref.detach(), "loss")
    close(torch.as_tensor(engine.get_global_grad_norm()).float(), ref_norm, "ZeRO-2 global grad norm")


def _tp_worker(rank, world_size):
    dims = ParallelDims.from_world(world_size, tp=TP).build()
    return run_checks(CHECKS, dims)


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp_worker, world_size=TP, timeout=120)


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(tp2_results, name):
    assert_check_passed(tp2_results, name)


# ---------------------------------------------------------------- single process: tp=1 degenerates to torch.nn
def test_mappings_are_identity_without_group():
    x = torch.randn(2, 4)
    for fn in (copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region,
               scatter_to_tensor_parallel_region, gather_from_tensor_parallel_region):
        assert fn(x, None) is x


def test_layers_without_group_are_torch_nn():
    torch.manual_seed(0)
    col, row, emb = ColumnParallelLinear(5, 7), RowParallelLinear(7, 3, bias=False), VocabParallelEmbedding(11, 5)
    torch.manual_seed(0)
    refs = nn.Linear(5, 7), nn.Linear(7, 3, bias=False), nn.Embedding(11, 5)
    for layer, ref in zip((col, row, emb), refs):
        sd, ref_sd = layer.state_dict(), ref.state_dict()
        assert sd.keys() == ref_sd.keys()
        for k in sd:
            assert torch.equal(sd[k], ref_sd[k]), f"{type(layer).__name__}.{k}: init differs from torch.nn"
    x = torch.randn(4, 5)
    assert torch.equal(col(x), refs[0](x))
    ids = torch.tensor([0, 10, 3])
    assert torch.equal(emb(ids), refs[2](ids))


def test_cross_entropy_without_group_is_f_cross_entropy():
    logits, target = torch.randn(2, 3, 7), torch.tensor([[1, -100, 6], [0, 2, 2]])
    ref = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))
    assert torch.equal(vocab_parallel_cross_entropy(logits, target, None), ref)
    with pytest.raises(ValueError):
        vocab_parallel_cross_entropy(logits, target, None, reduction="avg")


def test_shard_gather_roundtrip_with_sections():
    full = torch.arange(24.0).reshape(12, 2)
    spec = ShardSpec(0, (6, 3, 3))
    shards = [shard_tensor(full, spec, r, 3) for r in range(3)]
    # rank 1 owns rows 2-3 of block 0, row 7 of block 1, row 10 of block 2
    assert torch.equal(shards[1], full[[2, 3, 7, 10]])
    assert torch.equal(gather_tensor(shards, spec), full)
    with pytest.raises(ValueError):
        shard_tensor(full, ShardSpec(0, (5, 4, 3)), 0, 2)


def test_parallel_dims_validation():
    d = ParallelDims.from_world(8, tp=2, ep=2, num_experts=4)
    assert (d.tp, d.ep, d.dp) == (2, 2, 4)
    cases = [dict(world_size=3, tp=2), dict(world_size=4, tp=2, ep=4), dict(world_size=4, tp=1, ep=4, num_experts=6),
             dict(world_size=2, tp=0), dict(world_size=2, tp=1, ep=-1)]
    for kw in cases:
        with pytest.raises(UserError) as e:
            ParallelDims.from_world(**kw)
        assert "\n" not in str(e.value)


def test_parallel_dims_single_process():
    d = ParallelDims.from_world(1).build()
    assert (d.tp_group, d.dp_group, d.tp, d.dp, d.tp_rank, d.dp_rank) == (None, None, 1, 1, 0, 0)
    assert d.mpu.get_model_parallel_world_size() == 1 and d.mpu.get_data_parallel_rank() == 0
    with pytest.raises(UserError, match="not initialised"):
        ParallelDims.from_world(2, tp=2).build()


def test_rank_layout_matches_megatron_and_deepspeed_moe():
    tp_groups, dp_groups = group_ranks(8, 2)
    assert tp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # DeepSpeed-MoE (given our mpu) carves its expert groups out of these same dp groups
    from deepspeed.utils.groups import _get_expert_parallel_ranks
    ep_groups, ep_dp_groups = _get_expert_parallel_ranks(8, 2, 2)
    assert sorted(ep_groups) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for eg in ep_groups:
        assert any(set(eg) <= set(dg) for dg in dp_groups)
    assert math.prod(len(g) for g in (ep_groups[0], ep_dp_groups[0])) == 4  # ep x expert-dp = dp
