#!/usr/bin/env python
"""Training throughput: our GPT through our DeepSpeed engine vs HF LlamaForCausalLM (Qwen3 with QK-norm) of identical shape.

    python benchmarks/train_throughput.py            # small (~25M) and tiny presets, 2-rank ZeRO-2 scaling
    python benchmarks/train_throughput.py --quick    # tiny only, fewer repeats (about a minute)

Variants, all timed turn about in one process (A B C, C B A, ...) on the same fixed batch, medians reported:
  ours        GPT -> megatron_lite.training.engine.build_engine (ZeRO-2 json, torch fused AdamW, clip 1.0)
  ours+compile the same with the module compiled in place (`model.compile()`) before the engine wraps it
  ours-zero0  the same engine with ZeRO stage 0 (no flat fp32 partition copy); skipped when the engine
              already lowers zero2.json to stage 0 at dp=1 (it does since commit 12c0fc0)
  ours-zero0+compile  both
  plain       our GPT + torch.optim.AdamW(fused) + clip_grad_norm_ with no engine (engine overhead = plain/ours)
  hf          transformers LlamaForCausalLM, or Qwen3ForCausalLM for a QK-norm preset such as tiny (the class our
              export picks; attn_implementation="sdpa"), our weights copied in,
              torch.optim.AdamW(fused) + clip_grad_norm_(1.0): what a plain HF/PyTorch loop does
Every step is forward + backward + clip + AdamW step + zero_grad at micro batch 8 x seq 256, fp32.
Ratios are paired: the median over rounds of (peer step time / our step time) within the same round, robust
to bursts of foreign load; the ratio of medians, of the fastest repeats and of process CPU times (what to
read when other work shares the cores) are kept in the JSON and printed too.

FLOPs per token = 6 N + 12 L d T (PaLM / Megatron / nanoGPT), N = every parameter a matmul touches: all
weights incl. the tied embedding, counted once as the output head (the input lookup does no FLOPs),
= megatron_lite.training.loop.flops_per_token. MFU = tokens/s x FLOPs/token / fp32 GEMM peak measured now
(start and end of the run, the better one). `mfu_cpu_time` uses CPU time instead of wall time: exact with
--threads 1, load-proof; with more threads a lower bound (OpenMP spin-waits count as CPU time).

On a busy machine: `--threads 1` and read the CPU-time ratios. torch.compile's first step (compilation,
tens of seconds to minutes on 2 cores) is reported as first_step_s and never timed.

Data parallel (unless --no-dp): this script relaunches itself in --worker-dp mode, alternately 1 rank with 2 threads and
2 ranks (torch.distributed.run, gloo) with OMP_NUM_THREADS=1 each, both ZeRO-2 at the same global batch;
the figure is aggregate tokens/s of 2 ranks / 1 rank (target >= 90 %).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import (measure_gemm_peak, paired_ratio, row, save_result,  # noqa: E402
                               time_interleaved, time_steps)

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
ZERO0 = os.path.join(ROOT, "ds_configs", "zero0.json")
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
LR, BETAS, WD, CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0  # AdamW as in the presets but tiny (speed does not depend on these)


# ---------------------------------------------------------------------------------------------- set-up

def quiet_deepspeed():
    import logging

    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)


def single_process_dims():
    """torch.distributed as a world of one (what `python launch/pretrain.py` does) and its ParallelDims."""
    from megatron_lite.parallel import ParallelDims, init_distributed

    quiet_deepspeed()
    init_distributed()
    return ParallelDims.from_world(torch.distributed.get_world_size()).build()


def make_batch(config, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (B, T) inputs, labels aligned to positions


def ours_engine(config, dims, batch: int, ds_config: str = ZERO2, compile: bool = False, seed: int = 1234):
    """(engine, step) through the same calls launch/pretrain.py makes."""
    from megatron_lite.training.ds_config import load_ds_config, resolve_ds_config
    from megatron_lite.training.engine import build_engine, build_model

    cfg = resolve_ds_config(load_ds_config(ds_config), dims.dp, micro_batch_size=batch, lr=LR,
                            weight_decay=WD, grad_clip=CLIP, train_iters=10**6)
    model = build_model(config, dims, seed)
    if compile:
        model.compile()  # in place: state_dict names (and so checkpoints) stay those of the eager model
    engine = build_engine(model, cfg, dims)

    def step(x, y):
        out = engine(x, y)
        engine.backward(out.loss if out.aux_loss is None else out.loss + out.aux_loss)
        engine.step()
        return out.loss
    return engine, step


def engine_zero_stage(ds_config: str, dp: int) -> int:
    """The ZeRO stage our engine actually runs `ds_config` with at this dp (it may lower it at dp=1)."""
    from megatron_lite.training.ds_config import load_ds_config, resolve_ds_config

    cfg = resolve_ds_config(load_ds_config(ds_config), dp, micro_batch_size=1)
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def plain_step(model, fused: bool = True, foreach: bool | None = None):
    """model(x, y).loss -> backward -> clip -> AdamW, the loop every PyTorch tutorial writes."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, fused=fused or None, foreach=None if fused else foreach)
    params = list(model.parameters())

    def step(x, y):
        loss = model(x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def hf_llama(config, our_model):
    """The stock HF class our export gives `config` (LlamaForCausalLM; Qwen3ForCausalLM with QK-norm), the same
    shape holding a copy of `our_model`'s weights (SDPA attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_lite.convert.hf import hf_config_dict, to_hf_state_dict

    d = hf_config_dict(config)
    d.pop("architectures", None)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), attn_implementation="sdpa")
    sd = {k: v.clone() for k, v in to_hf_state_dict(config, our_model.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.train()


def hf_step(hf):
    inner = plain_step(hf)

    def step(x, y):
        # HF shifts labels itself: hand it the inputs as labels (same tokens, T-1 predictions per row).
        return inner(x, x)
    return step


def check_same_logits(ours, hf, x) -> float:
    with torch.no_grad():
        a = ours(x).logits
        b = hf(input_ids=x).logits
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- measurement

def speed_row(res: dict, preset: str, a: str, b: str, what: str, target=None) -> dict:
    """Row for speed(a) / speed(b): paired median ratio, plus ratio of medians and of the fastest repeats."""
    return row(f"train {preset}: {what}", res[a]["tokens_per_s"], res[b]["tokens_per_s"], "tok/s",
               ratio=paired_ratio(res[b]["times"], res[a]["times"]), target=target,
               ratio_of_medians=res[b]["step_s"] / res[a]["step_s"],
               ratio_of_fastest=res[b]["step_s_min"] / res[a]["step_s_min"],
               ratio_cpu_time=paired_ratio(res[b]["cpu_times"], res[a]["cpu_times"]))


def flops_per_token(config, seq: int) -> float:
    from megatron_lite.training.loop import flops_per_token as fpt
    return fpt(config, seq)


def compare(config, batch: int = 8, seq: int = 256, warmup: int = 2, repeats: int = 7,
            variants=("ours", "plain", "hf"), dims=None, log=print) -> dict:
    """Time the chosen variants turn about; return tokens/s etc. per variant and the logits check."""
    dims = dims or single_process_dims()
    x, y = make_batch(config, batch, seq)
    steps, build_s = {}, {}
    ref_model = None
    for name in variants:
        t = time.perf_counter()
        if name.startswith("ours"):
            engine, st = ours_engine(config, dims, batch, ds_config=ZERO0 if "zero0" in name else ZERO2,
                                     compile="compile" in name)
            ref_model = ref_model or engine.module
        elif name == "plain":
            from megatron_lite.training.engine import build_model
            model = build_model(config, dims, 1234)
            ref_model = ref_model or model
            st = plain_step(model)
        elif name == "hf":
            from megatron_lite.training.engine import build_model
            src = ref_model or build_model(config, dims, 1234)
            hf = hf_llama(config, src)
            max_diff = check_same_logits(src, hf, x[:1])
            log(f"  hf: max |logits(ours) - logits(hf)| = {max_diff:.2e} (same weights)")
            st = hf_step(hf)
        else:
            raise ValueError(f"unknown variant {name!r}")
        steps[name] = (lambda st=st: st(x, y))
        build_s[name] = time.perf_counter() - t
    # Warm-up runs first (torch.compile compiles here) and is reported separately.
    t_first = {}
    for name, f in steps.items():
        t = time.perf_counter()
        f()
        t_first[name] = time.perf_counter() - t
    timing = time_interleaved(steps, warmup=warmup, repeats=repeats)
    tokens = batch * seq
    out = {}
    for name, tm in timing.items():
        out[name] = {"step_s": tm["median"], "step_s_min": tm["min"], "step_s_max": tm["max"], "times": tm["times"],
                     "cpu_times": tm["cpu_times"],
                     "tokens_per_s": tokens / tm["median"], "build_s": build_s[name], "first_step_s": t_first[name]}
    if "hf" in variants:
        out["hf"]["max_logit_diff_vs_ours"] = max_diff
    return out


def optimizer_step_bench(config, repeats: int = 10) -> dict:
    """Seconds per AdamW.step() over the model's parameters: fused vs foreach vs for-loop kernels."""
    from megatron_lite.model.gpt import GPT

    model = GPT(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    res = {}
    steps = {}
    for kind in ("fused", "foreach", "for-loop"):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                                fused=True if kind == "fused" else None,
                                foreach=None if kind == "fused" else kind == "foreach")
        steps[kind] = opt.step
    for k, v in time_interleaved(steps, warmup=2, repeats=repeats).items():
        res[k] = v["median"]
    return res


def sdpa_gqa_bench(config, batch: int, seq: int, repeats: int = 10) -> dict:
    """Seconds per attention forward+backward for one layer's shapes: SDPA enable_gqa (ours) vs k/v
    repeated to all heads first (HF's repeat_kv) vs the math kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, KV, D = config.num_heads, config.num_kv_heads, config.head_dim
    q = torch.randn(batch, H, seq, D, requires_grad=True)
    k = torch.randn(batch, KV, seq, D, requires_grad=True)
    v = torch.randn(batch, KV, seq, D, requires_grad=True)
    g = torch.randn(batch, H, seq, D)

    def gqa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV).backward(g)

    def repeat():
        r = H // KV
        F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1),
                                       is_causal=True).backward(g)

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            gqa()
    return {k_: v_["median"] for k_, v_ in time_interleaved(
        {"sdpa_enable_gqa": gqa, "sdpa_repeat_kv": repeat, "sdpa_math": math}, warmup=2, repeats=repeats).items()}


# ---------------------------------------------------------------------------------------------- data parallel

def start_rank(preset: str, micro_batch: int, seq_length: int):
    """Start-up of one rank of a multi-process benchmark (this one's scaling test, zero_memory.py):
    torch.distributed, our engine on `preset`, this rank's own batch. -> (rank, world, config, engine, step, x, y)"""
    from megatron_lite.config import get_preset
    from megatron_lite.parallel import ParallelDims, init_distributed

    quiet_deepspeed()
    rank, world = init_distributed()
    dims = ParallelDims.from_world(world).build()
    config = get_preset(preset)
    engine, step = ours_engine(config, dims, micro_batch)
    x, y = make_batch(config, micro_batch, seq_length, seed=rank)
    return rank, world, config, engine, step, x, y


def worker_dp(a) -> None:
    """One rank of the scaling test (run by --dp via torch.distributed.run or plain python)."""
    rank, world, _config, _engine, step, x, y = start_rank(a.preset, a.micro_batch, a.seq_length)
    sec = time_steps(lambda: step(x, y), warmup=a.warmup, iters=a.steps)
    t = torch.tensor([sec])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        with open(a.worker_out, "w") as f:
            json.dump({"world": world, "threads": torch.get_num_threads(), "micro_batch": a.micro_batch,
                       "step_s": float(t), "tokens_per_s": world * a.micro_batch * a.seq_length / float(t)}, f)


def launch(args: list, world: int, env: dict, tries: int = 3, script: str | None = None) -> subprocess.CompletedProcess:
    """Run this script (or `script`) with `args` as 1 process or as `world` gloo ranks (torch.distributed.run,
    static rendezvous on a free port). Retried: on a shared machine another job can take the port first."""
    from megatron_lite.parallel import free_port

    me = script or os.path.abspath(__file__)
    # This process may itself be a world of one (single_process_dims): its RANK/MASTER_PORT must not leak into
    # the children, or they would all try to serve the store on this process's port.
    env = {k: v for k, v in env.items() if k not in DIST_ENV}
    for attempt in range(tries):
        cmd = [sys.executable, me, *args] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), me, *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode == 0:
            return p
        if "EADDRINUSE" not in p.stdout + p.stderr or attempt == tries - 1:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def dp_scaling(preset: str, global_batch: int, seq: int, steps: int, warmup: int, repeats: int, log=print) -> dict:
    """Alternate 1-rank (2 threads) and 2-rank (1 thread each) ZeRO-2 runs; medians of aggregate tokens/s."""
    runs = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for world in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = os.path.join(tmp, f"dp{world}_{r}.json")
                args = ["--worker-dp", "--preset", preset, "--micro-batch", str(global_batch // world),
                        "--seq-length", str(seq), "--steps", str(steps), "--warmup", str(warmup), "--worker-out", out]
                env = {**os.environ, "OMP_NUM_THREADS": str(2 // world), "PYTHONPATH": ROOT}
                launch(args, world, env)
                with open(out) as f:
                    res = json.load(f)
                runs[world].append(res["tokens_per_s"])
                log(f"  dp run {r}: {world} rank(s) x {res['threads']} thread(s): {res['tokens_per_s']:.0f} tok/s")
    one, two = statistics.median(runs[1]), statistics.median(runs[2])
    return {"preset": preset, "global_batch": global_batch, "seq_length": seq, "tokens_per_s_1rank": one,
            "tokens_per_s_2ranks": two, "runs": runs, "efficiency": paired_ratio(runs[2], runs[1])}


# ---------------------------------------------------------------------------------------------- main

def run(presets, batch, seq, warmup, repeats, compile_presets=(), zero0=True, dp=None, micro=False,
        results_dir=None, log=print, config_overrides=None, gemm_n: int = 2048) -> dict:
    """Measure everything asked for and write results_dir/train_throughput.json; returns the dict."""
    from megatron_lite.config import get_preset

    dims = single_process_dims()
    if zero0 and engine_zero_stage(ZERO2, dims.dp) == 0:
        log("the engine already runs zero2.json as ZeRO stage 0 at dp=1: no separate ZeRO-0 variant")
        zero0 = False
    peak = measure_gemm_peak(gemm_n)
    log(f"fp32 GEMM peak now: {peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads; measured again at the "
        f"end, MFU uses the better of the two: under foreign load either can read low)")
    result = {"batch": batch, "seq_length": seq, "repeats": repeats,
              "flops_per_token_formula": "6*N + 12*L*d*T; N = all params a matmul touches (tied embedding "
                                         "counted once, as the output head)",
              "presets": {}, "rows": []}
    for preset in presets:
        config = get_preset(preset, **(config_overrides or {}))
        variants = ["ours", "plain", "hf"]
        if zero0:
            variants.insert(1, "ours-zero0")
        if preset in compile_presets:
            variants[1:1] = ["ours+compile"] + (["ours-zero0+compile"] if zero0 else [])
        log(f"{preset}: {config.num_params() / 1e6:.1f}M params, batch {batch} x {seq}, variants {variants}")
        res = compare(config, batch, seq, warmup, repeats, variants, dims, log)
        fpt = flops_per_token(config, seq)
        result["presets"][preset] = {"params": config.num_params(), "flops_per_token": fpt, "variants": res,
                                     "engine_zero_stage_dp1": engine_zero_stage(ZERO2, dims.dp)}
        for name, r in res.items():
            log(f"  {name:19s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s'] * 1e3:7.1f} ms "
                f"[{r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f}]  first step {r['first_step_s']:.1f} s")
        best = max((n for n in res if n.startswith("ours")), key=lambda n: paired_ratio(res["hf"]["times"], res[n]["times"]))
        result["presets"][preset]["best_ours_variant"] = best
        result["presets"][preset]["rows"] = rows = [
            speed_row(res, preset, "ours", "hf", "ours (engine) vs HF (our export's class)", target=1.1),
            speed_row(res, preset, "ours", "plain", "engine overhead: ours (engine) vs plain loop, same model")]
        for name in res:
            if name.startswith("ours-") or name.startswith("ours+"):
                rows.append(speed_row(res, preset, name, "hf", f"{name} vs HF (our export's class)", target=1.1))
        if "ours-zero0" in res:
            rows.append(speed_row(res, preset, "ours-zero0", "ours", "engine ZeRO-0 vs ZeRO-2 (1 process)"))
        mfu_rows = {n: row(f"train {preset}: MFU {n}", None, None, "fraction", target=0.85 if n.startswith("ours") else None)
                    for n in ("ours", best, "hf")}
        rows += mfu_rows.values()
        for rw in rows:
            if rw["unit"] == "fraction":
                continue  # MFU rows are filled in once the end-of-run peak is known
            log(f"  -> {rw['benchmark']}: ratio {rw['ratio']:.3f}" + (
                f" (of medians {rw['ratio_of_medians']:.3f}, of fastest {rw['ratio_of_fastest']:.3f}, "
                f"of CPU times {rw['ratio_cpu_time']:.3f})") + (
                f" (target {rw['target_op']} {rw['target']}: {'met' if rw['met'] else 'NOT met'})" if rw["target"] else ""))
        result["rows"] += rows
    peak = result["gemm_peak_flops"] = max(peak, measure_gemm_peak(gemm_n))  # best of before/after: less load noise
    log(f"fp32 GEMM peak (best of start and end): {peak / 1e9:.0f} GFLOP/s")
    for preset, p in result["presets"].items():
        for name, r in p["variants"].items():
            r["mfu"] = r["tokens_per_s"] * p["flops_per_token"] / peak
            r["mfu_fastest"] = p["flops_per_token"] * batch * seq / r["step_s_min"] / peak
            # FLOPs per second of CPU time per thread: exact at 1 thread, a lower bound with more (spin-waits
            # count as CPU time); immune to foreign load stealing the cores
            r["mfu_cpu_time"] = (p["flops_per_token"] * batch * seq * torch.get_num_threads()
                                 / statistics.median(r["cpu_times"]) / peak)
        for rw in p.pop("rows"):
            if rw["unit"] == "fraction":
                name = rw["benchmark"].split("MFU ", 1)[1]
                rw.update(ours=p["variants"][name]["mfu"], ratio=p["variants"][name]["mfu"],
                          mfu_of_fastest_step=p["variants"][name]["mfu_fastest"],
                          ratio_cpu_time=p["variants"][name]["mfu_cpu_time"])
                if rw["target"] is not None:
                    rw["met"] = bool(rw["ratio"] >= rw["target"])
                log(f"  -> {rw['benchmark']}: {rw['ratio']:.1%} (fastest step: {rw['mfu_of_fastest_step']:.1%}, "
                    f"by CPU time: {rw['ratio_cpu_time']:.1%})"
                    + (f" target >= 85%: {'met' if rw['met'] else 'NOT met'}" if rw["target"] else ""))
    if micro:
        config = get_preset(presets[0], **(config_overrides or {}))
        result["optimizer_step_s"] = optimizer_step_bench(config, repeats)
        result["attention_fwd_bwd_s"] = sdpa_gqa_bench(config, batch, seq, repeats)
        log(f"AdamW.step() s: {json.dumps({k: round(v, 4) for k, v in result['optimizer_step_s'].items()})}")
        log(f"one layer's attention fwd+bwd s: {json.dumps({k: round(v, 4) for k, v in result['attention_fwd_bwd_s'].items()})}")
    if dp:
        try:
            d = dp_scaling(**dp, log=log)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # keep the single-process results
            log(f"data-parallel test failed: {str(e)[-1500:]}")
            result["data_parallel_error"] = str(e)[-3000:]
            save_result("train_throughput", result, results_dir)
            raise SystemExit(1)
        result["data_parallel"] = d
        rw = row(f"train {d['preset']}: ZeRO-2 2 ranks x 1 thread vs 1 rank x 2 threads", d["tokens_per_s_2ranks"],
                 d["tokens_per_s_1rank"], "tok/s", ratio=d["efficiency"], target=0.9,
                 ratio_of_medians=d["tokens_per_s_2ranks"] / d["tokens_per_s_1rank"])
        log(f"  -> {rw['benchmark']}: {rw['ratio']:.3f} (target >= 0.9: {'met' if rw['met'] else 'NOT met'})")
        result["rows"].append(rw)
    save_result("train_throughput", result, results_dir)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset only, 3 repeats, dp test on tiny: ~1-2 min")
    p.add_argument("--presets", nargs="+", default=None, help="model presets to compare (default: small tiny)")
    p.add_argument("--batch", type=int, default=8, help="micro batch size (sequences per step), default 8")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence, default 256")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first, default 1")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 7; quick 3)")
    p.add_argument("--compile", nargs="*", default=None, metavar="PRESET",
                   help="presets to also time with torch.compile (default: all full-mode presets; none with --quick; "
                        "bare --compile = all presets)")
    p.add_argument("--no-zero0", action="store_true", help="skip the ZeRO stage-0 engine variant")
    p.add_argument("--no-micro", action="store_true", help="skip the AdamW-kernel and SDPA-GQA micro benchmarks")
    p.add_argument("--no-dp", action="store_true", help="skip the 2-rank ZeRO-2 scaling test")
    p.add_argument("--dp-preset", default=None, help="preset for the scaling test (default small; quick tiny)")
    p.add_argument("--dp-repeats", type=int, default=None, help="launches per world size, alternated (default 2)")
    p.add_argument("--dp-steps", type=int, default=None, help="timed steps per launch (default 5; quick 3)")
    p.add_argument("--results-dir", default=None, help="where train_throughput.json goes (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the single-process runs (default: torch's, i.e. OMP_NUM_THREADS or all "
                        "cores). With 1 thread, CPU time is pure work: the most load-proof ratio on a busy machine")
    # internal: one rank of the scaling test
    p.add_argument("--worker-dp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.worker_dp:
        return worker_dp(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    presets = a.presets or (["tiny"] if a.quick else ["small", "tiny"])
    repeats = a.repeats or (3 if a.quick else 7)
    if a.compile is None:
        compile_presets = [] if a.quick else presets
    else:
        compile_presets = a.compile or presets
    dp = None if a.no_dp else dict(preset=a.dp_preset or ("tiny" if a.quick else "small"), global_batch=a.batch,
                                   seq=a.seq_length, steps=a.dp_steps or (3 if a.quick else 5), warmup=1,
                                   repeats=a.dp_repeats or 2)
    run(presets, a.batch, a.seq_length, a.warmup, repeats, compile_presets, not a.no_zero0, dp,
        micro=not a.no_micro, results_dir=a.results_dir)


if __name__ == "__main__":
    main()
