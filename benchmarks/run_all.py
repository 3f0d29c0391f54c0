#!/usr/bin/env python
"""Run every benchmark in benchmarks/ and summarise: benchmarks/results.md (a table) + results/*.png.

    python benchmarks/run_all.py                 # every script, full mode
    python benchmarks/run_all.py --quick         # --quick passed to every script that has it
    python benchmarks/run_all.py --only train_throughput moe_overhead
    python benchmarks/run_all.py --report-only   # just rebuild results.md and the plots from results/*.json

Each script (every benchmarks/*.py but common.py, run_all.py and _*.py) runs as its own subprocess with a
time limit; its output goes to results/logs/NAME.log. A script that fails or times out is reported and the
others still run. The table then reads every results/*.json: a JSON's "rows" list (see common.row:
benchmark, ours, peer, unit, ratio, target, target_op, met) or, for scripts that write none, its
top-level "ours_vs_X" ratios with the figures of any field holding both "ours" and "X".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SKIP = {"common.py", "run_all.py", "__init__.py",
        "sft_recipe.py"}  # needs a main-job run to start from (--run): run by hand


def scripts(only=None) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP and not p.name.startswith("_"))
    if only:
        found = [p for p in found if p.stem in only]
    return found


def run_script(path: Path, quick: bool, timeout: int, log_dir: Path) -> dict:
    cmd = [sys.executable, str(path)]
    if quick and '"--quick"' in path.read_text():
        cmd.append("--quick")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{path.stem}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"== {' '.join(cmd[1:])} (limit {timeout} s, log {log.relative_to(ROOT)})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
    secs = time.perf_counter() - t
    print(f"   {status} in {secs:.0f} s", flush=True)
    if status != "ok":
        print("   last lines:\n" + "".join(log.read_text().splitlines(keepends=True)[-15:]), flush=True)
    return {"script": path.name, "status": status, "seconds": secs}


# ---------------------------------------------------------------------------------------------- table

def rows_of(name: str, data: dict) -> list[dict]:
    if isinstance(data.get("rows"), list):
        return data["rows"]
    rows = []  # fallback for result files without "rows": their ours_vs_X ratios
    for key, val in data.items():
        if key.startswith("ours_vs_") and isinstance(val, (int, float)):
            peer = key[len("ours_vs_"):]
            ours_fig = peer_fig = unit = None
            for field, d in data.items():
                if isinstance(d, dict) and "ours" in d and peer in d:
                    ours_fig, peer_fig, unit = d["ours"], d[peer], field
                    break
            rows.append({"benchmark": f"{name}: ours vs {peer}", "ours": ours_fig, "peer": peer_fig, "unit": unit,
                         "ratio": val, "target": data.get(f"target_{key}"), "target_op": ">=", "met": None})
    for run in data.get("runs", []) if isinstance(data.get("runs"), list) else []:
        # [{"batch": B, "ours": {metric: v}, "hf"|"peer"|"baseline": {metric: v}}, ...]: one row per rate metric
        peer = next((k for k in ("peer", "hf", "baseline") if isinstance(run.get(k), dict)), None)
        if not isinstance(run, dict) or not isinstance(run.get("ours"), dict) or peer is None:
            continue
        label = ", ".join(f"{k} {v}" for k, v in run.items() if isinstance(v, (int, str)) and not isinstance(v, bool))
        ours, theirs = run["ours"], run[peer]
        cpu_o, cpu_p = {}, {}
        if isinstance(ours.get("wall"), dict):  # {"wall": {metric: v}, "cpu": {metric: v}}
            cpu_o, cpu_p = ours.get("cpu") or {}, theirs.get("cpu") or {}
            ours, theirs = ours["wall"], theirs.get("wall") or {}
        for metric, v in ours.items():
            pv = theirs.get(metric)
            if metric.endswith("_s") and "per" not in metric and isinstance(v, (int, float)) and pv:
                cpu = cpu_o.get(metric) / cpu_p[metric] if cpu_o.get(metric) and cpu_p.get(metric) else None
                rows.append({"benchmark": f"{name} ({label}): {metric}, ours vs {peer}", "ours": v, "peer": pv,
                             "unit": metric, "ratio": v / pv, "ratio_cpu_time": cpu, "target": None,
                             "target_op": ">=", "met": None})
    return rows


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v / 2**20:.1f} Mi" if v == int(v) else f"{v:.3g}"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, int) and abs(v) >= 1e6:
        return f"{v / 2**20:.1f} Mi"
    return str(v)


def collect() -> dict[str, dict]:
    out = {}
    for p in sorted(RESULTS.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            print(f"warning: {p} is not valid JSON ({e}); skipped")
    return out


def write_table(results: dict[str, dict], runs: list[dict]) -> Path:
    def mach(d):
        return d.get("machine") if isinstance(d.get("machine"), dict) else {}
    machines = {json.dumps(mach(d), sort_keys=True) for d in results.values() if mach(d)}
    lines = ["# Benchmark results", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`python benchmarks/run_all.py`. Each script measures ours and the peer in the same run (interleaved "
             f"where timed), so the ratios hold even when the machine is busy; absolute figures do not.", ""]
    for m in sorted(machines):
        lines.append(f"Machine: `{m}`  ")
    loads = [x for d in results.values() for x in (mach(d).get("load_avg_1min"), d.get("load_avg_1min")) if x]
    cores = next((mach(d).get("cores") for d in results.values() if mach(d).get("cores")), os.cpu_count())
    if loads and cores and max(loads) > cores:
        lines.append(f"\n**Load average reached {max(loads):.1f} on {cores} cores while measuring: other work shared "
                     f"the machine; re-run on a quiet machine for absolute numbers.**")
    lines += ["", "ratio: median over interleaved rounds of the paired wall-time ratio. CPU-time ratio: the same on "
              "process CPU time, the figure to read when the load average exceeds the cores (with `--threads 1` "
              "it is pure work).", "",
              "| benchmark | ours | peer | unit | ratio | CPU-time ratio | target | met? |",
              "|---|---|---|---|---|---|---|---|"]
    for name, data in results.items():
        for r in rows_of(name, data):
            target = f"{r.get('target_op', '>=')} {r['target']:g}" if r.get("target") is not None else "—"
            lines.append(f"| {r['benchmark']} | {fmt(r.get('ours'))} | {fmt(r.get('peer'))} | {r.get('unit') or '—'} "
                         f"| {fmt(r.get('ratio'))} | {fmt(r.get('ratio_cpu_time'))} | {target} | {fmt(r.get('met'))} |")
    if runs:
        lines += ["", "| script | status | seconds |", "|---|---|---|"]
        lines += [f"| {r['script']} | {r['status']} | {r['seconds']:.0f} |" for r in runs]
    path = HERE / "results.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------------------------- plots

def plot_ratios(name: str, rows: list[dict]) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ratio") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(13, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    colors = ["tab:green" if r.get("met") else "tab:red" if r.get("met") is False else "tab:blue" for r in rows]
    ax.barh(list(ys), [r["ratio"] for r in rows], color=colors)
    for y, r in zip(ys, rows):
        if r.get("target") is not None:
            ax.plot([r["target"], r["target"]], [y - 0.4, y + 0.4], "k--", lw=1.5)
        ax.text(r["ratio"], y, f" {r['ratio']:.3g}", va="center")
    ax.set_yticks(list(ys), [r["benchmark"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (dashed: target; green met, red not met)")
    ax.set_title(name)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_variants(name: str, data: dict) -> Path | None:
    """tokens/s of every timed variant, when the JSON has them (train_throughput, moe_overhead)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {p: d["variants"] for p, d in data.get("presets", {}).items() if "variants" in d}
    if "variants" in data:
        groups[data.get("preset", name)] = data["variants"]
    groups = {g: {v: r["tokens_per_s"] for v, r in vs.items() if "tokens_per_s" in r} for g, vs in groups.items()}
    groups = {g: vs for g, vs in groups.items() if vs}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (g, vs) in zip(axes[0], groups.items()):
        ax.bar(list(vs), list(vs.values()), color=["tab:orange" if v == "hf" else "tab:blue" for v in vs])
        ax.set_title(f"{name}: {g}")
        ax.set_ylabel("tokens/s (median)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = RESULTS / f"{name}_tokens_per_s.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(runs: list[dict]) -> None:
    results = collect()
    write_table(results, runs)
    for name, data in results.items():
        for path in (plot_ratios(name, rows_of(name, data)), plot_variants(name, data)):
            if path:
                print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every script that accepts it")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these scripts (file stems)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per script (default 900; quick 400)")
    p.add_argument("--report-only", action="store_true", help="run nothing; rebuild results.md and plots")
    a = p.parse_args(argv)
    runs = []
    if not a.report_only:
        timeout = a.timeout or (400 if a.quick else 900)
        for s in scripts(a.only):
            runs.append(run_script(s, a.quick, timeout, RESULTS / "logs"))
    report(runs)
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
