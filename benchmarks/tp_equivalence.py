"""Tensor parallelism changes the arithmetic layout, not the model: check it end to end through the CLI.

Runs `launch/pretrain.py` twice with the same seed and global batch — one process at tp 1, and
`deepspeed --num_gpus TP` at tp TP — then compares the per-step losses, and evaluates both checkpoints
with `launch/eval.py` in one process (the tp>1 checkpoint is gathered to tp 1 on load).

    python benchmarks/tp_equivalence.py                  # builds a small corpus + tokenizer itself
    python benchmarks/tp_equivalence.py --tokenizer TOK --data-path PREFIX_text_document --iters 10

Prints the largest loss difference and writes benchmarks/results/tp_equivalence.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_lite.parallel import free_port  # noqa: E402


def _run(cmd: list, env: dict) -> None:
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"tp_equivalence: command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")


def build_small_corpus(work: Path, env: dict) -> tuple[Path, str]:
    from megatron_lite.data.corpus import write_corpus

    write_corpus(str(work / "corpus"), pretrain_mb=0.5, sft_arith=10, seed=0)
    py = sys.executable
    _run([py, "tools/train_tokenizer.py", "--input", work / "corpus/pretrain_train.jsonl", "--vocab-size", 512,
          "--output-dir", work / "tok"], env)
    _run([py, "tools/preprocess_data.py", "--input", work / "corpus/pretrain_train.jsonl", "--output-prefix",
          work / "pt", "--tokenizer", work / "tok", "--append-eod"], env)
    return work / "tok", str(work / "pt_text_document")


def losses(ckpt: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def eval_loss(ckpt: Path, data_path: str, seq_length: int, seed: int, env: dict) -> float:
    out = ckpt.parent / f"{ckpt.name}_eval.jsonl"
    _run([sys.executable, "launch/eval.py", "--load", ckpt, "--data-path", data_path, "--seq-length", seq_length,
          "--eval-iters", 2, "--seed", seed, "--output", out], env)
    return json.loads(out.read_text().splitlines()[-1])["loss"]


def compare(tokenizer, data_path: str, work: Path, tp: int = 2, iters: int = 10, seq_length: int = 64,
            micro_batch_size: int = 4, seed: int = 7, model_flags: list | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    # AdamW whatever the preset's recipe: Muon under tp orthogonalises each shard on its own (blockwise), which
    # is a different update from tp 1's whole-matrix one, so it cannot show the layouts agree.
    common = [*(model_flags or ["--model", "tiny"]), "--optimizer", "adamw", "--tokenizer", tokenizer,
              "--data-path", data_path,
              "--seq-length", seq_length, "--micro-batch-size", micro_batch_size, "--train-iters", iters,
              "--log-interval", 1, "--seed", seed, "--save-interval", iters]
    single, parallel = work / "tp1", work / f"tp{tp}"
    for d in (single, parallel):
        shutil.rmtree(d, ignore_errors=True)
    _run([sys.executable, "launch/pretrain.py", *common, "--save", single], env)
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    _run([launcher, "--master_port", free_port(), "--num_gpus", tp, "launch/pretrain.py", *common, "--tp", tp,
          "--save", parallel], env)
    a, b = losses(single), losses(parallel)
    diffs = {s: abs(a[s] - b[s]) for s in a}
    ev1, ev2 = (eval_loss(c, data_path, seq_length, seed, env) for c in (single, parallel))
    return {"tp": tp, "iters": iters, "losses_tp1": a, f"losses_tp{tp}": b, "max_abs_loss_diff": max(diffs.values()),
            "eval_loss_tp1_ckpt": ev1, f"eval_loss_tp{tp}_ckpt_at_tp1": ev2, "eval_loss_diff": abs(ev1 - ev2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer directory (default: build a small one)")
    p.add_argument("--data-path", help="preprocessed prefix, e.g. P_text_document (default: build a small one)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the second run (default: 2)")
    p.add_argument("--iters", type=int, default=10, help="training steps compared (default: 10)")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per sample (default: 64)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per step (dp = 1 in both runs; default: 4)")
    p.add_argument("--work-dir", help="where checkpoints go (default: a temporary folder)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest acceptable loss difference (default: 1e-5)")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tp_equivalence_"))
    work.mkdir(parents=True, exist_ok=True)
    tok, data = args.tokenizer, args.data_path
    if not (tok and data):
        tok, data = build_small_corpus(work, {**os.environ, "PYTHONPATH": str(ROOT)})
    result = compare(tok, data, work, args.tp, args.iters, args.seq_length, args.micro_batch_size)
    result["tolerance"] = args.tolerance
    result["passed"] = result["max_abs_loss_diff"] <= args.tolerance and result["eval_loss_diff"] <= args.tolerance
    print(f"tp {args.tp} vs tp 1 over {args.iters} steps: max |loss diff| = {result['max_abs_loss_diff']:.2e}; "
          f"eval loss of the tp {args.tp} checkpoint loaded at tp 1 differs by {result['eval_loss_diff']:.2e} "
          f"-> {'PASS' if result['passed'] else 'FAIL'} (tolerance {args.tolerance:g})")
    from benchmarks.common import save_result

    save_result("tp_equivalence", result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
