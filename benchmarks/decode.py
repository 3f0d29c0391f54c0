#!/usr/bin/env python
"""Decode and prefill throughput of our KV-cache generator vs HF `generate`, same weights, same process.

    python benchmarks/decode.py [--model tiny] [--prompt-len 32] [--new-tokens 64] [--batch-sizes 1 8]

A random-weight model of the given preset is exported with our HF converter and loaded with stock
`AutoModelForCausalLM`, so both sides run exactly the same weights (greedy tokens are checked to agree).
Both generate greedily with no early stop. Ours runs twice: eager, and with `compile_decoder` (each decode
step one torch.compile'd graph; its compile happens in the untimed warm-up). Per batch size:
  prefill tok/s = B * prefill_len / time(generate 1 token from a prefill_len prompt)
  decode  tok/s = B * (N - 1) / (time(generate N tokens) - time(generate 1 token))
Medians over --repeats interleaved runs after a warm-up, by wall clock and by process CPU time (the latter
is robust to other jobs on a shared machine). Results go to benchmarks/results/decode.json.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

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
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine, thread barriers on the "
                         "tiny decode ops cost more than the parallelism gains, for both sides)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-decoder variant")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "decode.json"), help="JSON results file")
    return ap.parse_args(argv)


def clocks():
    return time.perf_counter(), time.process_time()


def measure(fns: dict, repeats: int) -> dict:
    """Median wall and process-CPU seconds of each zero-arg fn; runs are interleaved (a, b, a, b, ...) so
    load from other processes on a shared machine hits both sides alike. One untimed warm-up each."""
    for fn in fns.values():
        fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = clocks()
            fn()
            w1, c1 = clocks()
            wall[k].append(w1 - w0)
            cpu[k].append(c1 - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def table_rows(label: str, side: str, ours: dict, hf: dict) -> list[dict]:
    """results.md rows: decode and prefill tok/s vs HF (wall-clock ratio, CPU-time ratio alongside)."""
    from benchmarks.common import row

    out = []
    for metric, target in (("decode_tok_s", 2.0), ("prefill_tok_s", None)):
        o, h = ours["wall"][metric], hf["wall"][metric]
        out.append(row(f"{label}: {metric} {side} vs HF generate", o, h, "tok/s", target=target,
                       ratio_cpu_time=ours["cpu"][metric] / hf["cpu"][metric]))
    return out


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("decode"):
        from transformers import AutoModelForCausalLM

        from megatron_lite.config import get_preset
        from megatron_lite.convert.hf import save_hf_folder
        from megatron_lite.inference.generate import SamplingParams, _steps, compile_decoder, use_cpu_decode_layout

        torch.set_num_threads(args.threads)
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
            ours = use_cpu_decode_layout(GPT(config).eval())  # what load_model gives every inference tool
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

        sides = {"ours": run_ours}
        if not args.no_compile and not config.is_moe:  # compile_decoder keeps MoE eager
            with contextlib.redirect_stdout(sys.stderr):
                compiled = GPT(config).eval()
            compiled.load_state_dict(ours.state_dict())
            compile_decoder(use_cpu_decode_layout(compiled))
            sides["ours_compiled"] = lambda ids, n: run_ours(ids, n, compiled)

        @torch.inference_mode()
        def run_hf(ids, n):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()

        results = {"model": args.model, "overrides": overrides, "params_M": round(config.num_params() / 1e6, 2), "threads": args.threads,
                   "prompt_len": args.prompt_len, "prefill_len": args.prefill_len, "new_tokens": args.new_tokens,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "runs": []}
        rows = []
        for B in args.batch_sizes:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(3, config.vocab_size, (B, args.prompt_len), generator=g)
            long_ids = torch.randint(3, config.vocab_size, (B, args.prefill_len), generator=g)
            row = {"batch": B}
            n = args.new_tokens
            t = measure({(side, what): (lambda fn=fn, x=x, k=k: fn(x, k))
                         for side, fn in (*sides.items(), ("hf", run_hf))
                         for what, x, k in (("prefill", long_ids, 1), ("one", ids, 1), ("all", ids, n))},
                        args.repeats)
            for side in (*sides, "hf"):
                row[side] = {}
                for clock, i in (("wall", 0), ("cpu", 1)):
                    decode_s = t[(side, "all")][i] - t[(side, "one")][i]
                    row[side][clock] = {"prefill_tok_s": round(B * args.prefill_len / t[(side, "prefill")][i], 1),
                                        "decode_tok_s": round(B * (n - 1) / decode_s, 1),
                                        "decode_ms_per_step": round(1000 * decode_s / (n - 1), 3)}
            hf_tokens = run_hf(ids, n)
            row["same_tokens"] = all(fn(ids, n) == hf_tokens for fn in sides.values())
            for side in sides:
                o, h = row[side], row["hf"]
                row[f"{side}_decode_speedup"] = {c: round(o[c]["decode_tok_s"] / h[c]["decode_tok_s"], 2) for c in o}
                row[f"{side}_prefill_speedup"] = {c: round(o[c]["prefill_tok_s"] / h[c]["prefill_tok_s"], 2) for c in o}
                for clock in ("wall", "cpu"):
                    print(f"batch {B} [{clock:4s}] decode {side} {o[clock]['decode_tok_s']:8.1f} tok/s vs HF "
                          f"{h[clock]['decode_tok_s']:8.1f} ({row[f'{side}_decode_speedup'][clock]}x) | prefill "
                          f"{o[clock]['prefill_tok_s']:8.1f} vs HF {h[clock]['prefill_tok_s']:8.1f} "
                          f"({row[f'{side}_prefill_speedup'][clock]}x)", flush=True)
                rows += table_rows(f"decode {args.model} (batch {B})", side, o, h)
            print(f"batch {B}: identical greedy tokens: {row['same_tokens']}", flush=True)
            results["runs"].append(row)
        results["rows"] = rows
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
