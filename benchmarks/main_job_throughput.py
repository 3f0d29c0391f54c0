#!/usr/bin/env python
"""Main-job pretraining layout on CPU: N deepspeed ranks x T threads at the same global batch.

    python benchmarks/main_job_throughput.py --data-path D/pretrain_train_text_document --tokenizer TOK \\
        [--iters 30] [--repeats 2]

Runs the main job's own pretraining command (`deepspeed --num_gpus N launch/pretrain.py --deepspeed
ds_configs/zero2.json`, `tiny`, micro-batch 8 x 256 tokens, global batch 16) as 2 ranks x 1 thread and as
1 rank x 2 threads (--grad-accum 2), alternating the order each repeat so both see the same load drift.
Reports tokens/s from metrics.jsonl (the first log interval, which holds start-up, is dropped), the
command's wall time and its CPU seconds (all processes), and the paired ratio per repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"2 ranks x 1 thread": (2, 1, 1), "1 rank x 2 threads": (1, 2, 2)}  # nproc, threads, grad accum


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args, nproc: int, threads: int, accum: int) -> dict:
    save = tempfile.mkdtemp(prefix="mjt_")
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), "launch/pretrain.py",
           "--deepspeed", "ds_configs/zero2.json", "--model", "tiny", "--tokenizer", args.tokenizer,
           "--seq-length", "256", "--micro-batch-size", "8", "--grad-accum", str(accum),
           "--data-path", args.data_path, "--split", "969,30,1", "--train-iters", str(args.iters),
           "--log-interval", str(args.log_interval), "--eval-interval", "0", "--seed", "1234", "--save", save]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(os.path.join(save, "metrics.jsonl")) if '"tokens_per_s"' in x]
    shutil.rmtree(save, ignore_errors=True)
    steady = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    return {"tokens_per_s": statistics.mean(steady), "wall_s": wall,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "mfu": rows[-1].get("mfu"), "loss_last": rows[-1]["loss"], "cmd": " ".join(cmd)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="pretraining data prefix (preprocess_data.py output)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder the data was made with")
    p.add_argument("--iters", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--log-interval", type=int, default=10, help="steps per logged tokens/s (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of both layouts (default 2)")
    p.add_argument("--output", default=None, help="JSON file for the raw results")
    args = p.parse_args(argv)
    names = list(LAYOUTS)
    rounds = []
    for r in range(args.repeats):
        res = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            res[name] = run_one(args, *LAYOUTS[name])
            print(f"round {r + 1} {name}: {res[name]['tokens_per_s']:,.0f} tok/s, wall {res[name]['wall_s']:.1f} s, "
                  f"cpu {res[name]['cpu_s']:.1f} s, mfu {res[name]['mfu']}, load {os.getloadavg()[0]:.2f}",
                  flush=True)
        ratio = res[names[1]]["tokens_per_s"] / res[names[0]]["tokens_per_s"]
        print(f"round {r + 1}: {names[1]} / {names[0]} tokens/s = {ratio:.2f}", flush=True)
        rounds.append({"results": res, "ratio": ratio})
    print(f"median ratio {statistics.median(x['ratio'] for x in rounds):.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(rounds, indent=2) + "\n")


if __name__ == "__main__":
    main()
