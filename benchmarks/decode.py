#!/usr/bin/env python
"""Decode and prefill throughput of our KV-cache generator vs HF `generate`, same weights, same process.

    python benchmarks/decode.py [--model tiny] [--prompt-len 32] [--new-tokens 64] [--batch-sizes 1 8]

A random-weight model of the given preset is exported with our HF converter and loaded with stock
`AutoModelForCausalLM`, so both sides run exactly the same weights (greedy tokens are checked to agree).
Both generate greedily with no early stop. Ours runs twice: eager, and with `compile_decoder` (each decode
step one torch.compile'd graph; its compile happens in the untimed warm-up). Per thread count and batch size:
  prefill tok/s = B * prefill_len / time(generate 1 token from a prefill_len prompt)
  decode  tok/s = B * (N - 1) / (time(generate N tokens) - time(generate 1 token))
Each thread count (default: 1, and every core, torch's own default) gets its own compiled model, because
inductor fixes a kernel's thread count when it compiles it. Runs are interleaved (ours, HF, ours, ...) for
--repeats rounds after a warm-up, with the garbage collector paused while a run is timed (as `timeit` does:
a collection of the other side's garbage would land on whichever run it interrupts). Reported: tok/s from
the median round, and the speedup as the median over rounds of the paired ratio, by wall clock and by process
CPU time (the latter robust to other jobs on a shared machine). For dense models a third side times the step's
weight matmuls alone (`weight_matmuls`): HF's decode time over it is the largest speed-up any decoder could show
here. Results go to benchmarks/results/decode.json.

As users run it (benchmarks/decode_processes.py): --server measures a warm `tools/serve.py` with default
flags (compiled at start-up) through the `openai` client against HF `generate` in a loop; --one-shot measures
whole `tools/generate.py --greedy` processes (eager) against a one-shot HF script. --processes-only skips the
in-process measurements.
"""
import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="ModelConfig preset (tiny, tiny-moe, small, ...)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelConfig field of the preset, e.g. --set hidden_size=64 (repeatable)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens for the decode measurement")
    ap.add_argument("--prefill-len", type=int, default=256, help="prompt tokens for the prefill measurement")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="torch intra-op thread counts to measure, each against HF at the same count (default: 1 "
                         "and every core; one thread is the per-core comparison, immune to a busy second core)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-decoder variant")
    ap.add_argument("--server", action="store_true",
                    help="also measure tools/serve.py (default flags) via the openai client vs HF generate in a loop")
    ap.add_argument("--one-shot", action="store_true",
                    help="also measure whole tools/generate.py processes (eager) vs a one-shot HF generate script")
    ap.add_argument("--processes-only", action="store_true",
                    help="with --server/--one-shot: skip the in-process measurements")
    ap.add_argument("--process-threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the server / one-shot processes and of HF beside them (default: every core)")
    ap.add_argument("--process-new-tokens", type=int, default=128,
                    help="tokens per request for --server / --one-shot")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "decode.json"), help="JSON results file")
    return ap.parse_args(argv)


def clocks():
    return time.perf_counter(), time.process_time()


def measure(fns: dict, repeats: int) -> dict:
    """Per-round (wall, process-CPU) seconds of each zero-arg fn: {key: ([wall per round], [cpu per round])}.
    Runs are interleaved (a, b, a, b, ...) so load from other processes hits both sides alike; one untimed
    warm-up each; the garbage collector is paused inside each timed run and run between rounds."""
    for fn in fns.values():
        fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        gc.collect()
        for k, fn in fns.items():
            gc.disable()
            try:
                w0, c0 = clocks()
                fn()
                w1, c1 = clocks()
            finally:
                gc.enable()
            wall[k].append(w1 - w0)
            cpu[k].append(c1 - c0)
    return {k: (wall[k], cpu[k]) for k in fns}


def table_rows(label: str, side: str, ours: dict, hf: dict, speedup: dict) -> list[dict]:
    """results.md rows: decode and prefill tok/s vs HF; ratio = median paired wall-time ratio (CPU-time alongside)."""
    from benchmarks.common import row

    out = []
    for metric, target in (("decode_tok_s", 2.0), ("prefill_tok_s", None)):
        key = metric.split("_")[0]
        out.append(row(f"{label}: {metric} {side} vs HF generate", ours["wall"][metric], hf["wall"][metric], "tok/s",
                       ratio=speedup[key]["wall"], target=target, ratio_cpu_time=speedup[key]["cpu"]))
    return out


def rates(t: dict, side: str, B: int, prefill_len: int, n: int) -> tuple[dict, dict]:
    """({clock: tok/s figures of the median round}, {clock: per-round prefill and decode seconds})."""
    figures, per_round = {}, {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        prefill = t[(side, "prefill")][i]
        decode = [a - b for a, b in zip(t[(side, "all")][i], t[(side, "one")][i])]
        per_round[clock] = {"prefill": prefill, "decode": decode}
        figures[clock] = {"prefill_tok_s": round(B * prefill_len / statistics.median(prefill), 1),
                          "decode_tok_s": round(B * (n - 1) / statistics.median(decode), 1),
                          "decode_ms_per_step": round(1000 * statistics.median(decode) / (n - 1), 3)}
    return figures, per_round


def decode_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by, as (in, out), in the decode layout: fused q/k/v and
    gate/up where fused, and the head (a tied embedding once, as the head; an untied input embedding is a row
    lookup, not a product)."""
    fused = [t for m in model.modules() for t in (getattr(m, "qkv_t", None), getattr(m, "gate_up_t", None))
             if t is not None]
    skip = {t.untyped_storage().data_ptr() for t in fused}
    skip |= {m.weight.untyped_storage().data_ptr() for m in model.modules()
             if isinstance(m, torch.nn.Embedding) and m.weight is not model.output_weight()}
    return fused + [p.detach().t() for p in model.parameters()
                    if p.dim() == 2 and p.untyped_storage().data_ptr() not in skip]


def weight_matmuls(model: torch.nn.Module, batch: int, steps: int):
    """A zero-arg fn doing `steps` decode steps' weight products and nothing else (`decode_matrices`, each
    times a (batch, in) input). A step that streams its weights from memory cannot beat this, so HF's step time
    over it bounds the speed-up any decoder can show on this machine. Dense models only (an MoE step reads just
    its routed experts)."""
    mats = decode_matrices(model)
    inputs = [torch.randn(batch, w.shape[0]) for w in mats]

    @torch.inference_mode()
    def run():
        for _ in range(steps):
            for x, w in zip(inputs, mats):
                x @ w
    return run


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("decode"):
        from transformers import AutoModelForCausalLM

        from benchmarks.common import paired_ratio
        from megatron_lite.config import get_preset
        from megatron_lite.convert.hf import save_hf_folder
        from megatron_lite.inference.fast_decode import compile_decoder, use_decode_layout
        from megatron_lite.inference.generate import _steps
        from megatron_lite.inference.sampling import SamplingParams

        if any(t < 1 for t in args.threads):
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.manual_seed(0)
        overrides = {}
        for item in args.set:
            field, _, value = item.partition("=")
            if not value:
                raise UserError(f"--set {item!r} is not FIELD=VALUE")
            overrides[field] = json.loads(value)
        config = get_preset(args.model, max_seq_len=max(512, args.prefill_len + args.new_tokens + 1), **overrides)
        with contextlib.redirect_stdout(sys.stderr):
            from megatron_lite.model.gpt import GPT
            ours = use_decode_layout(GPT(config).eval())  # what every inference tool decodes with
        with tempfile.TemporaryDirectory() as d:
            save_hf_folder(d, config, ours.state_dict())
            hf = AutoModelForCausalLM.from_pretrained(d).eval()

        class NoTokenizer:  # token ids in, token ids out: no text work on either side
            pad_token_id, eos_token_id = 0, None

            def get_vocab(self):
                return {}

            def decode(self, ids, skip_special_tokens=True):
                return ""

        def run_ours(ids, n, model=ours):
            params = SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)
            for _deltas, _reasons, streams in _steps(model, NoTokenizer(), ids.tolist(), params):
                pass
            return [s.ids for s in streams]

        @torch.inference_mode()
        def run_hf(ids, n):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()

        results = {"model": args.model, "overrides": overrides, "params_M": round(config.num_params() / 1e6, 2),
                   "threads": list(dict.fromkeys(args.threads)), "prompt_len": args.prompt_len,
                   "prefill_len": args.prefill_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "runs": []}
        rows = []
        n = args.new_tokens
        for threads in ([] if args.processes_only else results["threads"]):
            torch.set_num_threads(threads)
            sides = {"ours": run_ours}
            if not args.no_compile:
                with contextlib.redirect_stdout(sys.stderr):
                    compiled = GPT(config).eval()
                compiled.load_state_dict(ours.state_dict())
                compile_decoder(compiled)  # compiled for this thread count
                sides["ours_compiled"] = lambda ids, n, model=compiled: run_ours(ids, n, model)
            for B in args.batch_sizes:
                g = torch.Generator().manual_seed(B)
                ids = torch.randint(3, config.vocab_size, (B, args.prompt_len), generator=g)
                long_ids = torch.randint(3, config.vocab_size, (B, args.prefill_len), generator=g)
                fns = {(side, what): (lambda fn=fn, x=x, k=k: fn(x, k))
                       for side, fn in (*sides.items(), ("hf", run_hf))
                       for what, x, k in (("prefill", long_ids, 1), ("one", ids, 1), ("all", ids, n))}
                if not config.is_moe:
                    fns[("floor", "decode")] = weight_matmuls(ours, B, n - 1)
                t = measure(fns, args.repeats)
                row = {"threads": threads, "batch": B}
                per_round = {}
                for side in (*sides, "hf"):
                    row[side], per_round[side] = rates(t, side, B, args.prefill_len, n)
                    row[f"{side}_wall_s_per_round"] = {k: [round(x, 5) for x in v]
                                                       for k, v in per_round[side]["wall"].items()}
                hf_tokens = run_hf(ids, n)
                row["same_tokens"] = all(fn(ids, n) == hf_tokens for fn in sides.values())
                label = f"decode {args.model} (batch {B}, {threads} thread{'s' if threads > 1 else ''})"
                for side in sides:
                    speedup = {what: {c: round(paired_ratio(per_round["hf"][c][what], per_round[side][c][what]), 2)
                                      for c in ("wall", "cpu")} for what in ("decode", "prefill")}
                    row[f"{side}_decode_speedup"] = speedup["decode"]
                    row[f"{side}_prefill_speedup"] = speedup["prefill"]
                    o, h = row[side], row["hf"]
                    for clock in ("wall", "cpu"):
                        print(f"{threads} thread(s), batch {B} [{clock:4s}] decode {side} "
                              f"{o[clock]['decode_tok_s']:8.1f} tok/s vs HF {h[clock]['decode_tok_s']:8.1f} "
                              f"({speedup['decode'][clock]}x) | prefill "
                              f"{o[clock]['prefill_tok_s']:8.1f} vs HF {h[clock]['prefill_tok_s']:8.1f} "
                              f"({speedup['prefill'][clock]}x)", flush=True)
                    rows += table_rows(label, side, o, h, speedup)
                if not config.is_moe:
                    rows.append(floor_row(label, row, t, per_round["hf"], B, n))
                print(f"{threads} thread(s), batch {B}: identical greedy tokens: {row['same_tokens']}", flush=True)
                results["runs"].append(row)
        if args.server or args.one_shot:
            rows += measure_processes(args, config, ours.state_dict(), hf, results)
        results["rows"] = rows
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")


def floor_row(label: str, row: dict, t: dict, hf_rounds: dict, B: int, n: int) -> dict:
    """The weight-matmul floor (`weight_matmuls`) as tok/s, and HF's decode time over it per round: the largest
    decode speed-up over HF that this machine allows."""
    from benchmarks.common import paired_ratio
    from benchmarks.common import row as result_row

    floor = {c: t[("floor", "decode")][i] for c, i in (("wall", 0), ("cpu", 1))}
    row["floor"] = {c: {"decode_tok_s": round(B * (n - 1) / statistics.median(v), 1),
                        "decode_ms_per_step": round(1000 * statistics.median(v) / (n - 1), 3)} for c, v in floor.items()}
    bound = {c: round(paired_ratio(hf_rounds[c]["decode"], floor[c]), 2) for c in floor}
    row["floor_over_hf"] = bound
    print(f"{label} [wall] weight-matmul floor {row['floor']['wall']['decode_tok_s']:8.1f} tok/s: at most "
          f"{bound['wall']}x HF's decode ({bound['cpu']}x by CPU time)", flush=True)
    return result_row(f"{label}: decode_tok_s of the step's weight matmuls alone (a floor) vs HF generate",
                      row["floor"]["wall"]["decode_tok_s"], row["hf"]["wall"]["decode_tok_s"], "tok/s",
                      ratio=bound["wall"], ratio_cpu_time=bound["cpu"],
                      note="no decoder can pass this ratio on this machine")


def measure_processes(args, config, state_dict, hf, results) -> list[dict]:
    """--server / --one-shot: results["server"], results["one_shot"] and their results.md rows."""
    from transformers import AutoTokenizer

    from benchmarks.common import row
    from benchmarks.decode_processes import make_folders, measure_one_shot, measure_server

    rows, threads, n = [], args.process_threads, args.process_new_tokens
    plural = "s" if threads > 1 else ""
    with tempfile.TemporaryDirectory() as d:
        ckpt, hf_dir = make_folders(Path(d), config, state_dict)
        if args.server:
            tok = AutoTokenizer.from_pretrained(str(hf_dir))
            s = results["server"] = measure_server(ckpt, hf, tok, threads, n, args.repeats, print)
            rows.append(row(f"decode {args.model} (batch 1, {threads} thread{plural}): tools/serve.py (default flags, "
                            f"warm) via openai client vs HF generate in a loop", s["server_tok_s"], s["hf_tok_s"],
                            "tok/s", ratio=s["speedup"]["median"], target=2.0,
                            note=f"paired ratio per round {s['speedup']['min']}-{s['speedup']['max']}"))
        if args.one_shot:
            o = results["one_shot"] = measure_one_shot(ckpt, hf_dir, threads, n, args.repeats, print)
            rows.append(row(f"decode {args.model} (batch 1, {threads} thread{plural}): one-shot tools/generate.py "
                            f"(eager) vs one-shot HF generate, whole processes", o["ours_tok_s"], o["hf_tok_s"],
                            "tok/s", ratio=o["speedup"]["median"], target=1.1,
                            note=f"paired ratio per round {o['speedup']['min']}-{o['speedup']['max']}"))
    return rows


if __name__ == "__main__":
    main()
