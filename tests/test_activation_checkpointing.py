"""--checkpoint-activations: each block's forward is recomputed in backward, and nothing else changes.

Single process: the same losses and gradients bit for bit on a dense and an MoE model with dropout and router
noise on (the recompute must redraw the same random numbers), while the block really runs twice and keeps
fewer tensors. Through launch/pretrain.py: tp 2 and ep 2 on 2 gloo ranks give the losses of the runs
without the flag, a checkpoint saved with it resumes without it, and it combines with --compile.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPT
from megatron_lite.training.activation_checkpointing import checkpoint_blocks

import launch_utils
from launch_utils import SMALL, build_data, losses, pretrain_args

CFG = dict(vocab_size=128, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
           max_seq_len=64, dropout=0.1)


def run(script, args, ranks=1):
    return launch_utils.run(script, args, ranks, launcher="torchrun")


def step(model: GPT, seed: int = 7):
    """One training forward/backward: (loss, aux, {name: grad}, bytes of tensors autograd kept)."""
    torch.manual_seed(0)
    ids = torch.randint(0, CFG["vocab_size"], (2, 24))
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout / router-noise stream, as seed_step sets it per iteration
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=torch.roll(ids, -1, dims=1))
    total = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), None if out.aux_loss is None else out.aux_loss.item(), grads, sum(kept)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_same_loss_and_gradients_with_recompute(moe):
    extra = dict(num_experts=4, topk=2, min_capacity=1, router_noise=True) if moe else {}
    config = ModelConfig(**CFG, **extra)
    torch.manual_seed(1)
    plain = GPT(config).train()
    torch.manual_seed(1)
    ckpt = GPT(config).train()
    assert checkpoint_blocks(ckpt) == config.num_layers and checkpoint_blocks(ckpt) == config.num_layers

    calls = []
    for block in ckpt.layers:
        block.self_attn.register_forward_hook(lambda *_: calls.append(1))
    loss_a, aux_a, grads_a, kept_a = step(plain)
    loss_b, aux_b, grads_b, kept_b = step(ckpt)
    assert len(calls) == 2 * config.num_layers  # forward, then the recompute in backward
    assert kept_b < kept_a / 2  # only the block inputs (and what is around the blocks) are kept
    assert loss_a == loss_b and aux_a == aux_b
    assert sorted(grads_a) == sorted(grads_b) and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    if moe:  # the noise really is on, so the recompute had to redraw it
        assert step(plain, seed=8)[0] != loss_a

    # Same module tree and state dict: a checkpointed model's weights load into a plain one and back.
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(ckpt.state_dict(), strict=True)
    # no-grad calls (eval, generation) run the plain forward
    with torch.no_grad():
        calls.clear()
        ckpt.eval()(torch.zeros(1, 4, dtype=torch.long))
        assert len(calls) == config.num_layers


# ------------------------------------------------------------------------------------------ through the CLI

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("actckpt_data"))


MOE = ["--model", "tiny-moe", *SMALL, "--num-experts", 4, "--topk", 2, "--ep", 2]


def moe_args(data, save, iters, *extra):
    return [*MOE, "--tokenizer", data["tok"], "--data-path", data["pt"], "--train-iters", iters,
            "--micro-batch-size", 2, "--save", save, *extra]


@pytest.mark.multirank
def test_tp2_losses_unchanged(data, tmp_path):
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    run("launch/pretrain.py", pretrain_args(data, a, 4, "--tp", 2, "--micro-batch-size", 2), ranks=2)
    run("launch/pretrain.py", pretrain_args(data, b, 4, "--tp", 2, "--micro-batch-size", 2,
                                            "--checkpoint-activations"), ranks=2)
    la, lb = losses(a), losses(b)
    assert sorted(la) == [1, 2, 3, 4] and la[4] < la[1]
    assert max(abs(la[s] - lb[s]) for s in la) <= 1e-6, (la, lb)


@pytest.mark.multirank
def test_ep2_losses_unchanged_and_checkpoint_resumes_without_the_flag(data, tmp_path):
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    run("launch/pretrain.py", moe_args(data, a, 4), ranks=2)
    run("launch/pretrain.py", moe_args(data, b, 4, "--save-interval", 2, "--checkpoint-activations"), ranks=2)
    la, lb = losses(a), losses(b)
    assert sorted(la) == [1, 2, 3, 4]
    assert max(abs(la[s] - lb[s]) for s in la) <= 1e-6, (la, lb)
    from megatron_lite.checkpoint.load import load_full_state_dict

    assert sorted(load_full_state_dict(a)[1]) == sorted(load_full_state_dict(b)[1])  # same names, experts too
    # step 2 of the checkpointed run, resumed without the flag, continues exactly as the plain run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_config.json", "tokenizer", "global_step2"):
        (shutil.copytree if (b / name).is_dir() else shutil.copy)(b / name, resumed / name)
    (resumed / "latest").write_text("global_step2")
    run("launch/pretrain.py", moe_args(data, resumed, 4, "--load", resumed), ranks=2)
    lr = losses(resumed)
    assert sorted(lr) == [3, 4] and all(abs(lr[s] - la[s]) <= 1e-6 for s in lr), (lr, la)


def test_compile_with_recompute(data, tmp_path):
    a, b = tmp_path / "plain", tmp_path / "compiled"
    run("launch/pretrain.py", pretrain_args(data, a, 3, "--micro-batch-size", 2))
    run("launch/pretrain.py", pretrain_args(data, b, 3, "--micro-batch-size", 2, "--compile",
                                            "--checkpoint-activations"))
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2, 3]
    assert max(abs(la[s] - lb[s]) for s in la) < 1e-4, (la, lb)  # compiled kernels round differently
