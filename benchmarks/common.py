"""Shared helpers for the benchmark scripts: timing, this machine's fp32 GEMM peak, results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def measure_gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best observed fp32 matmul FLOP/s on this machine (the denominator of MFU), measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def time_steps(step, warmup: int, iters: int) -> float:
    """Median seconds per call of `step()` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def time_interleaved(steps: dict, warmup: int, repeats: int, inner: int = 1) -> dict:
    """Median and spread of seconds per call for several `step()`s timed turn about (A B C, C B A, ...).

    On a shared machine the load drifts; alternating the variants in one process exposes each to the same
    drift, so their *ratio* stays meaningful even when the absolute numbers do not.
    Returns {name: {"median": s, "min": s, "max": s, "n": repeats, "times": [s per round],
    "cpu_times": [process CPU s per round]}}; `paired_ratio` turns two of them into a load-robust ratio.
    CPU time (all threads of this process) counts only the time we actually ran: when foreign load steals the
    cores, wall time balloons but CPU time barely moves, so its ratios are the ones to read on a busy machine.
    """
    for f in steps.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                steps[name]()
            cpu[name].append((time.process_time() - c) / inner)
            times[name].append((time.perf_counter() - t) / inner)
    return {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts), "times": ts,
                   "cpu_times": cpu[name]} for name, ts in times.items()}


def paired_ratio(slow: list, fast: list) -> float:
    """Median over rounds of slow[r] / fast[r] for two variants timed in the same rounds of time_interleaved.

    A burst of foreign load that hits one step spoils one round's ratio, which the median then discards; the
    ratio of the two medians would instead absorb it whenever bursts hit the variants unevenly."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def row(benchmark: str, ours: float, peer: float | None, unit: str, ratio: float | None = None,
        target: float | None = None, higher_is_better: bool = True, note: str = "", **extra) -> dict:
    """One line of benchmarks/results.md: the fields run_all.py reads from every result JSON's "rows".

    ratio defaults to ours / peer; `met` compares it with `target` (>= when higher is better, else <=).
    `extra` fields (e.g. the ratio of the fastest repeats, less sensitive to load) ride along unread."""
    if ratio is None and peer:
        ratio = ours / peer
    met = None
    if target is not None and ratio is not None:
        met = bool(ratio >= target) if higher_is_better else bool(ratio <= target)
    return {"benchmark": benchmark, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio,
            "target": target, "target_op": ">=" if higher_is_better else "<=", "met": met, "note": note, **extra}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,)
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg_1min": load[0]}  # > cores means other work shared the machine: trust ratios, not absolutes


def save_result(name: str, result: dict, results_dir: str | Path | None = None) -> Path:
    out = Path(results_dir) if results_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
