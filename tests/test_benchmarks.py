"""Smoke test of the benchmark scripts' core functions on a micro model (1 timed step, no timing asserts):
the JSON they write has the fields benchmarks/run_all.py reads, and run_all turns it into a table and plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.config import get_preset

REPO = Path(__file__).resolve().parent.parent
MICRO = dict(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=256, max_seq_len=64)
ROW_FIELDS = {"benchmark", "ours", "peer", "unit", "ratio", "target", "target_op", "met"}

SCRIPT = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from benchmarks import train_throughput, moe_overhead
out = sys.argv[1]
quiet = lambda *a, **k: None
train_throughput.run(["tiny"], batch=2, seq=16, warmup=0, repeats=1, zero0=False, micro=False, results_dir=out,
                     log=quiet, config_overrides=dict({MICRO!r}, ffn_hidden_size=128), gemm_n=128)
moe_overhead.run("tiny-moe", batch=2, seq=16, warmup=0, repeats=1, ablations=False, results_dir=out, log=quiet,
                 **dict({MICRO!r}, ffn_hidden_size=64))
"""


def test_benchmark_core_functions_write_run_all_fields(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    train = json.loads((tmp_path / "train_throughput.json").read_text())
    assert {"ours", "plain", "hf"} <= set(train["presets"]["tiny"]["variants"])
    v = train["presets"]["tiny"]["variants"]
    assert v["hf"]["max_logit_diff_vs_ours"] < 1e-4  # HF got exactly our weights
    assert all(x["tokens_per_s"] > 0 and 0 < x["mfu"] for x in v.values())
    moe = json.loads((tmp_path / "moe_overhead.json").read_text())
    assert {"moe", "dense"} <= set(moe["variants"])
    assert moe["variants"]["moe"]["active_params"] == moe["variants"]["dense"]["active_params"] + 64 * 4 * 2  # + router and noise weights
    for data in (train, moe):
        assert "machine" in data and data["rows"]
        for r in data["rows"]:
            assert ROW_FIELDS <= set(r), r

    sys.path.insert(0, str(REPO))
    from benchmarks import run_all
    rows = run_all.rows_of("train_throughput", train) + run_all.rows_of("moe_overhead", moe)
    assert any(r["target"] == 1.1 for r in rows) and any(r["target"] == 1.3 for r in rows)
    run_all.RESULTS = tmp_path  # plot into tmp, not benchmarks/results
    assert run_all.plot_ratios("moe_overhead", moe["rows"]).exists()
    assert run_all.plot_variants("train_throughput", train).exists()


def test_decode_benchmark_rows_and_same_tokens(tmp_path):
    out = tmp_path / "decode.json"
    sets = [a for k, v in dict(MICRO, ffn_hidden_size=128).items() if k != "max_seq_len" for a in ("--set", f"{k}={v}")]
    p = subprocess.run([sys.executable, "benchmarks/decode.py", *sets, "--batch-sizes", "2", "--new-tokens", "4",
                        "--prompt-len", "8", "--prefill-len", "16", "--repeats", "1", "--no-compile",
                        "--threads", "1", "2", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    data = json.loads(out.read_text())
    assert [(r["threads"], r["batch"]) for r in data["runs"]] == [(1, 2), (2, 2)]  # one run per thread count
    assert all(r["same_tokens"] is True for r in data["runs"])  # ours and HF generate agree on the same weights
    assert [r["unit"] for r in data["rows"]] == ["tok/s"] * 6  # decode, prefill, the weight-matmul floor
    assert ["1 thread)" in r["benchmark"] for r in data["rows"]] == [True] * 3 + [False] * 3
    floor = data["rows"][2]
    assert "weight matmuls alone" in floor["benchmark"] and floor["target"] is None
    assert floor["ratio"] == pytest.approx(data["runs"][0]["floor_over_hf"]["wall"])
    decode_row = data["rows"][0]
    assert ROW_FIELDS <= set(decode_row) and decode_row["target"] == 2.0
    # one round: the median paired ratio is the ratio of that round's figures, up to the ratio's rounding to 0.01
    assert decode_row["ratio"] == pytest.approx(decode_row["ours"] / decode_row["peer"], rel=1e-2, abs=0.006)


def test_decode_floor_reads_every_weight_once():
    """The floor's matrices hold exactly the model's weights that a decode step multiplies by: the decode
    layout's fused blocks replace their parts, a tied embedding is read once, as the head, and an untied input
    embedding (a row lookup) not at all."""
    from benchmarks.decode import decode_matrices
    from megatron_lite.config import get_preset
    from megatron_lite.inference.fast_decode import use_decode_layout
    from megatron_lite.model.gpt import GPT

    for tie in (True, False):
        model = use_decode_layout(GPT(get_preset("tiny", tie_embeddings=tie)).eval())
        mats = decode_matrices(model)
        lookup = 0 if tie else model.embed_tokens.weight.numel()
        assert sum(m.numel() for m in mats) == sum(p.numel() for p in model.parameters() if p.dim() == 2) - lookup
        layer = model.layers[0]
        assert mats[0] is layer.self_attn.qkv_t and mats[1] is layer.mlp.gate_up_t  # fused: read in one product
        assert len(mats) == 4 * len(model.layers) + 1  # qkv, gate_up, o_proj, down_proj per layer; the head
        assert any(m.data_ptr() == model.output_weight().data_ptr() for m in mats)


def test_time_to_quality_scores_our_export_as_launch_eval_does(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    out = tmp_path / "ttq.json"
    p = subprocess.run([sys.executable, "benchmarks/time_to_quality.py", "--recipes", "ours-default",
                        "baseline-hf-llama", "--iters", "2", "--seq-length", "32", "--global-batch-size", "2",
                        "--micro-batch-size", "2", "--corpus-mb", "0.1", "--vocab-size", "300", "--points", "2",
                        "--eval-windows", "8", "--eval-batch-size", "4", "--threads", "1", "--work-dir", str(tmp_path),
                        "--output", str(out), "--plot", str(tmp_path / "ttq.png")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    data = json.loads(out.read_text())
    ours, base = data["runs"]
    assert (ours["recipe"], base["recipe"]) == ("ours-default", "baseline-hf-llama") and data["eval_windows"] == 8
    tiny = get_preset("tiny")  # ours has its QK-norm weights on top; the baseline is the plain Llama of its shapes
    assert ours["params"] - base["params"] == 2 * tiny.num_layers * tiny.head_dim
    assert ours["tokens"] == base["tokens"] == 2 * 2 * 32
    for r in data["runs"]:
        assert [c["step"] for c in r["curve"]] == [1, 2] and 0 < r["curve"][0]["seconds"] < r["curve"][1]["seconds"]
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * data["bits_per_byte_per_nat"])
        assert r["loss_at_budget"] is not None or r["train_seconds"] > data["wall_clock_budget_s"]
    assert base["nats_vs_reference"] == 0 and "baseline-hf-llama" in p.stdout  # the printed table
    assert all(ROW_FIELDS <= set(r) for r in data["rows"]) and data["rows"][0]["peer"] == base["loss"]
    assert (tmp_path / "ttq.png").stat().st_size > 0

    # Our evaluator on the HF export == our own eval of the checkpoint on the same held-out windows.
    data_dir = next(tmp_path.glob("data-*"))
    e = subprocess.run([sys.executable, "launch/eval.py", "--load", str(tmp_path / "runs/ours-default/ckpt"),
                        "--data-path", str(data_dir / "data/pretrain_valid_text_document"), "--split", "0,0,1",
                        "--splits", "test", "--seq-length", "32", "--micro-batch-size", "4", "--eval-iters", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-4000:]
    assert json.loads(e.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(ours["loss"], abs=1e-4)

    bad = subprocess.run([sys.executable, "benchmarks/time_to_quality.py", "--recipes", "muon"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "benchmarks/time_to_quality.py: error: unknown recipe 'muon'; choose from ours-default, ours-previous, "
        "baseline-hf-llama"]


def test_time_to_quality_defaults_to_the_main_jobs_budget():
    """The recipe is tuned with time_to_quality's default budget, so that budget must be the main job's."""
    import importlib.util

    def load(path):
        spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    main_job = load("launch/main_job.py")
    ttq, job = load("benchmarks/time_to_quality.py").parse_args([]), main_job.parse_args([])
    assert ttq.iters == job.pretrain_iters
    # --moe has budgets of its own (its steps cost more); a flag still wins
    moe = main_job.parse_args(["--moe", "--sft-iters", "7"])
    assert (moe.pretrain_iters, moe.sft_iters) == (main_job.ITERS["tiny-moe"][0], 7) != (job.pretrain_iters, 7)
    assert ttq.global_batch_size == job.micro_batch_size * job.nproc and ttq.seq_length == job.seq_length
