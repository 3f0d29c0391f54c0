#!/usr/bin/env python
"""Memory and speed of the reference sizes on 2 CPU ranks with ZeRO-2, with and without activation checkpointing.

    python benchmarks/scale.py            # small at micro batch 8 x 512 both ways, mini-llm at 1 x 512, fit arithmetic
    python benchmarks/scale.py --quick    # tiny at 4 x 256 both ways (a minute or two), arithmetic
    python benchmarks/scale.py --presets small --steps 2

Each variant is a fresh 2-rank launch (torch.distributed.run, gloo, one thread per rank) of this script in
--worker mode, which builds the engine as launch/pretrain.py does (ds_configs/zero2.json, `build_model`,
`checkpoint_blocks` for --checkpoint-activations, `build_engine`) and trains on random tokens of the
preset's own vocabulary. Per rank it records:
  peak_rss           VmHWM of the whole process (torch + DeepSpeed runtime, weights, ZeRO state, activations)
  step_peak_over_base the memory a training step adds: after one warm-up step (AdamW moments exist) the
                     kernel's peak counter is reset (/proc/self/clear_refs 5), the timed steps run, and this
                     is VmHWM then minus VmRSS just before. It holds the activations kept for backward, the
                     gradients before ZeRO reduces them into its partition, and temporaries. glibc is told to
                     serve every allocation over 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave
                     the RSS and the figure tracks live tensors rather than the allocator's cache.
  optimizer bytes    AdamW moments, fp32 master partition, gradient partition, module weights
                     (benchmarks/zero_memory.engine_memory)
  step_s             median seconds per optimizer step (the slower rank), after the warm-up step
The acceptance row: small at 8 x 512, step_peak_over_base with / without checkpointing <= 0.6.

Then the fit arithmetic for this machine (its MemTotal): ZeRO-2 fp32 bytes per rank = 4 per local parameter
(the module's weights, replicated) + 16 per parameter of its ZeRO partition (4 gradient + 8 AdamW moments +
4 fp32 master copy; see zero_memory.py), where experts are partitioned over dp / ep ranks and everything
else over dp; plus the measured runtime and activation overhead of a rank (peak RSS minus that state).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import row, save_result  # noqa: E402

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
GIB = 2**30


def proc_status() -> dict:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------------------------------------- worker

def worker(a) -> None:
    import torch.distributed as dist

    from benchmarks.train_throughput import make_batch, quiet_deepspeed
    from benchmarks.zero_memory import engine_memory
    from megatron_lite.config import get_preset
    from megatron_lite.parallel import ParallelDims, init_distributed
    from megatron_lite.training.activation_checkpointing import checkpoint_blocks
    from megatron_lite.training.ds_config import load_ds_config, resolve_ds_config
    from megatron_lite.training.engine import build_engine, build_model

    quiet_deepspeed()
    rank, world = init_distributed()
    config = get_preset(a.preset)
    dims = ParallelDims.from_world(world, ep=a.ep, num_experts=config.num_experts if config.is_moe else None).build()
    ds_config = resolve_ds_config(load_ds_config(ZERO2), dims.dp, micro_batch_size=a.micro_batch,
                                  train_iters=10**6)
    model = build_model(config, dims, 1234)
    if a.checkpoint_activations:
        checkpoint_blocks(model)
    engine = build_engine(model, ds_config, dims)
    x, y = make_batch(config, a.micro_batch, a.seq_length, seed=rank)

    def step():
        out = engine(x, y)
        engine.backward(out.loss if out.aux_loss is None else out.loss + out.aux_loss)
        engine.step()
        return out.loss.item()

    rss_built = proc_status()["VmRSS"]
    t = time.perf_counter()
    step()  # AdamW creates its moments here
    first_step_s = time.perf_counter() - t
    mem = engine_memory(engine)
    peak_until_now = proc_status()["VmHWM"]
    base = proc_status()["VmRSS"]
    reset_peak_rss()
    times, cpu = [], []
    for _ in range(a.steps):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    st = proc_status()
    me = {"rank": rank, "rss_after_build": rss_built, "rss_before_steps": base,
          "peak_rss": max(peak_until_now, st["VmHWM"]), "step_peak": st["VmHWM"],
          "step_peak_over_base": st["VmHWM"] - base, "first_step_s": first_step_s,
          "step_s": statistics.median(times), "step_times": times,
          "step_cpu_s": statistics.median(cpu), **mem}
    ranks = [None] * world
    dist.all_gather_object(ranks, me)
    if rank == 0:
        with open(a.worker_out, "w") as f:
            json.dump({"preset": a.preset, "world": world, "dp": dims.dp, "ep": dims.ep,
                       "micro_batch": a.micro_batch, "seq_length": a.seq_length,
                       "checkpoint_activations": a.checkpoint_activations, "params": config.num_params(),
                       "step_s": max(r["step_s"] for r in ranks),
                       "step_cpu_s": max(r["step_cpu_s"] for r in ranks), "ranks": ranks}, f)


def launch_variant(preset: str, micro_batch: int, seq: int, steps: int, ckpt: bool, ep: int, tmp: str) -> dict:
    from benchmarks.train_throughput import launch

    out = os.path.join(tmp, f"{preset}_{'ckpt' if ckpt else 'plain'}.json")
    args = ["--worker", "--preset", preset, "--micro-batch", str(micro_batch), "--seq-length", str(seq),
            "--steps", str(steps), "--ep", str(ep), "--worker-out", out] + (["--checkpoint-activations"] if ckpt else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"}
    launch(args, 2, env, script=os.path.abspath(__file__))
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- arithmetic

def split_params(config) -> tuple[int, int]:
    """(expert parameters, all other parameters) of a preset."""
    if not config.is_moe:
        return 0, config.num_params()
    experts = config.num_layers * config.num_experts * 3 * config.hidden_size * config.ffn_hidden_size
    return experts, config.num_params() - experts


def zero2_state_bytes(config, dp: int = 2, ep: int = 1) -> float:
    """fp32 ZeRO-2 bytes one rank holds: full local weights + 16 B per parameter of its partition."""
    experts, other = split_params(config)
    local_experts = experts / ep
    return 4 * (other + local_experts) + 16 * other / dp + 16 * local_experts / (dp // ep)


def machine_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def fit_report(overhead_per_rank: float, log=print) -> dict:
    """Do mini-llm and mini-moe (ep 2) fit this machine on 2 ranks, and the largest mini-moe-shaped MoE that does."""
    from dataclasses import replace

    from megatron_lite.config import get_preset

    total = machine_bytes()
    out = {"machine_bytes": total, "overhead_per_rank_bytes": overhead_per_rank, "models": {}}
    for name, ep in (("mini-llm", 1), ("mini-moe", 2)):
        c = get_preset(name)
        state = zero2_state_bytes(c, 2, ep)
        need = 2 * (state + overhead_per_rank)
        out["models"][name] = {"params": c.num_params(), "ep": ep, "state_bytes_per_rank": state,
                               "need_bytes_2_ranks": need, "fits": bool(need < total)}
        log(f"  {name} (ep {ep}): ZeRO-2 fp32 state {state / GIB:.2f} GiB per rank; with {overhead_per_rank / GIB:.2f} "
            f"GiB runtime + activations per rank: {need / GIB:.1f} GiB on 2 ranks of {total / GIB:.1f} GiB -> "
            f"{'fits' if need < total else 'does not fit'}")
    base = get_preset("mini-moe")
    largest = None
    for e in (2, 4, 6, 8, 10, 12, 16):
        c = replace(base, num_experts=e, topk=min(base.topk, e))
        if 2 * (zero2_state_bytes(c, 2, 2) + overhead_per_rank) < total:
            largest = {"num_experts": e, "params": c.num_params(), "state_bytes_per_rank": zero2_state_bytes(c, 2, 2)}
    out["largest_fitting_mini_moe_shape"] = largest
    if largest:
        log(f"  largest mini-moe-shaped MoE that fits (ep 2): {largest['num_experts']} experts, "
            f"{largest['params'] / 1e6:.0f} M params")
    return out


# ---------------------------------------------------------------------------------------------- run

def summary(r: dict) -> dict:
    ranks = r["ranks"]
    return {"peak_rss_per_rank": [x["peak_rss"] for x in ranks],
            "step_peak_over_base_per_rank": [x["step_peak_over_base"] for x in ranks],
            "optimizer_state_per_rank": [x["optimizer_state"] for x in ranks],
            "master_weights_per_rank": [x["master_weights"] for x in ranks],
            "grad_partition_per_rank": [x["grad_partition"] for x in ranks],
            "model_weights_per_rank": [x["model_weights"] for x in ranks], "step_s": r["step_s"],
            "step_cpu_s": r["step_cpu_s"]}


def run(presets, micro_batch, seq, steps, mini_llm_batch, results_dir=None, log=print) -> dict:
    result = {"micro_batch": micro_batch, "seq_length": seq, "steps": steps, "zero_stage": 2, "ranks": 2,
              "presets": {}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            mb = mini_llm_batch if preset == "mini-llm" else micro_batch
            entry = {"micro_batch": mb}
            for ckpt in (False, True):
                r = launch_variant(preset, mb, seq, steps, ckpt, 1, tmp)
                s = summary(r)
                entry["checkpoint_activations" if ckpt else "plain"] = {**s, "raw": r}
                log(f"  {preset} {mb}x{seq} {'--checkpoint-activations' if ckpt else 'plain                   '}: "
                    f"peak RSS {max(s['peak_rss_per_rank']) / GIB:.2f} GiB, step adds "
                    f"{max(s['step_peak_over_base_per_rank']) / GIB:.2f} GiB, AdamW moments "
                    f"{max(s['optimizer_state_per_rank']) / 2**20:.0f} MiB per rank, {s['step_s']:.1f} s/step "
                    f"({s['step_cpu_s']:.1f} s CPU)")
            plain, ck = entry["plain"], entry["checkpoint_activations"]
            act = max(ck["step_peak_over_base_per_rank"]) / max(plain["step_peak_over_base_per_rank"])
            entry["step_memory_ratio"] = act
            entry["peak_rss_ratio"] = max(ck["peak_rss_per_rank"]) / max(plain["peak_rss_per_rank"])
            entry["step_time_ratio"] = ck["step_s"] / plain["step_s"]
            entry["step_cpu_time_ratio"] = ck["step_cpu_s"] / plain["step_cpu_s"]
            result["presets"][preset] = entry
            label = f"scale {preset} ({mb}x{seq}, 2 ranks ZeRO-2)"
            result["rows"].append(row(f"{label}: step memory over base, checkpointed / plain",
                                      max(ck["step_peak_over_base_per_rank"]),
                                      max(plain["step_peak_over_base_per_rank"]), "bytes",
                                      target=0.6 if preset == "small" else None, higher_is_better=False,
                                      note="peak RSS during steps minus RSS before them"))
            result["rows"].append(row(f"{label}: peak RSS per rank, checkpointed / plain",
                                      max(ck["peak_rss_per_rank"]), max(plain["peak_rss_per_rank"]), "bytes",
                                      higher_is_better=False))
            result["rows"].append(row(f"{label}: s/step, checkpointed / plain", ck["step_s"], plain["step_s"],
                                      "s", higher_is_better=False,
                                      ratio_cpu_time=ck["step_cpu_s"] / plain["step_cpu_s"]))
    # runtime + activations of one rank, from the largest model measured (checkpointed): what is not ZeRO state
    from megatron_lite.config import get_preset
    biggest = max(result["presets"], key=lambda p: get_preset(p).num_params())
    ck = result["presets"][biggest]["checkpoint_activations"]
    overhead = max(ck["peak_rss_per_rank"]) - zero2_state_bytes(get_preset(biggest), 2, 1)
    result["fit"] = fit_report(overhead, log)
    result["fit"]["overhead_measured_on"] = biggest
    save_result("scale", result, results_dir)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny at 4 x 256 only")
    p.add_argument("--presets", nargs="+", default=None, help="presets to measure (default: small mini-llm)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per rank (default 8; quick 4)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default 512; quick 256)")
    p.add_argument("--mini-llm-batch", type=int, default=1, help="samples per rank for mini-llm")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    p.add_argument("--results-dir", default=None, help="where scale.json goes (default benchmarks/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-activations", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    presets = a.presets or (["tiny"] if a.quick else ["small", "mini-llm"])
    run(presets, a.micro_batch or (4 if a.quick else 8), a.seq_length or (256 if a.quick else 512), a.steps,
        a.mini_llm_batch, a.results_dir)


if __name__ == "__main__":
    main()
