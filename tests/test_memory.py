"""The memory pre-flight (megatron_lite/training/memory.py): its estimate against the bytes a real engine holds,
and the one-line refusal of a model that cannot fit."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=128)


def _state_bytes_worker(rank: int, world: int, moe: bool) -> dict:
    """After one step: bytes of every weight, gradient and optimizer-state tensor this rank holds, by owner."""
    import torch

    from megatron_lite.config import get_preset
    from megatron_lite.parallel import ParallelDims, init_distributed
    from megatron_lite.training.ds_config import load_ds_config, resolve_ds_config
    from megatron_lite.training.engine import build_engine, build_model
    from megatron_lite.training.memory import model_state_bytes

    init_distributed()
    config = get_preset("tiny-moe" if moe else "tiny", **MODEL, **(dict(num_experts=4, topk=2) if moe else {}))
    dims = ParallelDims.from_world(world, ep=2 if moe else 1, num_experts=4 if moe else None).build()
    cfg = resolve_ds_config(load_ds_config(str(REPO / "ds_configs/zero2.json")), dims.dp, micro_batch_size=2,
                            lr=1e-3, warmup_iters=0, train_iters=10)
    engine = build_engine(build_model(config, dims, seed=0), cfg, dims)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = engine(x[:, :-1], x[:, 1:])
    engine.backward(out.loss if out.aux_loss is None else out.loss + out.aux_loss)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
    engine.step()

    def nbytes(t):
        return t.numel() * t.element_size() if torch.is_tensor(t) and t.dim() > 0 else 0

    weights = sum(nbytes(p) for p in engine.module.parameters())
    opt = engine.optimizer
    moments = sum(nbytes(v) for s in getattr(opt, "state", {}).values() for v in s.values())
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1/2: fp32 partitions, their moments
        master = sum(nbytes(t) for t in opt.single_partition_of_fp32_groups)
        moments = sum(nbytes(v) for t in opt.single_partition_of_fp32_groups for v in opt.optimizer.state[t].values())
    else:
        master = 0
    return dict(stage=engine.zero_optimization_stage(), weights=weights, grads=grads, master=master,
                moments=moments, estimate=model_state_bytes(config, dims, cfg))


@pytest.mark.multirank
def test_estimate_is_exact_without_zero_and_a_lower_bound_with_zero2():
    one = run_distributed(_state_bytes_worker, world_size=1, args=(False,), timeout=300)[0]
    assert one["stage"] == 0 and one["master"] == 0
    # no ZeRO: weights, gradients and both AdamW moments of every weight, nothing else
    assert one["estimate"] == one["weights"] + one["grads"] + one["moments"]
    for r in run_distributed(_state_bytes_worker, world_size=2, args=(True,), timeout=300):
        assert r["stage"] == 2
        # ZeRO-2, MoE ep 2: this rank's weights, its fp32 master partition and moments are counted exactly; the
        # reduced gradient partition (16 B per partition parameter in all) is the part not read back here
        held = r["weights"] + r["master"] + r["moments"]
        assert held <= r["estimate"] <= held + r["master"] * 1.01, r


def test_a_model_that_cannot_fit_is_refused_in_one_line_before_anything_is_built(tiny_data, monkeypatch):
    """A 100B-parameter model on this host: refused by the pre-flight, in-process, before DeepSpeed starts."""
    import megatron_lite.training.cli as cli
    from megatron_lite.errors import UserError

    def must_not_run(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "start_distributed", must_not_run)
    with pytest.raises(UserError, match=r"needs at least [\d.]+ GiB per rank") as e:
        cli.main("pretrain", ["--tokenizer", str(tiny_data["tok"]), "--data-path", tiny_data["pt"],
                              "--train-iters", "1", "--hidden-size", "16384", "--num-layers", "48",
                              "--ffn-hidden-size", "65536", "--num-heads", "128", "--num-kv-heads", "8"])
    assert "\n" not in str(e.value)
