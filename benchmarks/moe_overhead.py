#!/usr/bin/env python
"""MoE overhead: a training step of MiniMoE vs a dense MiniLLM with the same active parameters.

    python benchmarks/moe_overhead.py            # tiny-moe shape, batch 8 x 256, with ablations
    python benchmarks/moe_overhead.py --quick    # fewer repeats, no ablations

  moe    the `tiny-moe` preset (E experts of ffn F, top-k) through our DeepSpeed engine (ZeRO-2, 1 process)
  dense  the same preset with num_experts=0 and ffn_hidden_size = k x F: identical attention, embedding and
         active FFN weights per token, so the ratio is the price of routing (gate, noise, capacity padding,
         dispatch/combine, k small expert GEMMs instead of one wide one)
Ablations (full mode): moe with capacity_factor 1.0 (less padding) and moe without router noise.
All variants are timed turn about in one process; the ratio moe / dense is the median over rounds of the
paired step-time ratio (robust to bursts of foreign load; ratios of medians, of fastest steps and of process
CPU times, the one to read on a busy machine, are kept too). Target <= 1.3.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import paired_ratio, row, save_result, time_interleaved  # noqa: E402
from benchmarks.train_throughput import make_batch, ours_engine, single_process_dims  # noqa: E402


def configs(preset: str = "tiny-moe", ablations: bool = False, **overrides) -> dict:
    from megatron_lite.config import get_preset

    moe = get_preset(preset, **overrides)
    assert moe.is_moe, f"{preset} is not an MoE preset"
    out = {"moe": moe, "dense": moe.replace(num_experts=0, ffn_hidden_size=moe.topk * moe.ffn_hidden_size,
                                           name=f"{preset}-dense-equivalent")}
    if ablations:
        out["moe-capacity1.0"] = moe.replace(capacity_factor=1.0)
        out["moe-no-noise"] = moe.replace(router_noise=False)
    return out


def compare(cfgs: dict, batch: int = 8, seq: int = 256, warmup: int = 1, repeats: int = 7, log=print) -> dict:
    dims = single_process_dims()
    steps = {}
    for name, cfg in cfgs.items():
        _, step = ours_engine(cfg, dims, batch)
        x, y = make_batch(cfg, batch, seq)
        steps[name] = (lambda step=step, x=x, y=y: step(x, y))
        steps[name]()  # first step: allocations, DeepSpeed's lazy set-up
    timing = time_interleaved(steps, warmup=warmup, repeats=repeats)
    res = {}
    for name, tm in timing.items():
        cfg = cfgs[name]
        res[name] = {"step_s": tm["median"], "step_s_min": tm["min"], "step_s_max": tm["max"], "times": tm["times"],
                     "cpu_times": tm["cpu_times"],
                     "tokens_per_s": batch * seq / tm["median"], "params": cfg.num_params(),
                     "active_params": cfg.num_params(active_only=True)}
        log(f"  {name:16s} step {tm['median'] * 1e3:7.1f} ms [{tm['min'] * 1e3:.0f}-{tm['max'] * 1e3:.0f}]  "
            f"{res[name]['tokens_per_s']:7.0f} tok/s  params {cfg.num_params() / 1e6:.2f}M "
            f"(active {cfg.num_params(active_only=True) / 1e6:.2f}M)")
    return res


def run(preset="tiny-moe", batch=8, seq=256, warmup=1, repeats=7, ablations=True, results_dir=None, log=print,
        **overrides) -> dict:
    cfgs = configs(preset, ablations, **overrides)
    moe = cfgs["moe"]
    log(f"{preset}: {moe.num_experts} experts x ffn {moe.ffn_hidden_size}, top-{moe.topk}, capacity factor "
        f"{moe.capacity_factor}; dense twin ffn {cfgs['dense'].ffn_hidden_size}; batch {batch} x {seq}")
    res = compare(cfgs, batch, seq, warmup, repeats, log)
    def vs_dense(name, what, **kw):
        return row(f"MoE {preset} {what}", res[name]["step_s"], res["dense"]["step_s"], "s/step",
                   ratio=paired_ratio(res[name]["times"], res["dense"]["times"]), higher_is_better=False,
                   ratio_of_medians=res[name]["step_s"] / res["dense"]["step_s"],
                   ratio_of_fastest=res[name]["step_s_min"] / res["dense"]["step_s_min"],
                   ratio_cpu_time=paired_ratio(res[name]["cpu_times"], res["dense"]["cpu_times"]), **kw)
    rw = vs_dense("moe", "step time vs dense (same active params)", target=1.3)
    log(f"  -> moe / dense step time: {rw['ratio']:.3f} (of medians {rw['ratio_of_medians']:.3f}, of fastest "
        f"{rw['ratio_of_fastest']:.3f}, of CPU times {rw['ratio_cpu_time']:.3f}) (target <= 1.3: {'met' if rw['met'] else 'NOT met'})")
    rows = [rw]
    for name in res:
        if name.startswith("moe-"):
            rows.append(vs_dense(name, f"ablation {name[4:]} vs dense"))
            log(f"  -> {name} / dense: {rows[-1]['ratio']:.3f} (of fastest {rows[-1]['ratio_of_fastest']:.3f}, of CPU times {rows[-1]['ratio_cpu_time']:.3f})")
    result = {"preset": preset, "batch": batch, "seq_length": seq, "repeats": repeats,
              "configs": {k: c.to_dict() for k, c in cfgs.items()}, "variants": res, "rows": rows}
    save_result("moe_overhead", result, results_dir)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repeats, no ablations (about a minute)")
    p.add_argument("--preset", default="tiny-moe", help="MoE preset to measure (default tiny-moe)")
    p.add_argument("--batch", type=int, default=8, help="micro batch size, default 8")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence, default 256")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first, default 1")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 7; quick 3)")
    p.add_argument("--no-ablations", action="store_true", help="skip the capacity-1.0 and no-noise MoE variants")
    p.add_argument("--results-dir", default=None, help="where moe_overhead.json goes (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the single-process runs (default: torch's, i.e. OMP_NUM_THREADS or all "
                        "cores). With 1 thread, CPU time is pure work: the most load-proof ratio on a busy machine")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    run(a.preset, a.batch, a.seq_length, a.warmup, a.repeats or (3 if a.quick else 7),
        ablations=not (a.quick or a.no_ablations), results_dir=a.results_dir)


if __name__ == "__main__":
    main()
