"""`--load` on another parallel layout, and layout-free (universal / fp32) copies of a checkpoint.

Each case trains straight on layout A, then resumes A's step-10 checkpoint on layout B with the same global
batch (micro x dp x grad-accum): B's losses must follow A's (fp32 on CPU). Runs are shared: the dense dp 2
run is the reference for dp 2 -> 1, for 1 -> 2 (chained from the dp 1 run's step-15 save) and for the
universal round trip; the optimizer state after resharding is compared with the straight run's too. MoE on
fewer ranks (other expert capacities) and bf16 (its own shard names, compared with fp32) have looser bounds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch_utils
from launch_utils import REPO, SMALL, copy_at, losses, pretrain_args, zero2_with
from launch_utils import env as _env
from megatron_lite.checkpoint.layout import tree_bytes
from megatron_lite.checkpoint.save import checkpoint_bytes
from megatron_lite.checkpoint.universal import convert_to_fp32, convert_to_universal, read_training_state
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

pytestmark = pytest.mark.multirank
TOL = 1e-5


def run(args: list, ranks: int = 1):
    return launch_utils.run("launch/pretrain.py", args, ranks, launcher="torchrun")


def assert_follows(straight: Path, resumed: Path, steps: range) -> None:
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(steps)
    assert max(abs(a[s] - b[s]) for s in steps) < TOL, [(s, a[s], b[s]) for s in steps]


def assert_same_state(a: Path, b: Path, tag: str) -> None:
    """Both runs' layout-free training state at `tag`: weights, both AdamW moments, step counts."""
    config = ModelConfig.load(a)
    x, y = read_training_state(a / tag, config), read_training_state(b / tag, config)
    assert sorted(x.params) == sorted(y.params) and x.steps == y.steps
    assert {k: sorted(v) for k, v in x.moments.items()} == {k: sorted(v) for k, v in y.moments.items()}
    # Another layout's reduction order changes gradients in their last bits, and AdamW turns that into update
    # differences up to a fraction of lr for the near-zero gradients; 1e-5 is 0.3 % of one step at lr 3e-3,
    # while a lost moment or step count moves weights by whole steps.
    for name in x.params:
        torch.testing.assert_close(y.params[name], x.params[name], atol=1e-5, rtol=1e-5)
    for k, moments in x.moments.items():  # round-off of other reduction orders, relative to the tensor
        for name, ref in moments.items():
            torch.testing.assert_close(y.moments[k][name], ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    assert x.client["consumed_samples"] == y.client["consumed_samples"]


MOE_FEWER_RANKS = 0.02  # relative loss difference allowed where expert capacity and router noise change


def assert_moments_resumed(saved: Path, next_step: Path) -> None:
    """`next_step` is one AdamW step after resuming `saved` on another layout. Its gradient is unknown (another
    token routing), but AdamW's update m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2 pins it down: g from
    the first moment must give the second. That holds for every parameter, each expert's included, only if
    both moments (and the step count) were restored; a lost state (m = v = 0) breaks it."""
    config = ModelConfig.load(saved.parent)
    b1, b2 = json.loads((saved.parent / "ds_config.json").read_text())["optimizer"]["params"]["betas"]
    x, y = read_training_state(saved, config), read_training_state(next_step, config)
    assert sorted(x.params) == sorted(y.params) and sum("deepspeed_experts" in n for n in y.params) > 0
    assert set(y.steps.values()) == {max(x.steps.values()) + 1} and set(x.steps.values()) == {max(x.steps.values())}
    for name, m in y.moments["exp_avg"].items():
        g = (m - b1 * x.moments["exp_avg"][name]) / (1 - b1)
        want = b2 * x.moments["exp_avg_sq"][name] + (1 - b2) * g * g
        got = y.moments["exp_avg_sq"][name]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(got.abs().max()), msg=name)


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def dense(data, tmp_path_factory):
    """20 steps straight at dp 2 (ZeRO-2, micro 2: global batch 4), saved at 10 and 20."""
    save = tmp_path_factory.mktemp("reshard_dense") / "dp2"
    run(pretrain_args(data, save, 20, "--micro-batch-size", 2, "--save-interval", 10), ranks=2)
    return save


def test_dense_dp2_to_dp1_to_dp2_and_universal_round_trip(dense, data, tmp_path):
    one = copy_at(dense, tmp_path / "dp1", 10)
    p = run(pretrain_args(data, one, 20, "--micro-batch-size", 2, "--grad-accum", 2, "--save-interval", 5,
                          "--load", one))
    assert (f"--load {one}: resharding the training state from dp 2, tp 1, ep 1, ZeRO stage 1/2 to dp 1, tp 1, "
            "ep 1, no ZeRO (stage 0)") in p.stdout
    assert_follows(dense, one, range(11, 21))
    assert_same_state(dense, one, "global_step20")

    two = copy_at(one, tmp_path / "dp2", 15)
    p = run(pretrain_args(data, two, 20, "--micro-batch-size", 2, "--load", two), ranks=2)
    assert "from dp 1, tp 1, ep 1, no ZeRO (stage 0) to dp 2, tp 1, ep 1, ZeRO stage 1/2" in p.stdout
    assert_follows(dense, two, range(16, 21))

    # The universal copy of the dp 1 step-15 checkpoint resumes at that layout with the same losses.
    uni = tmp_path / "universal"
    c = convert("--load", one, "--tag", "global_step15", "--output", uni)
    assert c.returncode == 0, c.stderr
    assert (uni / "latest").read_text() == "global_step15" and not list(uni.glob("tmp-*"))
    p = run(pretrain_args(data, uni, 20, "--micro-batch-size", 2, "--grad-accum", 2, "--load", uni))
    assert f"--load {uni}: universal checkpoint, resharding the training state to dp 1" in p.stdout
    assert_follows(dense, uni, range(16, 21))
    assert_same_state(dense, uni, "global_step20")


def test_broken_universal_folder_is_one_line(dense, data, tmp_path):
    from megatron_lite.training.cli import main

    uni = tmp_path / "uni"
    convert_to_universal(dense, uni)
    args = [*SMALL, "--tokenizer", str(data["tok"]), "--data-path", data["pt"], "--train-iters", "30",
            "--lr", "3e-3", "--warmup-iters", "2", "--optimizer", "adamw", "--micro-batch-size", "2",
            "--grad-accum", "2", "--load", str(uni)]
    # Mismatched: a tensor file (sizes listed right) without one of the model's weights.
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(uni, tmp_path / "bad")
    f, meta = bad / "global_step20" / "fp32.safetensors", bad / "global_step20" / "universal.json"
    save_file({k: v for k, v in load_file(str(f)).items() if k != "norm.weight"}, str(f))
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "files": {
        **json.loads(meta.read_text())["files"], "fp32.safetensors": f.stat().st_size}}))
    with pytest.raises(UserError, match=f"{f} does not match the model.*missing \\['norm.weight'\\]"):
        main("pretrain", [*args[:-1], str(bad)])
    # Truncated, then missing.
    f = uni / "global_step20" / "exp_avg.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{f} has 1000 bytes.*truncated"):
        main("pretrain", args)
    f.unlink()
    with pytest.raises(UserError, match=f"{f} is missing"):
        main("pretrain", args)
    # Another optimizer than the saved state's, and DeepSpeed's fp16 optimizer (bf16 without ZeRO): refused
    # before anything starts.
    with pytest.raises(UserError, match="holds adamw optimizer state, this run uses --optimizer muon"):
        main("pretrain", [*args[:-1], str(dense), "--optimizer", "muon"])
    bf16 = tmp_path / "bf16.json"
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    bf16.write_text(json.dumps({**zero2, "bf16": {"enabled": True}}))
    with pytest.raises(UserError, match="cannot be resharded into this bf16/fp16 run without ZeRO"):
        main("pretrain", [*args[:-1], str(dense), "--deepspeed", str(bf16)])
    # A failed conversion leaves nothing behind.
    c = convert("--load", uni, "--output", tmp_path / "again")
    assert c.returncode == 2 and c.stderr.count("\n") == 1 and "missing" in c.stderr, c.stderr
    assert not (tmp_path / "again" / "latest").exists() and not list((tmp_path / "again").glob("tmp-*"))


# bf16 vs fp32 over the first 10 steps, relative to the loss: bf16's unit round-off (2^-9). The weights and
# activations are rounded to 8 significant bits, but the loss is a mean over every token of fp32 cross entropy,
# where the per-value errors largely cancel, so a correct bf16 run stays well inside one bf16 rounding of the
# fp32 loss, while a wrong one (bad master weights, no update, a lost gradient) moves it by far more.
BF16_VS_FP32 = 2.0 ** -9


def test_bf16_zero2_resumes_exactly_tracks_fp32_and_exports_to_hf(dense, data, tmp_path):
    """bf16 (ZeRO-2, 2 CPU ranks): DeepSpeed's bf16 names its shards bf16_zero_pp_rank_*; the same layout resumes
    through its own loader with identical losses, the losses stay near the fp32 run's, and the HF export holds
    the bf16 weights the run computed with (its fp32 master weights rounded to bf16)."""
    from transformers import AutoModelForCausalLM

    from megatron_lite.checkpoint.load import load_full_state_dict, model_from_state_dict

    cfg = tmp_path / "bf16.json"
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg.write_text(json.dumps({**zero2, "bf16": {"enabled": True}}))
    bf16 = tmp_path / "bf16"
    run(pretrain_args(data, bf16, 20, "--micro-batch-size", 2, "--save-interval", 10, "--deepspeed", cfg), ranks=2)
    assert sorted(f.name for f in (bf16 / "global_step10").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    resumed = copy_at(bf16, tmp_path / "resumed", 10)
    p = run(pretrain_args(data, resumed, 20, "--micro-batch-size", 2, "--deepspeed", cfg, "--load", resumed), ranks=2)
    assert "resharding" not in p.stdout
    a, b = losses(bf16), losses(resumed)
    assert sorted(b) == list(range(11, 21)) and all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]
    fp32 = losses(dense)
    assert max(abs(a[s] - fp32[s]) / fp32[s] for s in range(1, 11)) < BF16_VS_FP32, [(s, a[s], fp32[s]) for s in a]
    assert fp32[1] - fp32[10] > 0.5 and a[1] - a[10] > 0.5  # both train: the bound above is not vacuous

    # The export: the module's bf16 weights, which are the fp32 masters (ZeRO shards) rounded to bf16.
    config, weights = load_full_state_dict(bf16)
    masters = read_training_state(bf16 / "global_step20", config).params
    assert sorted(weights) == sorted(masters) and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert all(torch.equal(weights[k], masters[k].to(torch.bfloat16)) for k in weights)
    sys.path.insert(0, str(REPO / "tools"))
    import convert_to_hf

    convert_to_hf.main(["--load", str(bf16), "--output", str(tmp_path / "hf")])
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):  # same weights, computed in fp32, then in bf16 on both sides
        ours = model_from_state_dict(config, weights, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
        assert hf.dtype == dtype
        with torch.no_grad():
            x, y = ours(ids).logits.float(), hf(ids).logits.float()
        # fp32: round-off only; bf16: two bf16 roundings (2^-8 each) of the largest logit
        tol = 1e-4 if dtype == torch.float32 else 2 * 2.0 ** -8 * x.abs().max().item()
        assert x.std() > 0.5 and (x - y).abs().max().item() < tol, (dtype, (x - y).abs().max().item())


def test_tp2_to_tp1(data, tmp_path):
    tp2 = tmp_path / "tp2"
    run(pretrain_args(data, tp2, 20, "--micro-batch-size", 2, "--grad-accum", 2, "--tp", 2, "--save-interval", 10),
        ranks=2)
    one = copy_at(tp2, tmp_path / "tp1", 10)
    p = run(pretrain_args(data, one, 20, "--micro-batch-size", 2, "--grad-accum", 2, "--load", one))
    assert "from dp 1, tp 2, ep 1, no ZeRO (stage 0) to dp 1, tp 1, ep 1, no ZeRO (stage 0)" in p.stdout
    assert_follows(tp2, one, range(11, 21))
    assert_same_state(tp2, one, "global_step20")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_moe_ep2_to_ep1_to_ep2_at_dp2_to_one_rank_and_fp32_export(data, tmp_path, optimizer):
    """One straight (ep 2, dp 2) MoE run is the reference for (ep 1, dp 2), back to (ep 2, dp 2), and (AdamW) one
    rank. Muon (tiny-moe's recipe) keeps ZeRO at dp 1, so the one-rank, no-ZeRO layout below is AdamW's. Muon runs
    its fp32 Newton-Schulz ("gram"): the CPU default's bf16 iterations would amplify the last-bit differences that
    another expert layout's gradient reduction order makes (~4e-5 of the loss) past this test's exactness."""
    (tmp_path / "zero2.json").write_text(json.dumps(zero2_with(ns_method="gram")))

    def args(save, ep, *extra):
        return ["--model", "tiny-moe", *SMALL, "--num-experts", 4, "--topk", 2, "--ep", ep, "--tokenizer",
                data["tok"], "--data-path", data["pt"], "--train-iters", 20, "--micro-batch-size", 2, "--lr", "3e-3",
                "--optimizer", optimizer, "--deepspeed", tmp_path / "zero2.json", "--save", save, *extra]

    ep2 = tmp_path / "ep2"
    run(args(ep2, 2, "--save-interval", 10), ranks=2)
    ep1 = copy_at(ep2, tmp_path / "ep1", 10)
    p = run(args(ep1, 1, "--load", ep1, "--save-interval", 5), ranks=2)
    assert "from dp 2, tp 1, ep 2, ZeRO stage 1/2 to dp 2, tp 1, ep 1, ZeRO stage 1/2" in p.stdout
    assert_follows(ep2, ep1, range(11, 21))
    assert_same_state(ep2, ep1, "global_step20")
    # And back: ep 1's step-15 save split over 2 expert-parallel ranks again (global expert ids -> local).
    back = copy_at(ep1, tmp_path / "back", 15)
    p = run(args(back, 2, "--load", back), ranks=2)
    assert "from dp 2, tp 1, ep 1, ZeRO stage 1/2 to dp 2, tp 1, ep 2, ZeRO stage 1/2" in p.stdout
    assert_follows(ep2, back, range(16, 21))
    assert_same_state(ep2, back, "global_step20")
    if optimizer == "muon":
        return

    # Onto one rank (ep 1, dp 1, no ZeRO), same global batch as one micro-batch of 4: each forward now routes
    # twice the tokens, so expert capacities (and the router noise, drawn per data-parallel rank) change and
    # the run follows the straight one closely but not exactly.
    one = copy_at(ep2, tmp_path / "one", 10)
    p = run(args(one, 1, "--load", one, "--micro-batch-size", 4, "--save-interval", 11))
    assert "from dp 2, tp 1, ep 2, ZeRO stage 1/2 to dp 1, tp 1, ep 1, no ZeRO (stage 0)" in p.stdout
    a, b, rows = losses(ep2), losses(one), {m["step"]: m for m in launch_utils.metrics(one)}
    assert sorted(b) == list(range(11, 21))
    assert max(abs(b[s] - a[s]) / a[s] for s in b) < MOE_FEWER_RANKS, [(s, a[s], b[s]) for s in b]
    straight = {m["step"]: m for m in launch_utils.metrics(ep2)}
    assert all(rows[s]["lr"] == straight[s]["lr"] and rows[s]["consumed_samples"] == straight[s]["consumed_samples"]
               for s in b)  # the schedule and the data continue where the checkpoint stopped
    assert_moments_resumed(ep2 / "global_step10", one / "global_step11")

    # --to fp32 of the ep 2 checkpoint: every expert under its global id, equal to the saved weights.
    from safetensors.torch import load_file

    from megatron_lite.checkpoint.load import load_full_state_dict
    from megatron_lite.model.gpt import GPT

    convert_to_fp32(ep2, tmp_path / "fp32")
    weights = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    config, saved = load_full_state_dict(ep2)
    assert sorted(weights) == sorted(saved) == sorted(GPT(config).state_dict())
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
    assert ModelConfig.load(tmp_path / "fp32") == config


def test_muon_dp1_to_dp2_and_universal_copy(data, tmp_path):
    """Muon keeps the full momentum of each matrix on every rank whose ZeRO partition holds part of it."""
    one = tmp_path / "dp1"  # 8 steps (4 + 4): Newton-Schulz makes Muon's CPU steps the slow ones here
    run(pretrain_args(data, one, 8, "--micro-batch-size", 2, "--grad-accum", 2, "--optimizer", "muon",
                      "--save-interval", 4))
    two = copy_at(one, tmp_path / "dp2", 4)
    p = run(pretrain_args(data, two, 8, "--micro-batch-size", 2, "--optimizer", "muon", "--load", two), ranks=2)
    assert "from dp 1, tp 1, ep 1, ZeRO stage 1/2 to dp 2, tp 1, ep 1, ZeRO stage 1/2" in p.stdout
    assert_follows(one, two, range(5, 9))
    assert_same_state(one, two, "global_step8")
    state = read_training_state(one / "global_step8", ModelConfig.load(one))
    assert sorted(state.moments) == ["exp_avg", "exp_avg_sq", "momentum_buffer"]
    assert "layers.0.self_attn.q_proj.weight" in state.moments["momentum_buffer"]  # a matrix: Muon's
    assert "layers.0.input_layernorm.weight" in state.moments["exp_avg"]  # a norm: the AdamW side's
    # The --save pre-flight's estimate counts Muon's single moment: it bounds the real size closely.
    size = tree_bytes(two / "global_step8")
    assert size <= checkpoint_bytes(ModelConfig.load(two), json.loads((two / "ds_config.json").read_text())) \
        <= 1.1 * size + 2 ** 18

    # Its universal copy holds the same state, Muon's momentum included.
    uni = tmp_path / "universal"
    convert_to_universal(two, uni)
    assert (uni / "global_step8" / "momentum_buffer.safetensors").is_file()
    assert_same_state(two, uni, "global_step8")
