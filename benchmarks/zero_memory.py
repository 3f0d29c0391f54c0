#!/usr/bin/env python
"""ZeRO-2 memory: optimizer-state bytes held by each rank at dp=1 vs dp=2 (2 real gloo ranks).

    python benchmarks/zero_memory.py             # small preset (~25M params)
    python benchmarks/zero_memory.py --quick     # tiny preset

Each world size is a fresh launch (dp=1: plain python; dp=2: torch.distributed.run, 2 processes) of this
script in --worker mode, which builds the engine exactly as launch/pretrain.py does with ds_configs/zero2.json,
takes one training step (torch's AdamW creates its moments lazily) and counts tensor bytes on rank 0:
  optimizer_state   AdamW exp_avg + exp_avg_sq (+ step) of this rank's flat fp32 partition
  master_weights    that fp32 partition itself (ZeRO keeps one even for fp32 training)
  grad_partition    the reduced gradient partition ZeRO-2 keeps for the step (stage 0: the module's .grad)
  model_weights     the full replicated module weights (not partitioned by ZeRO-1/2)
Our engine runs zero2.json as stage 0 at dp=1 (nothing to partition), so dp=1 has no master copy.
Expected, fp32, per parameter: dp=1 stage 0: 4 weights + 4 grads + 8 moments = 16 bytes; dp=2 ZeRO-2:
4 + 4/2 grads + 8/2 moments + 4/2 master = 12 bytes. So moments dp=2/dp=1 = 0.5, all state = 0.75.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import row, save_result  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "numel"))


def engine_memory(engine) -> dict:
    """Bytes per category (see module docstring) held by this rank's ZeRO optimizer and module."""
    zero = engine.optimizer
    opt = getattr(zero, "optimizer", zero)  # the torch AdamW inside DeepSpeed's ZeRO wrapper
    state = [t for s in opt.state.values() for t in s.values() if hasattr(t, "numel")]
    master = getattr(zero, "single_partition_of_fp32_groups", [])
    grads = [g for g in getattr(zero, "averaged_gradients", {}).values() if g is not None]
    grads = [t for g in grads for t in (g if isinstance(g, (list, tuple)) else [g])]
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return {"optimizer_state": tensor_bytes(state), "master_weights": tensor_bytes(master),
            "grad_partition": tensor_bytes(grads),
            "model_weights": tensor_bytes(list(engine.module.parameters())),
            "zero_stage": engine.zero_optimization_stage()}


def worker(a) -> None:
    import torch

    from benchmarks.train_throughput import start_rank

    rank, world, config, engine, _step, x, y = start_rank(a.preset, a.micro_batch, a.seq_length)
    # ZeRO-2 only keeps the gradient partition between backward and step; count it there.
    out = engine(x, y)
    engine.backward(out.loss)
    grads_before_step = engine_memory(engine)["grad_partition"]
    engine.step()
    mem = engine_memory(engine)
    mem["grad_partition"] = max(mem["grad_partition"], grads_before_step)
    t = torch.tensor([float(mem["optimizer_state"])])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        with open(a.worker_out, "w") as f:
            json.dump({"world": world, "params": config.num_params(), "max_rank_optimizer_state": float(t), **mem}, f)


def measure(preset: str, micro_batch: int, seq: int, log=print) -> dict:
    me = os.path.abspath(__file__)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = os.path.join(tmp, f"dp{world}.json")
            args = ["--worker", "--preset", preset, "--micro-batch", str(micro_batch), "--seq-length", str(seq),
                    "--worker-out", out]
            cmd = ([sys.executable, me, *args] if world == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", me, *args])
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            env.update(OMP_NUM_THREADS=str(max(1, 2 // world)), PYTHONPATH=ROOT)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if p.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            with open(out) as f:
                res[world] = json.load(f)
            m = res[world]
            log(f"  dp={world}: optimizer state {m['optimizer_state'] / 2**20:.1f} MiB, fp32 master partition "
                f"{m['master_weights'] / 2**20:.1f} MiB, grad partition {m['grad_partition'] / 2**20:.1f} MiB, "
                f"model weights {m['model_weights'] / 2**20:.1f} MiB per rank")
    return res


def run(preset="small", micro_batch=2, seq=64, results_dir=None, log=print) -> dict:
    log(f"{preset}: ZeRO-2 (ds_configs/zero2.json) per-rank bytes at dp=1 and dp=2 (gloo)")
    res = measure(preset, micro_batch, seq, log)
    one, two = res[1], res[2]
    rows = [row(f"ZeRO-2 {preset}: AdamW moments per rank, dp=2 / dp=1", two["optimizer_state"],
                one["optimizer_state"], "bytes", target=0.55, higher_is_better=False,
                note="expected 0.5 (+ alignment padding)", expected=0.5)]
    total = lambda m: sum(m[k] for k in ("optimizer_state", "master_weights", "grad_partition", "model_weights"))  # noqa: E731
    rows.append(row(f"ZeRO-2 {preset}: weights + grads + moments + master per rank, dp=2 / dp=1", total(two),
                    total(one), "bytes", target=0.8, higher_is_better=False,
                    note="expected 12/16 = 0.75 (fp32; dp=1 runs as stage 0)", expected=0.75))
    for rw in rows:
        log(f"  -> {rw['benchmark']}: {rw['ratio']:.3f} (expected {rw['expected']}; {'met' if rw['met'] else 'NOT met'})")
    result = {"preset": preset, "expected_ratio_moments": 0.5, "expected_ratio_total": 0.75, "dp1": one, "dp2": two,
              "rows": rows}
    save_result("zero_memory", result, results_dir)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset instead of small")
    p.add_argument("--preset", default=None, help="model preset (default small; quick: tiny)")
    p.add_argument("--micro-batch", type=int, default=2, help="micro batch of the one step taken (memory only)")
    p.add_argument("--seq-length", type=int, default=64, help="sequence length of that step")
    p.add_argument("--results-dir", default=None, help="where zero_memory.json goes (default benchmarks/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.preset = a.preset or "small"
        return worker(a)
    run(a.preset or ("tiny" if a.quick else "small"), a.micro_batch, a.seq_length, a.results_dir)


if __name__ == "__main__":
    main()
