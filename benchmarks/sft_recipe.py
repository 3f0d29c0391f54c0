"""SFT recipe variants from one pretrained main-job run, scored by held-out arithmetic exact match.

    python launch/main_job.py --work-dir RUN                  # the pretrained checkpoint, tokenizer, baseline SFT
    python benchmarks/sft_recipe.py --run RUN --variant arith40k-lr3e-3=40000:--lr,3e-3 [--variant ...] [--parallel 4]

A variant is NAME=SFT_ARITH:FLAGS: the embedded corpus regenerated with SFT_ARITH arithmetic conversations, then
`launch/sft.py` from RUN/ckpt_pretrain with the main job's SFT flags plus FLAGS (comma-separated, later flags win).
Every variant is scored on the same held-out questions (RUN/corpus/sft_valid.jsonl; held-out questions are chosen
by a hash of their text, so no variant trains on them). Variants run side by side (`--parallel`), which suits a GPU
that one tiny model leaves idle. Rows compare each variant's exact match with RUN/ckpt_sft (the main job's own SFT)
in benchmarks/results/sft_recipe.json; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import row, save_result  # noqa: E402
from megatron_lite.eval.arithmetic import format_by_op, heldout_questions, score_arithmetic  # noqa: E402
from megatron_lite.parallel import free_port  # noqa: E402


def sft_flags(run: Path, data: Path, out: Path) -> list[str]:
    """The main job's SFT command line (launch/main_job.py), on one process accumulating its 2-rank batch."""
    return ["--deepspeed", "ds_configs/zero2.json", "--grad-accum", "2", "--tokenizer", str(run / "tokenizer"),
            "--seed", "1234", "--log-interval", "5", "--eval-iters", "4", "--seq-length", "96",
            "--micro-batch-size", "16", "--pretrained", str(run / "ckpt_pretrain"), "--data-path", str(data),
            "--split", "95,5,0", "--train-iters", "250",
            "--eval-interval", "1000", "--save", str(out), "--save-interval", "100000"]


def run_variant(run: Path, name: str, arith: int, flags: list[str]) -> dict:
    work = run / "sft_recipe" / name
    corpus, log = work / "corpus", open(run / "sft_recipe" / f"{name}.log", "w")
    py = sys.executable
    t = time.perf_counter()
    for cmd in ([py, "-m", "megatron_lite.data.corpus", "--output-dir", corpus, "--sft-arith", arith],
                [py, "tools/preprocess_data.py", "--chat", "--input", corpus / "sft_train.jsonl", "--output-prefix",
                 work / "sft", "--tokenizer", run / "tokenizer", "--workers", "2"],
                [shutil.which("deepspeed") or Path(py).parent / "deepspeed", "--num_gpus", "1", "--master_port", free_port(), "launch/sft.py",
                 *sft_flags(run, work / "sft_text_document", work / "ckpt"), *flags]):
        subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - t
    return dict(name=name, sft_arith=arith, flags=flags, seconds=round(seconds, 1), **score(run, work / "ckpt"))


def score(run: Path, ckpt: Path) -> dict:
    import torch

    from megatron_lite.inference.loading import load_model

    model, tok = load_model(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    scores = score_arithmetic(model, tok, heldout_questions(run / "corpus/sft_valid.jsonl", 100))
    last = [json.loads(line) for line in open(ckpt / "metrics.jsonl") if '"loss"' in line][-1]
    return dict(exact_match=scores, last_loss=last["loss"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a main-job work dir (ckpt_pretrain/, tokenizer/, corpus/)")
    p.add_argument("--variant", action="append", required=True, help="NAME=SFT_ARITH:FLAG,VALUE,... (see above)")
    p.add_argument("--parallel", type=int, default=1, help="variants trained at the same time")
    a = p.parse_args(argv)
    run = Path(a.run).resolve()
    (run / "sft_recipe").mkdir(exist_ok=True)
    specs = []
    for v in a.variant:
        name, rest = v.split("=", 1)
        arith, _, flags = rest.partition(":")
        specs.append((name, int(arith), [f for f in flags.split(",") if f]))
    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(lambda s: run_variant(run, *s), specs))
    base = dict(name="main-job SFT", sft_arith=4000, flags=[], **score(run, run / "ckpt_sft"))
    rows = []
    for r in [base, *results]:
        em = r["exact_match"]
        print(f"{r['name']:<28} arith {r['sft_arith']:>6}  EM {em['correct']:>3}/{em['total']}  "
              f"({format_by_op(em)})  last loss {r['last_loss']:.3f}")
        if r is not base:
            rows.append(row(f"sft recipe {r['name']}: held-out arithmetic exact match vs the main job's SFT",
                            em["correct"], base["exact_match"]["correct"] or None, "of 100",
                            note=f"sft_arith {r['sft_arith']}, flags {' '.join(r['flags'])}"))
    save_result("sft_recipe", {"rows": rows, "baseline": base, "variants": results})


if __name__ == "__main__":
    main()
