"""The main job (launch/main_job.py, what `bash launch/quickstart.sh` runs) end to end at toy size: every
step's real command, 2 gloo ranks, then the artifacts a user reads (summary, loss-curve PNG, HF folder)."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from launch_utils import REPO, env

TOY = ["--corpus-mb", "0.4", "--vocab-size", "500", "--seq-length", "64", "--micro-batch-size", "4",
       "--pretrain-iters", "24", "--sft-iters", "8", "--sft-seq-length", "64", "--sft-micro-batch-size", "4",
       "--heldout-batches", "2", "--eval-questions", "5", "--harness", "off"]  # lm_eval: tests/test_harness.py


@pytest.mark.e2e
@pytest.mark.multirank
@pytest.mark.parametrize("variant", [[], ["--moe"]], ids=["dense", "moe"])
def test_main_job_end_to_end_at_toy_size(tmp_path, variant):
    work = tmp_path / "run"
    p = subprocess.run([sys.executable, "launch/main_job.py", "--work-dir", str(work), *TOY, *variant], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Summary" in p.stdout and "sample chats" in p.stdout
    assert ("MixtralForCausalLM" if variant else "Qwen3ForCausalLM") in p.stdout  # tiny has QK-norm

    summary = json.loads((work / "summary.json").read_text())
    first, last = map(float, summary["rows"]["pretrain loss (first -> last logged)"].split(" -> "))
    assert last < first - 0.5  # it learned something
    assert 0 < summary["heldout"]["bits_per_byte"] < 8 and math.isfinite(summary["heldout"]["loss"])
    assert summary["exact_match"]["total"] == 5 and len(summary["samples"]) == 3
    by_op = summary["exact_match"]["by_op"]
    assert set(by_op) <= {"+", "-", "x"} and sum(r["total"] for r in by_op.values()) == 5
    assert sum(r["correct"] for r in by_op.values()) == summary["exact_match"]["correct"]
    # Time to quality: every pretraining eval point, at increasing training-loop seconds.
    evals = [json.loads(x) for x in open(work / "ckpt_pretrain/metrics.jsonl") if '"eval_loss"' in x]
    ttq = summary["time_to_quality"]
    assert [(t["step"], t["valid_loss"]) for t in ttq] == [(r["step"], r["eval_loss"]) for r in evals] and ttq
    assert all(0 < a["train_seconds"] < b["train_seconds"] for a, b in zip(ttq, ttq[1:]))
    png = (work / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (work / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report and summary["samples"][0][0] in report
    assert summary["rows"]["held-out bits per byte"] in report and "| SFT | 8 |" in report

    # The exported folder is what stock transformers loads, with the SFT checkpoint's exact function.
    from transformers import AutoModelForCausalLM

    from megatron_lite.inference.loading import load_model
    hf = AutoModelForCausalLM.from_pretrained(str(work / "hf")).eval()
    ours, _ = load_model(work / "ckpt_sft")
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-4)


def test_exact_match_is_scored_per_operation():
    import random

    from megatron_lite.data.corpus import arithmetic_question
    from megatron_lite.eval.arithmetic import exact_match_by_op, format_by_op, question_op

    # Every question the corpus generates is attributed to the operation that produced its answer.
    rng = random.Random(0)
    for _ in range(200):
        q, ans = arithmetic_question(rng)
        a, b = map(int, re.findall(r"\d+", q))
        assert {"+": a + b, "-": a - b, "x": a * b}[question_op([{"role": "user", "content": q}])] == int(ans)

    def item(q, ans, system=False):
        return ([{"role": "system", "content": "Answer with the number only."}] if system else []) + \
            [{"role": "user", "content": q}], ans

    items = [item("What is 123 + 456?", "579"), item("Compute 999 + 1.", "1000", system=True),
             item("Calculate 5 - 712.", "-707"), item("7 - 7 = ?", "0"), item("What do you get for 12 * 34?", "408"),
             item("What does `json.dumps` do?", "4")]
    answers = [" 579\n", "100", "-707", "0", "480", "4"]
    scores = exact_match_by_op(items, answers)
    assert scores == {"correct": 4, "total": 6, "by_op": {"+": {"correct": 1, "total": 2}, "-": {"correct": 2, "total": 2},
                                                          "x": {"correct": 0, "total": 1},
                                                          "other": {"correct": 1, "total": 1}}}
    assert format_by_op(scores) == "+ 1/2  - 2/2  x 0/1  other 1/1"
