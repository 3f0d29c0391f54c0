#!/usr/bin/env python
"""SFT packing: real (non-padding) tokens/s of packed vs one-conversation-per-sample SFT, side by side.

    python benchmarks/sft_packing.py            # the main job's SFT shape: tiny, micro batch 16 x 96 tokens
    python benchmarks/sft_packing.py --quick    # fewer repeats, smaller corpus for the tokenizer

Data: the main job's embedded corpus (megatron_lite.data.corpus), a 6400-token BPE tokenizer trained on its
pretraining text, its SFT conversations preprocessed with --chat (kept in --work-dir and reused).
Variants, through the same calls launch/sft.py makes (build_sft_datasets -> loop.micro_batch -> our
DeepSpeed engine, ZeRO-2 json, 1 process), each step reading the next micro-batch of its own dataset:
  packed    whole conversations packed into each window by first fit (position ids restart, block-diagonal
            causal attention), the default of launch/sft.py
  unpacked  one conversation per window, right-padded (launch/sft.py --no-pack)
Steps (batch assembly + forward + backward + AdamW) are timed turn about in one process; the figure is the
median over rounds of the paired ratio of real tokens/s (real tokens of that round's batch / its step time),
robust to bursts of foreign load; the CPU-time ratio is kept too. Target >= 2.5.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import paired_ratio, row, save_result, time_interleaved  # noqa: E402
from benchmarks.train_throughput import ours_engine, single_process_dims  # noqa: E402


def prepare_data(work: Path, corpus_mb: float, vocab_size: int, log=print) -> Path:
    """The main job's SFT data (corpus -> tokenizer -> preprocess --chat); an earlier preparation is reused."""
    from megatron_lite.data.corpus import write_corpus
    from megatron_lite.data.preprocess import preprocess
    from megatron_lite.data.tokenizer import train_tokenizer_from_jsonl

    data = work / f"data-{corpus_mb:g}mb-vocab{vocab_size}"
    prefix = data / "sft"
    if Path(f"{prefix}_loss_mask_document.idx").is_file():
        log(f"reusing the data in {data}")
        return prefix
    log(f"building the corpus, tokenizer and SFT data in {data}")
    write_corpus(str(data / "corpus"), pretrain_mb=corpus_mb)
    train_tokenizer_from_jsonl([str(data / "corpus/pretrain_train.jsonl")], ["text"], vocab_size, str(data / "tokenizer"))
    preprocess(str(data / "corpus/sft_train.jsonl"), str(prefix), str(data / "tokenizer"), chat=True)
    return prefix


class Variant:
    """Training steps over successive micro-batches of one SFT dataset; records each step's real tokens."""

    def __init__(self, dataset, engine, step_settings):
        from megatron_lite.training.loop import micro_batch

        self.dataset, self.engine, self.s, self.micro_batch = dataset, engine, step_settings, micro_batch
        self.consumed, self.tokens = 0, []

    def __call__(self):
        mb = self.micro_batch(self.dataset, self.s, self.consumed, 0, self.engine.device)
        out = mb.forward(self.engine)
        self.engine.backward(out.loss if out.aux_loss is None else out.loss + out.aux_loss)
        self.engine.step()
        self.consumed += self.s.micro_batch_size
        self.tokens.append(mb.num_tokens)


def run(preset="tiny", batch=16, seq=96, warmup=2, repeats=15, corpus_mb=2.0, vocab_size=6400, work_dir=None,
        results_dir=None, log=print, config_overrides=None) -> dict:
    import torch

    from megatron_lite.config import get_preset, pad_vocab_size
    from megatron_lite.data.sft_dataset import build_sft_datasets
    from megatron_lite.data.tokenizer import load_tokenizer
    from megatron_lite.training.loop import TrainSettings

    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "megatron_lite_sft_packing"
    prefix = prepare_data(work, corpus_mb, vocab_size, log)
    tok = load_tokenizer(str(prefix.parent / "tokenizer"))
    config = get_preset(preset, vocab_size=pad_vocab_size(len(tok)), **(config_overrides or {}))
    dims = single_process_dims()
    s = TrainSettings(train_iters=0, micro_batch_size=batch, grad_accum=1, dp_size=1, dp_rank=0, seq_length=seq,
                      seed=1234)
    n = batch * (1 + warmup + repeats)
    steps, datasets = {}, {}
    for name, pack in (("packed", True), ("unpacked", False)):
        datasets[name] = build_sft_datasets([str(prefix)], "1,0,0", seq, 1234, (n, 0, 0), pack=pack)[0]
        engine, _ = ours_engine(config, dims, batch)
        steps[name] = Variant(datasets[name], engine, s)
        steps[name]()  # first step: allocations, DeepSpeed's lazy set-up
    lengths = datasets["unpacked"].fill
    log(f"{preset} ({config.num_params() / 1e6:.2f}M params), micro batch {batch} x {seq}, "
        f"{len(lengths)} conversations of {lengths.mean():.1f} tokens on average (max {lengths.max()})")
    timing = time_interleaved(steps, warmup=warmup, repeats=repeats)
    res = {}
    for name, tm in timing.items():
        toks = steps[name].tokens[1 + warmup:]  # the timed steps' batches, in order
        rates = [t / dt for t, dt in zip(toks, tm["times"])]
        convs = sum(len(datasets[name].conversation_indices(i)) for i in range(n))
        res[name] = {"step_s": tm["median"], "step_s_min": tm["min"], "step_s_max": tm["max"], "times": tm["times"],
                     "cpu_times": tm["cpu_times"], "real_tokens": toks,
                     "real_tokens_per_s": statistics.median(rates),
                     "fill": sum(toks) / (len(toks) * batch * seq), "conversations_per_window": convs / n}
        log(f"  {name:9s} step {tm['median'] * 1e3:6.1f} ms  {res[name]['real_tokens_per_s']:7.0f} real tok/s  "
            f"window fill {res[name]['fill']:.0%}  {res[name]['conversations_per_window']:.2f} conversations/window")
    # Ratio of real tokens/s = (packed tokens / unpacked tokens) x (unpacked time / packed time), per round.
    tok_ratio = [a / b for a, b in zip(res["packed"]["real_tokens"], res["unpacked"]["real_tokens"])]
    time_ratio = [a / b for a, b in zip(res["unpacked"]["times"], res["packed"]["times"])]
    cpu_ratio = [a / b for a, b in zip(res["unpacked"]["cpu_times"], res["packed"]["cpu_times"])]
    rw = row(f"SFT packing {preset} (micro {batch} x {seq}): real tokens/s packed vs unpacked",
             res["packed"]["real_tokens_per_s"], res["unpacked"]["real_tokens_per_s"], "real tok/s",
             ratio=statistics.median(a * b for a, b in zip(tok_ratio, time_ratio)), target=2.5,
             ratio_cpu_time=statistics.median(a * b for a, b in zip(tok_ratio, cpu_ratio)),
             step_time_ratio=paired_ratio(res["packed"]["times"], res["unpacked"]["times"]),
             fill_ratio=res["packed"]["fill"] / res["unpacked"]["fill"])
    log(f"  -> packed / unpacked real tokens/s: {rw['ratio']:.2f} (CPU time {rw['ratio_cpu_time']:.2f}; window fill "
        f"x{rw['fill_ratio']:.2f}, step time x{rw['step_time_ratio']:.2f}) (target >= 2.5: "
        f"{'met' if rw['met'] else 'NOT met'})")
    result = {"preset": preset, "batch": batch, "seq_length": seq, "repeats": repeats, "corpus_mb": corpus_mb,
              "device": str(steps["packed"].engine.device), "threads": torch.get_num_threads(),
              "conversation_tokens_mean": float(lengths.mean()), "config": config.to_dict(), "variants": res,
              "rows": [rw]}
    save_result("sft_packing", result, results_dir)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 repeats, 1 MB tokenizer corpus (well under a minute "
                   "once the data exists)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny, as the main job)")
    p.add_argument("--batch", type=int, default=16, help="micro batch size (default 16, the main job's SFT)")
    p.add_argument("--seq-length", type=int, default=96, help="tokens per window (default 96, the main job's SFT)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after the first (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 15; quick 5)")
    p.add_argument("--corpus-mb", type=float, default=None,
                   help="MB of pretraining text the tokenizer is trained on (default 2; quick 1; the main job: 8)")
    p.add_argument("--work-dir", default=None, help="where the data goes and is reused (default: a temp folder)")
    p.add_argument("--results-dir", default=None, help="where sft_packing.json goes (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all cores)")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    run(a.preset, a.batch, a.seq_length, a.warmup, a.repeats or (5 if a.quick else 15),
        a.corpus_mb or (1.0 if a.quick else 2.0), work_dir=a.work_dir, results_dir=a.results_dir)


if __name__ == "__main__":
    main()
