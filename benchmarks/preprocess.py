#!/usr/bin/env python
"""Preprocessing throughput: ours (tools/preprocess_data.py) vs a megatron-core baseline vs raw tokenizer.

    python benchmarks/preprocess.py [--mb 20] [--workers 2] [--repeats 3] [--tokenizer DIR]

- ours: `megatron_lite.data.preprocess.preprocess`, as tools/preprocess_data.py --workers N --append-eod
  runs it (batch encoding, bounded in-flight work).
- baseline: what Megatron-LM's preprocess_data.py does, with megatron-core's IndexedDatasetBuilder:
  Pool(N).imap over lines (chunksize 32), json.loads + the HF tokenizer called once per document,
  builder.add_document(torch tensor) per document.
- raw: `tokenizers` encode_batch_fast on all texts already in memory (the tokenizer's own threads):
  the ceiling for any tool that has to tokenize.

Input: the embedded corpus's text cut into 0.5-4 KB documents (web-page sized) and repeated to --mb MB.
Each variant runs in a fresh process; the best of --repeats wall times (imports excluded) is reported,
with peak RSS (process + its workers). Results go to benchmarks/results/preprocess.json.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------- variants (run in child processes)

def run_ours(inp, tok, out, workers):
    from megatron_lite.data.preprocess import preprocess

    t = time.perf_counter()
    preprocess(inp, out, tok, append_eod=True, workers=workers)
    return time.perf_counter() - t


_T = {}


def _mc_init(tok):
    from transformers import AutoTokenizer
    _T["tok"] = AutoTokenizer.from_pretrained(tok)


def _mc_encode(line):
    doc = json.loads(line)
    ids = _T["tok"](doc["text"]).input_ids
    ids.append(_T["tok"].eos_token_id)
    return ids


def run_baseline(inp, tok, out, workers):
    import multiprocessing as mp
    import warnings

    import numpy as np
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import transformers  # noqa: F401  imported before timing, so forked workers do not pay for it
    t = time.perf_counter()
    with open(inp, "rb") as f, mp.get_context("fork").Pool(workers, _mc_init, (tok,)) as pool:
        builder = IndexedDatasetBuilder(out + "_text_document.bin", dtype=np.uint16)
        for ids in pool.imap(_mc_encode, f, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
        builder.finalize(out + "_text_document.idx")
    return time.perf_counter() - t


def run_raw(inp, tok, out, workers):
    from tokenizers import Tokenizer
    backend = Tokenizer.from_file(os.path.join(tok, "tokenizer.json"))
    with open(inp, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    t = time.perf_counter()
    backend.encode_batch_fast(texts, add_special_tokens=False)
    return time.perf_counter() - t


VARIANTS = {"ours": run_ours, "baseline": run_baseline, "raw": run_raw}


def _cpu():
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def child(variant, inp, tok, out, workers):
    # CPU seconds (process + reaped workers) are reported too: on a shared machine wall time
    # swings with other people's load, CPU time much less.
    cpu0 = _cpu()
    sec = VARIANTS[variant](inp, tok, out, workers)
    cpu = _cpu() - cpu0
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": sec, "cpu_seconds": cpu, "peak_rss_mb": rss / 1024}))


# ---------------------------------------------------------------- driver

def make_input(path, mb, seed=0):
    """Embedded-corpus text in 0.5-4 KB documents, repeated to `mb` MB of JSONL."""
    from megatron_lite.data.corpus import stdlib_documents

    rng = random.Random(seed)
    docs = []
    for _, text in stdlib_documents(8_000_000, seed):
        i = 0
        while i < len(text):
            n = rng.randint(500, 4000)
            docs.append(text[i:i + n])
            i += n
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= mb * 1e6:
                    break
    return size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mb", type=float, default=20, help="input size in MB (default 20)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for ours and baseline (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; the fastest counts (default 3)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: train an 8k BPE on the embedded corpus)")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks/results/preprocess.json"),
                   help="where to write the results JSON")
    p.add_argument("--child", nargs=5, metavar=("VARIANT", "INPUT", "TOKENIZER", "OUT", "WORKERS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        v, inp, tok, out, w = args.child
        return child(v, inp, tok, out, int(w))

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "input.jsonl")
        size = make_input(inp, args.mb)
        tok = args.tokenizer
        if tok is None:
            from megatron_lite.data.corpus import stdlib_documents
            from megatron_lite.data.tokenizer import train_tokenizer
            tok = os.path.join(tmp, "tok")
            train_tokenizer((t for _, t in stdlib_documents(8_000_000)), 8192, tok)
        best = {}
        for r in range(args.repeats):
            for v in VARIANTS:  # interleaved so background load hits every variant alike
                res = subprocess.run([sys.executable, __file__, "--child", v, inp, tok,
                                      os.path.join(tmp, v), str(args.workers)],
                                     capture_output=True, text=True)
                if res.returncode:
                    sys.exit(f"benchmark variant {v} failed:\n{res.stderr}")
                m = json.loads(res.stdout.strip().splitlines()[-1])
                if v not in best or m["seconds"] < best[v]["seconds"]:
                    best[v] = dict(m, cpu_seconds=min(m["cpu_seconds"], best.get(v, m)["cpu_seconds"]))
                else:
                    best[v]["cpu_seconds"] = min(m["cpu_seconds"], best[v]["cpu_seconds"])
                print(f"run {r + 1} {v:9s} {m['seconds']:7.2f}s  {size / 1e6 / m['seconds']:6.2f} MB/s  "
                      f"cpu {m['cpu_seconds']:6.2f}s  peak RSS {m['peak_rss_mb']:.0f} MB", file=sys.stderr)
        # Same tokens from ours and the baseline, or the comparison means nothing.
        same = all(open(os.path.join(tmp, f"{v}_text_document{e}"), "rb").read() ==
                   open(os.path.join(tmp, f"ours_text_document{e}"), "rb").read()
                   for v in ("baseline",) for e in (".bin", ".idx"))

    mbps = {v: size / 1e6 / m["seconds"] for v, m in best.items()}
    result = {
        "input_mb": size / 1e6, "workers": args.workers, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "mb_per_s": mbps, "seconds": {v: m["seconds"] for v, m in best.items()},
        "peak_rss_mb": {v: m["peak_rss_mb"] for v, m in best.items()},
        "cpu_seconds": {v: m["cpu_seconds"] for v, m in best.items()},
        "mb_per_cpu_s": {v: size / 1e6 / m["cpu_seconds"] for v, m in best.items()},
        "ours_vs_baseline": mbps["ours"] / mbps["baseline"], "ours_vs_raw": mbps["ours"] / mbps["raw"],
        "identical_output_to_baseline": same,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"ours {mbps['ours']:.2f} MB/s | megatron-core baseline {mbps['baseline']:.2f} MB/s | raw encode_batch "
          f"{mbps['raw']:.2f} MB/s || ours/baseline {result['ours_vs_baseline']:.2f}x, ours/raw "
          f"{result['ours_vs_raw']:.0%} | identical output: {same} -> {args.output}")
    cpu = result["mb_per_cpu_s"]
    print(f"per CPU-second: ours {cpu['ours']:.2f} MB | baseline {cpu['baseline']:.2f} MB | raw {cpu['raw']:.2f} MB "
          f"|| ours/baseline {cpu['ours'] / cpu['baseline']:.2f}x, ours/raw {cpu['ours'] / cpu['raw']:.0%}")


if __name__ == "__main__":
    main()
