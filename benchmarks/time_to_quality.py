#!/usr/bin/env python
"""Time to quality: held-out loss of training recipes on the same token budget, against a plain PyTorch baseline.

    python benchmarks/time_to_quality.py                      # the main job's budget: 540 x 8 x 256 tokens
    python benchmarks/time_to_quality.py --quick              # 30 steps on 1 MB: a few minutes
    python benchmarks/time_to_quality.py --extra wsd="--warmup-iters 13 --min-lr 0" --recipes ours-default

1. Data, with the main job's own commands (launch/main_job.py): the embedded corpus, tools/train_tokenizer.py,
   tools/preprocess_data.py for the train and valid files; kept in --work-dir and reused when already there.
2. Each recipe trains in its own subprocess on the same samples in the same order:
     ours-default       launch/pretrain.py --model tiny with no lr/warmup flags: what users get
     ours-previous      the recipe before 2026-12-04: --lr 2e-3 --warmup-iters iters/20, cosine to 0.1 x lr,
                        AdamW, no QK-norm, no zero-initialised output projections, Adam beta2 0.95, a tied head,
                        and tiny's shape of then (5 layers x 256 wide; 5.08 M parameters)
     baseline-hf-llama  stock transformers LlamaForCausalLM of tiny's shapes (our converter's config: its own
                        output head, so the parameter count of ours-default less the QK-norm weights), torch
                        AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), linear warmup then cosine to 10%,
                        grad clip 1.0, our training samples read through megatron_lite.data.gpt_dataset
     NAME (--extra)     launch/pretrain.py --model tiny plus the given flags
   Ours runs --nproc ranks x (--threads / --nproc) threads; the baseline one process x --threads threads.
3. Every run saves --points checkpoints; ours are exported with tools/convert_to_hf.py and every HF folder is
   scored by one function: mean next-token loss (nats) on the held-out windows `launch/eval.py --split 0,0,1
   --splits test` reads, and bits per byte as launch/main_job.py computes it.
4. Clock: training-loop seconds up to each checkpoint (start-up, saving and evaluation excluded: ours from
   the per-step tokens_per_s of metrics.jsonl, the baseline timed the same way). Loss at the smallest total
   among the runs is read off each curve by linear interpolation.
Outputs: --output JSON (every run: command, params, tokens, seconds, losses, curve), the --plot PNG (held-out
loss vs seconds and vs tokens), and a table of each recipe against the baseline. Under run_all.py the full
size needs a --timeout above its default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import RESULTS_DIR, row, save_result  # noqa: E402
from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_lite.training.monitor import read_metrics, training_clock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROG = "benchmarks/time_to_quality.py"
BASELINE = "baseline-hf-llama"
BUILTIN = ("ours-default", "ours-previous", BASELINE)
MAIN_JOB_ITERS = 540  # launch/main_job.py's --pretrain-iters: the budget the recipe is measured at
# tiny's shape before 2026-12-08 (5 x 256 wide), which ours-previous keeps
PREVIOUS_SHAPE = ["--num-layers", "5", "--hidden-size", "256", "--num-heads", "8", "--num-kv-heads", "4",
                  "--ffn-hidden-size", "640"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(BUILTIN), metavar="NAME",
                   help=f"recipes to train: {', '.join(BUILTIN)} or a NAME from --extra (default: the three "
                        f"built-in ones; every --extra recipe runs too)")
    p.add_argument("--extra", action="append", default=[], metavar='NAME="FLAGS"',
                   help='an extra recipe: launch/pretrain.py --model tiny plus FLAGS, e.g. '
                        'lr3e-3="--lr 3e-3 --warmup-iters 13" (repeatable)')
    p.add_argument("--iters", type=int, default=None,
                   help=f"optimizer steps per recipe (default {MAIN_JOB_ITERS}, the main job's --pretrain-iters; "
                        "earlier recipe rounds ran 520; quick 30)")
    p.add_argument("--global-batch-size", type=int, default=8, help="samples per optimizer step (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward, per rank (default 4)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sample and per eval window (default 256)")
    p.add_argument("--corpus-mb", type=float, default=None, help="MB of embedded corpus text (default 8; quick 1)")
    p.add_argument("--vocab-size", type=int, default=6400, help="tokenizer vocabulary (default 6400)")
    p.add_argument("--split", default="969,30,1", help="train,valid,test document split of the training file, "
                   "as in the main job (default 969,30,1)")
    p.add_argument("--seed", type=int, default=1234, help="init and data-order seed of every run (default 1234)")
    p.add_argument("--nproc", type=int, default=1, help="ranks for our recipes (deepspeed --num_gpus; the "
                   "baseline is always one process) (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads per run: ours split them over its ranks (default: every core)")
    p.add_argument("--points", type=int, default=5, help="checkpoints evaluated per run, evenly spaced (default 5)")
    p.add_argument("--eval-windows", type=int, default=320,
                   help="held-out windows scored; 0: every window of the valid file (default 320, the main "
                        "job's 40 batches x 8)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per evaluation forward (default 8)")
    p.add_argument("--work-dir", default=str(RESULTS_DIR / "logs" / "ttq"),
                   help="data, checkpoints, HF exports and logs (default benchmarks/results/logs/ttq)")
    p.add_argument("--output", default=str(RESULTS_DIR / "time_to_quality.json"), help="results JSON")
    p.add_argument("--plot", default=str(RESULTS_DIR / "time_to_quality_curve.png"),
                   help="loss-curve PNG (run_all.py writes its own ratio chart to results/time_to_quality.png)")
    p.add_argument("--quick", action="store_true", help="a smaller budget: 30 steps on 1 MB of text")
    p.add_argument("--_baseline", metavar="SPEC", default=None, help=argparse.SUPPRESS)  # the baseline subprocess
    a = p.parse_args(argv)
    a.iters = a.iters or (30 if a.quick else MAIN_JOB_ITERS)
    a.corpus_mb = a.corpus_mb or (1.0 if a.quick else 8.0)
    return a


def recipes(a) -> dict[str, list[str] | None]:
    """name -> flags added to our pretrain command (None: the baseline), in the order they run."""
    table = {"ours-default": [], "ours-previous": ["--lr", "2e-3", "--warmup-iters", str(warmup_iters(a.iters)),
                                                   "--lr-decay-style", "cosine", "--min-lr", "2e-4", "--no-qk-norm",
                                                   "--no-zero-init-output", "--adam-beta2", "0.95",
                                                   "--optimizer", "adamw", "--tie-embeddings", "--embedding-lr",
                                                   "2e-3", *PREVIOUS_SHAPE],
             BASELINE: None}
    for spec in a.extra:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in table:
            raise UserError(f"--extra {spec!r}: expected NAME=\"FLAGS\" with a new NAME (not {', '.join(table)})")
        table[name] = shlex.split(flags)
    unknown = [r for r in a.recipes if r not in table]
    if unknown:
        raise UserError(f"unknown recipe {unknown[0]!r}; choose from {', '.join(table)}")
    chosen = list(dict.fromkeys(a.recipes + [spec.partition("=")[0] for spec in a.extra]))
    return {name: table[name] for name in chosen}


def warmup_iters(iters: int) -> int:
    return max(1, iters // 20)  # the main job's rule


def save_steps(a) -> list[int]:
    every = max(1, a.iters // a.points)
    return sorted({*range(every, a.iters + 1, every), a.iters})


def check_input(a) -> None:
    for flag in ("iters", "global_batch_size", "micro_batch_size", "seq_length", "nproc", "threads", "points",
                 "eval_batch_size"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.eval_windows < 0 or a.corpus_mb <= 0:
        raise UserError("--eval-windows must be >= 0 and --corpus-mb > 0")
    if a.global_batch_size % (a.micro_batch_size * a.nproc):
        raise UserError(f"--global-batch-size {a.global_batch_size} is not divisible by --micro-batch-size "
                        f"{a.micro_batch_size} x --nproc {a.nproc}")
    for tool in ("launch/pretrain.py", "launch/main_job.py", "tools/train_tokenizer.py", "tools/preprocess_data.py",
                 "tools/convert_to_hf.py"):
        if not (ROOT / tool).is_file():
            raise UserError(f"{tool} is missing from {ROOT}")
    if a.nproc > 1 and not deepspeed_launcher():
        raise UserError("--nproc > 1 needs the `deepspeed` launcher on PATH or next to this python")


def deepspeed_launcher() -> str | None:
    found = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    return found if os.path.isfile(found) else None


# ---------------------------------------------------------------------------------------------- running

def subprocess_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # each run is its own world
        env.pop(var, None)
    return env


def run(name: str, cmd: list, log: Path, threads: int = 1) -> float:
    """Run one step with its output in `log`; seconds it took. A failure is one line naming the log."""
    cmd = [str(c) for c in cmd]
    print(f"=== {name}\n$ {shlex.join(cmd)}\n  (log {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise UserError(f"step '{name}' failed with exit code {p.returncode} (last line: {tail[0][:200]}); "
                        f"see {log}")
    return time.perf_counter() - t


def prepare_data(a, data: Path) -> dict:
    """The main job's data steps, same commands; a complete earlier preparation in `data` is reused."""
    py = sys.executable
    paths = {"corpus": data / "corpus", "tokenizer": data / "tokenizer",
             "train": data / "data/pretrain_train_text_document", "valid": data / "data/pretrain_valid_text_document"}
    if all(Path(f"{paths[k]}.{ext}").is_file() for k in ("train", "valid") for ext in ("bin", "idx")):
        print(f"reusing the data in {data}")
        return paths
    logs = data / "logs"
    run("build the embedded corpus", [py, "-m", "megatron_lite.data.corpus", "--output-dir", paths["corpus"],
                                      "--pretrain-mb", a.corpus_mb], logs / "corpus.log")
    run("train the tokenizer", [py, "tools/train_tokenizer.py", "--input", paths["corpus"] / "pretrain_train.jsonl",
                                "--vocab-size", a.vocab_size, "--output-dir", paths["tokenizer"]], logs / "tokenizer.log")
    for split in ("train", "valid"):
        run(f"preprocess pretraining text ({split})",
            [py, "tools/preprocess_data.py", "--input", paths["corpus"] / f"pretrain_{split}.jsonl",
             "--output-prefix", data / f"data/pretrain_{split}", "--tokenizer", paths["tokenizer"],
             "--json-keys", "text", "--append-eod", "--workers", "2"], logs / f"preprocess_{split}.log")
    return paths


def ours_command(a, paths: dict, ckpt: Path, flags: list[str]) -> list:
    launch = ([deepspeed_launcher(), "--num_gpus", a.nproc] if a.nproc > 1 else [sys.executable])
    return [*launch, "launch/pretrain.py", "--deepspeed", "ds_configs/zero2.json", "--model", "tiny",
            "--tokenizer", paths["tokenizer"], "--data-path", paths["train"], "--split", a.split,
            "--seq-length", a.seq_length, "--micro-batch-size", a.micro_batch_size,
            "--global-batch-size", a.global_batch_size, "--train-iters", a.iters, "--seed", a.seed,
            "--log-interval", 1, "--save", ckpt, "--save-interval", save_steps(a)[0], *flags]


def train_ours(a, name: str, flags: list[str], paths: dict, run_dir: Path) -> dict:
    """Train, then export every saved step to run_dir/hf/stepN; {command, process_s, points: {step: seconds}}."""
    ckpt = run_dir / "ckpt"
    cmd = ours_command(a, paths, ckpt, flags)
    process_s = run(f"train {name}", cmd, run_dir / "train.log", threads=max(1, a.threads // a.nproc))
    clock = training_clock(read_metrics(ckpt), a.global_batch_size * a.seq_length)
    for step in save_steps(a):
        run(f"export {name} step {step}", [sys.executable, "tools/convert_to_hf.py", "--load", ckpt,
                                           "--tag", f"global_step{step}", "--output", run_dir / f"hf/step{step}"],
            run_dir / "export.log")
    return {"command": shlex.join(str(c) for c in cmd), "process_s": process_s,
            "points": {step: clock[step] for step in save_steps(a)}}


def train_baseline_subprocess(a, paths: dict, run_dir: Path) -> dict:
    spec = {"tokenizer": str(paths["tokenizer"]), "data": str(paths["train"]), "split": a.split,
            "seq_length": a.seq_length, "seed": a.seed, "iters": a.iters, "warmup": warmup_iters(a.iters),
            "global_batch": a.global_batch_size, "micro_batch": a.micro_batch_size, "threads": a.threads,
            "save_steps": save_steps(a), "out": str(run_dir / "hf")}
    (run_dir / "hf").mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "baseline_spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    cmd = [sys.executable, PROG, "--_baseline", spec_path]
    process_s = run(f"train {BASELINE}", cmd, run_dir / "train.log", threads=a.threads)
    clock = json.loads((run_dir / "hf/clock.json").read_text())
    return {"command": f"{shlex.join(str(c) for c in cmd)}  # spec: {json.dumps(spec)}", "process_s": process_s,
            "points": {int(k): v for k, v in clock.items()}}


# ---------------------------------------------------------------------------------------------- baseline

def next_token_loss(model, input_ids, labels, reduction="mean"):
    """Cross-entropy of an HF causal LM's logits against labels already shifted by the dataset."""
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)


def train_baseline(spec: dict) -> None:
    """The loop a PyTorch user would write, fed our training samples in our order (step i: samples
    [i x global_batch, (i + 1) x global_batch)); saves HF folders and the training clock at spec's steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lite.config import get_preset, pad_vocab_size
    from megatron_lite.convert.hf import hf_config_dict
    from megatron_lite.data.gpt_dataset import build_gpt_datasets
    from megatron_lite.data.tokenizer import load_tokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    hf_config = hf_config_dict(get_preset("tiny", vocab_size=pad_vocab_size(len(load_tokenizer(spec["tokenizer"]))),
                                               qk_norm=False))  # the plain Llama a user would write
    hf_config.pop("architectures"), hf_config.pop("model_type")
    model = LlamaForCausalLM(LlamaConfig(**hf_config, attn_implementation="sdpa")).train()
    iters, warmup, gb, mb = spec["iters"], spec["warmup"], spec["global_batch"], spec["micro_batch"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_factor(step):  # linear warmup, then cosine down to 10 % of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, iters - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    train = build_gpt_datasets([spec["data"]], spec["split"], spec["seq_length"], spec["seed"], (iters * gb, 0, 0))[0]
    clock, seconds = {}, 0.0
    for it in range(iters):
        t = time.perf_counter()
        for first in range(it * gb, (it + 1) * gb, mb):
            items = [train[i] for i in range(first, first + mb)]
            x, y = (torch.stack([s[k] for s in items]) for k in ("input_ids", "labels"))
            (next_token_loss(model, x, y) * (mb / gb)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t
        if it + 1 in spec["save_steps"]:
            model.save_pretrained(Path(spec["out"]) / f"step{it + 1}")
            clock[it + 1] = seconds
    (Path(spec["out"]) / "clock.json").write_text(json.dumps(clock) + "\n")


# ---------------------------------------------------------------------------------------------- evaluation

def heldout_windows(valid_prefix, seq_length: int, seed: int, n: int):
    """The first n windows (all of one epoch when n is 0 or larger) that `launch/eval.py --split 0,0,1
    --splits test --seed SEED` scores on the valid file: seq_length targets each, none seen twice."""
    from megatron_lite.data.gpt_dataset import build_gpt_datasets
    from megatron_lite.data.indexed_dataset import IndexedDataset

    per_epoch = max(1, IndexedDataset(str(valid_prefix)).num_tokens // seq_length)
    n = min(n or per_epoch, per_epoch)
    return build_gpt_datasets([str(valid_prefix)], "0,0,1", seq_length, seed, (0, 0, n))[2]


@torch.no_grad()
def heldout_loss(model, windows, batch_size: int) -> float:
    """Mean next-token loss (nats) of an HF causal LM over every target of every window."""
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        items = [windows[i] for i in range(first, min(first + batch_size, len(windows)))]
        x, y = (torch.stack([s[k] for s in items]) for k in ("input_ids", "labels"))
        total += float(next_token_loss(model, x, y, reduction="sum"))
        count += y.numel()
    return total / count


def bits_per_byte_factor(data: Path) -> float:
    """Bits per byte per nat of loss, as the main job measures it on the held-out text."""
    from launch.main_job import Pipeline, parse_args as main_job_args

    return Pipeline(main_job_args(["--work-dir", str(data)])).bits_per_byte(1.0)


def score(a, name: str, trained: dict, run_dir: Path, windows, bpb_per_nat: float) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    curve, params = [], None
    for step, seconds in sorted(trained["points"].items()):
        model = AutoModelForCausalLM.from_pretrained(run_dir / f"hf/step{step}", dtype=torch.float32)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        loss = heldout_loss(model, windows, a.eval_batch_size)
        curve.append({"step": step, "tokens": step * a.global_batch_size * a.seq_length, "seconds": seconds,
                      "loss": loss, "bits_per_byte": loss * bpb_per_nat})
        print(f"{name} step {step}: held-out loss {loss:.4f} after {seconds:.1f} s of training", flush=True)
    final = curve[-1]
    return {"recipe": name, "command": trained["command"], "params": params, "tokens": final["tokens"],
            "train_seconds": final["seconds"], "process_seconds": trained["process_s"], "loss": final["loss"],
            "bits_per_byte": final["bits_per_byte"], "curve": curve}


def loss_at(curve: list[dict], seconds: float) -> float | None:
    """Held-out loss at `seconds` of training, linear between the evaluated points (None before the first)."""
    if seconds < curve[0]["seconds"]:
        return None
    for lo, hi in zip(curve, curve[1:]):
        if seconds <= hi["seconds"]:
            w = (seconds - lo["seconds"]) / (hi["seconds"] - lo["seconds"])
            return lo["loss"] + w * (hi["loss"] - lo["loss"])
    return curve[-1]["loss"]


# ---------------------------------------------------------------------------------------------- report

def compare(runs: list[dict]) -> tuple[str, float, list[dict]]:
    """Reference recipe, wall-clock budget, and results.md rows of every other recipe against the reference."""
    ref = next((r for r in runs if r["recipe"] == BASELINE), runs[0])
    budget = min(r["train_seconds"] for r in runs)
    rows = []
    for r in runs:
        r["loss_at_budget"] = loss_at(r["curve"], budget)
        r["nats_vs_reference"] = r["loss"] - ref["loss"]
    for r in runs:
        at, ref_at = r["loss_at_budget"], ref["loss_at_budget"]
        r["nats_vs_reference_at_budget"] = at - ref_at if at is not None and ref_at is not None else None
        if r is ref:
            continue
        rows.append(row(f"time_to_quality: {r['recipe']} vs {ref['recipe']}, held-out loss at {r['tokens']:,} "
                        f"tokens", r["loss"], ref["loss"], "nats", higher_is_better=False))
        if at is not None and ref_at is not None:
            rows.append(row(f"time_to_quality: {r['recipe']} vs {ref['recipe']}, held-out loss at {budget:.0f} s "
                            f"of training", at, ref_at, "nats", higher_is_better=False))
    return ref["recipe"], budget, rows


def print_table(runs: list[dict], ref: str, budget: float) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("recipe", "params", "tokens", "train s", "loss", "bits/byte", f"vs {ref}", f"loss @{budget:.0f}s",
            f"vs {ref} @{budget:.0f}s")
    lines = [head] + [(r["recipe"], f"{r['params'] / 1e6:.2f}M", f"{r['tokens']:,}", f"{r['train_seconds']:.1f}",
                       f"{r['loss']:.4f}", f"{r['bits_per_byte']:.4f}", f"{r['nats_vs_reference']:+.4f}",
                       f(r["loss_at_budget"], ".4f"), f(r["nats_vs_reference_at_budget"], "+.4f")) for r in runs]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"(vs {ref}: held-out nats minus the reference's; negative is better. @{budget:.0f}s: on each curve at "
          f"the shortest run's training time)")


def plot(runs: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        for ax, x in zip(axes, ("seconds", "tokens")):
            ax.plot([p[x] for p in r["curve"]], [p["loss"] for p in r["curve"]], "o-", label=r["recipe"])
    axes[0].axvline(budget, color="grey", ls="--", lw=1)
    axes[0].set(xlabel="training seconds", ylabel="held-out loss (nats)", title="held-out loss vs wall clock")
    axes[1].set(xlabel="training tokens", ylabel="held-out loss (nats)", title="held-out loss vs tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a._baseline:
        train_baseline(json.loads(Path(a._baseline).read_text()))
        return {}
    chosen = recipes(a)
    check_input(a)
    work = Path(a.work_dir).resolve()
    data = work / f"data-{a.corpus_mb:g}mb-vocab{a.vocab_size}"
    print(f"threads: ours {a.nproc} process(es) x {max(1, a.threads // a.nproc)} thread(s); "
          f"{BASELINE} 1 process x {a.threads} thread(s)", flush=True)
    paths = prepare_data(a, data)
    torch.set_num_threads(a.threads)
    windows = heldout_windows(paths["valid"], a.seq_length, a.seed, a.eval_windows)
    bpb_per_nat = bits_per_byte_factor(data)
    runs = []
    for name, flags in chosen.items():
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # every run trains from scratch
        run_dir.mkdir(parents=True)
        trained = train_baseline_subprocess(a, paths, run_dir) if flags is None else \
            train_ours(a, name, flags, paths, run_dir)
        runs.append(score(a, name, trained, run_dir, windows, bpb_per_nat))
    ref, budget, rows = compare(runs)
    print_table(runs, ref, budget)
    plot(runs, Path(a.plot), budget)
    result = {"settings": {k: v for k, v in vars(a).items() if k != "_baseline"},
              "threads": {"ours": f"{a.nproc} x {max(1, a.threads // a.nproc)}", BASELINE: f"1 x {a.threads}"},
              "eval_windows": len(windows), "bits_per_byte_per_nat": bpb_per_nat, "reference": ref,
              "wall_clock_budget_s": budget, "runs": runs, "rows": rows}
    out = Path(a.output)
    save_result(out.stem, result, out.parent)
    return result


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        main()
