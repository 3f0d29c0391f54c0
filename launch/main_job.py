"""The main job: the whole pipeline on the embedded default corpus, end to end, no download, no GPU needed.

    corpus -> tokenizer -> preprocess (pretrain + SFT) -> pretrain (deepspeed, 2 ranks, ZeRO-2) -> SFT
    -> evaluate (held-out loss, bits per byte, SFT exact match on held-out arithmetic, per operation) -> convert to HF
    -> sample chats from the exported model with stock transformers -> summary table + loss-curve PNG

Every step runs the same documented command a user would type (printed as it runs), so any step can be
repeated by hand on other data. `bash launch/quickstart.sh` installs the package and runs this file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_lite.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_lite.eval.arithmetic import format_by_op, heldout_questions, score_arithmetic  # noqa: E402
from megatron_lite.parallel import free_port  # noqa: E402
from megatron_lite.training.monitor import read_metrics, training_clock  # noqa: E402

# The recipe's global batch is RECIPE_RANKS micro-batches; fewer processes accumulate the rest. Dense
# trains fastest on CPU as DENSE_NPROC single-threaded ranks (benchmarks/main_job_throughput.py).
RECIPE_RANKS = 2
DENSE_NPROC = 2
# (pretraining, SFT) steps per model: about the same minutes, as tiny (3 x 192) steps cost half of tiny-moe's (4 x 256)
ITERS = {"tiny": (540, 100), "tiny-moe": (280, 60)}
SAMPLE_QUESTIONS = ["What is 12 + 30?", "What does `json.dumps` do?", "Compute 7 * 8."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/quickstart", help="where every artifact goes (default: runs/quickstart)")
    p.add_argument("--moe", action="store_true", help="train MiniMoE (tiny-moe, 4 experts, top-2, expert parallel 2)")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes (deepspeed --num_gpus; CPU: gloo ranks), sharing the cores as OpenMP "
                        f"threads; fewer than {RECIPE_RANKS} accumulate gradients so the global batch stays "
                        f"{RECIPE_RANKS} x the micro-batch (default: {DENSE_NPROC}; --moe needs an even number for "
                        "expert parallel 2)")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="MB of stdlib text for pretraining (default: 8)")
    p.add_argument("--pretrain-arith", type=int, default=0,
                   help="equations 'a op b = c' mixed into the pretraining text (none of them held out; default: 0)")
    p.add_argument("--sft-arith", type=int, default=4000,
                   help="generated arithmetic conversations in the SFT data (default: 4000)")
    p.add_argument("--vocab-size", type=int, default=6400, help="tokenizer vocabulary (default: 6400)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per training sample (default: 256)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="pretraining samples per rank per step (default: 4, a global batch of 8 x 256 tokens)")
    p.add_argument("--pretrain-iters", type=int, default=None,
                   help="pretraining optimizer steps (default: 540, with --moe 280: about 4 minutes on 2 cores; more "
                        "steps score better, at ~0.4 s each, with --moe ~0.8 s: benchmarks/results.md)")
    p.add_argument("--sft-iters", type=int, default=None,
                   help="SFT optimizer steps (default: 100, with --moe 60: about a minute; more steps lower the SFT "
                        "validation loss, at ~0.5 s each, with --moe ~1 s: benchmarks/results.md)")
    p.add_argument("--sft-seq-length", type=int, default=96,
                   help="tokens per SFT sample; the embedded conversations average ~32 tokens (default: 96)")
    p.add_argument("--sft-micro-batch-size", type=int, default=16, help="SFT samples per rank per step (default: 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="pretraining peak learning rate (default: the preset's recipe, megatron_lite/training/recipe.py)")
    p.add_argument("--sft-lr", type=float, default=None, help="SFT peak learning rate (default: the SFT recipe)")
    p.add_argument("--heldout-batches", type=int, default=40, help="batches of 8 held-out samples evaluated (default: 40)")
    p.add_argument("--eval-questions", type=int, default=100, help="held-out arithmetic questions scored (default: 100)")
    p.add_argument("--seed", type=int, default=1234, help="training seed (default: 1234)")
    p.add_argument("--harness", choices=["auto", "on", "off"], default="auto",
                   help="score the HF export with lm-evaluation-harness on the local tasks (launch/eval.py --harness) "
                        "for report.md; auto: when lm_eval is installed (pip install -e '.[eval]') (default: auto)")
    a = p.parse_args(argv)
    if a.nproc is None:
        a.nproc = RECIPE_RANKS if a.moe else DENSE_NPROC
    pretrain_iters, sft_iters = ITERS["tiny-moe" if a.moe else "tiny"]
    a.pretrain_iters = pretrain_iters if a.pretrain_iters is None else a.pretrain_iters
    a.sft_iters = sft_iters if a.sft_iters is None else a.sft_iters
    if a.nproc < 1 or a.moe and a.nproc % 2:
        raise UserError(f"--nproc must be >= 1{' and even (expert parallel 2)' if a.moe else ''}, got {a.nproc}")
    return a


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.timings: list[tuple[str, float]] = []
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        # The ranks share the machine's cores: cores / ranks OpenMP threads each.
        self.train_env = {**self.env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}

    def run(self, name: str, cmd: list[str], env=None, capture=False) -> str:
        print(f"\n=== {name}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or self.env, text=True,
                              stdout=subprocess.PIPE if capture else None)
        self.timings.append((name, time.perf_counter() - t))
        if proc.returncode != 0:
            sys.exit(f"main_job: step '{name}' failed with exit code {proc.returncode}; its command is printed above")
        if capture:
            print(proc.stdout, end="")
        return proc.stdout or ""

    def deepspeed(self, script: str, extra: list[str]) -> list[str]:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        accum = max(1, RECIPE_RANKS // self.args.nproc)
        return [launcher, "--num_gpus", str(self.args.nproc), "--master_port", str(free_port()), script,
                "--deepspeed", "ds_configs/zero2.json", *(["--grad-accum", str(accum)] if accum > 1 else []), *extra]

    def model_flags(self) -> list[str]:
        if self.args.moe:
            return ["--model", "tiny-moe", "--num-experts", "4", "--topk", "2", "--ep", "2"]
        return ["--model", "tiny"]

    # ------------------------------------------------------------------ the steps
    def main(self) -> None:
        a, w, py = self.args, self.work, sys.executable
        w.mkdir(parents=True, exist_ok=True)
        for stale in ("ckpt_pretrain", "ckpt_sft", "hf"):  # a rerun starts training from scratch
            shutil.rmtree(w / stale, ignore_errors=True)
        self.run("build the embedded corpus", [py, "-m", "megatron_lite.data.corpus", "--output-dir", w / "corpus",
                                               "--pretrain-mb", a.corpus_mb, "--pretrain-arith", a.pretrain_arith,
                                               "--sft-arith", a.sft_arith])
        self.run("train the tokenizer", [py, "tools/train_tokenizer.py", "--input", w / "corpus/pretrain_train.jsonl",
                                         "--vocab-size", a.vocab_size, "--output-dir", w / "tokenizer"])
        for split in ("train", "valid"):
            self.run(f"preprocess pretraining text ({split})",
                     [py, "tools/preprocess_data.py", "--input", w / f"corpus/pretrain_{split}.jsonl",
                      "--output-prefix", w / f"data/pretrain_{split}", "--tokenizer", w / "tokenizer",
                      "--json-keys", "text", "--append-eod", "--workers", "2"])
        self.run("preprocess SFT conversations", [py, "tools/preprocess_data.py", "--chat",
                                                  "--input", w / "corpus/sft_train.jsonl", "--output-prefix", w / "data/sft",
                                                  "--tokenizer", w / "tokenizer", "--workers", "2"])
        common = ["--tokenizer", w / "tokenizer", "--seed", a.seed, "--log-interval", 5, "--eval-iters", 4]
        self.run("pretrain", self.deepspeed("launch/pretrain.py", [
            *self.model_flags(), *common, "--seq-length", a.seq_length, "--micro-batch-size", a.micro_batch_size,
            "--data-path", w / "data/pretrain_train_text_document", "--split", "969,30,1",
            "--train-iters", a.pretrain_iters, *(["--lr", a.lr] if a.lr is not None else []),
            "--eval-interval", max(1, a.pretrain_iters // 5), "--save", w / "ckpt_pretrain",
            "--save-interval", a.pretrain_iters]), env=self.train_env)
        self.run("SFT", self.deepspeed("launch/sft.py", [
            *common, "--seq-length", a.sft_seq_length, "--micro-batch-size", a.sft_micro_batch_size,
            "--pretrained", w / "ckpt_pretrain", "--data-path", w / "data/sft_text_document",
            "--split", "95,5,0", "--train-iters", a.sft_iters, *(["--lr", a.sft_lr] if a.sft_lr is not None else []),
            "--eval-interval", max(1, a.sft_iters // 4),
            "--save", w / "ckpt_sft", "--save-interval", a.sft_iters, *(["--ep", "2"] if a.moe else [])]),
            env=self.train_env)
        heldout_json = w / "heldout_eval.jsonl"
        heldout_json.unlink(missing_ok=True)
        self.run("held-out evaluation (files never seen in training)", [
            py, "launch/eval.py", "--load", w / "ckpt_pretrain", "--data-path", w / "data/pretrain_valid_text_document",
            "--split", "0,0,1", "--splits", "test", "--seq-length", a.seq_length, "--micro-batch-size", 8,
            "--eval-iters", a.heldout_batches, "--output", heldout_json])
        self.heldout = json.loads(heldout_json.read_text().strip().splitlines()[-1])
        self.heldout["bits_per_byte"] = self.bits_per_byte(self.heldout["loss"])
        self.exact_match = self.score_arithmetic()
        self.run("convert to HuggingFace", [py, "tools/convert_to_hf.py", "--load", w / "ckpt_sft", "--output", w / "hf"])
        self.samples = self.sample_chats_with_transformers()
        self.harness = self.run_harness()
        self.time_to_quality = self.pretraining_time_to_quality()
        self.plot_losses()
        self.summary()
        self.report()

    # ------------------------------------------------------------------ evaluation helpers
    def bits_per_byte(self, loss_nats: float) -> float:
        """Tokenizer-independent: nats/token * tokens/byte / ln 2, with tokens/byte measured on the held-out text."""
        from megatron_lite.data.tokenizer import load_tokenizer

        tok = load_tokenizer(self.work / "tokenizer")
        n_tokens = n_bytes = 0
        with open(self.work / "corpus/pretrain_valid.jsonl", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                n_tokens += len(tok(text)["input_ids"]) + 1  # + the EOD the dataset appends
                n_bytes += len(text.encode("utf-8"))
        return loss_nats * n_tokens / n_bytes / math.log(2)

    def score_arithmetic(self) -> dict:
        """Exact match of greedy answers to held-out single-turn arithmetic questions, in total and per operation."""
        from megatron_lite.inference.loading import load_model

        t = time.perf_counter()
        print("\n=== SFT exact match on held-out arithmetic", flush=True)
        model, tok = load_model(self.work / "ckpt_sft")
        scores = score_arithmetic(model, tok, heldout_questions(self.work / "corpus/sft_valid.jsonl",
                                                                self.args.eval_questions))
        self.timings.append(("SFT exact match", time.perf_counter() - t))
        print(f"exact match: {scores['correct']}/{scores['total']} ({format_by_op(scores)})")
        return scores

    def sample_chats_with_transformers(self) -> list[tuple[str, str]]:
        """Chat with the exported folder through stock transformers only (no megatron_lite code)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t = time.perf_counter()
        print("\n=== sample chats (stock transformers on the exported HF folder)", flush=True)
        tok = AutoTokenizer.from_pretrained(self.work / "hf")
        model = AutoModelForCausalLM.from_pretrained(self.work / "hf").eval()
        out = []
        for q in SAMPLE_QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            out.append((q, answer))
            print(f"user: {q}\nassistant: {answer}\n")
        self.timings.append(("sample chats", time.perf_counter() - t))
        return out

    def run_harness(self) -> dict | None:
        """lm_eval's results JSON for the local tasks on the HF export, or None when it is not run."""
        import importlib.util

        wanted = self.args.harness
        if wanted == "off" or wanted == "auto" and importlib.util.find_spec("lm_eval") is None:
            print("\n=== lm-evaluation-harness skipped (--harness on, or install lm_eval: pip install -e '.[eval]')")
            return None
        out = self.work / "harness.json"
        self.run("lm-evaluation-harness on the HF export (local tasks)",
                 [sys.executable, "launch/eval.py", "--harness", "--hf", self.work / "hf", "--output", out])
        return json.loads(out.read_text())

    # ------------------------------------------------------------------ report
    def metrics(self, ckpt: str, key: str | None = None) -> list[dict]:
        return read_metrics(self.work / ckpt, key)

    def pretraining_time_to_quality(self) -> list[dict]:
        """Each pretraining validation loss at its training-loop seconds (saves and evals left out)."""
        import numpy as np

        clock = training_clock(self.metrics("ckpt_pretrain"), self.args.micro_batch_size * RECIPE_RANKS * self.args.seq_length)
        ev = self.metrics("ckpt_pretrain", "eval_loss")
        seconds = np.interp([r["step"] for r in ev], [0, *clock], [0.0, *clock.values()])
        return [{"step": r["step"], "train_seconds": round(float(t), 1), "valid_loss": r["eval_loss"]}
                for r, t in zip(ev, seconds)]

    def plot_losses(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        for ax, ckpt, title in zip(axes, ("ckpt_pretrain", "ckpt_sft"), ("pretraining", "SFT")):
            tr, ev = self.metrics(ckpt, "loss"), self.metrics(ckpt, "eval_loss")
            ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="valid loss")
            ax.set(title=f"{title} ({'MiniMoE' if self.args.moe else 'MiniLLM'})", xlabel="step", ylabel="loss")
            ax.grid(alpha=0.3)
            ax.legend()
        ttq = self.time_to_quality
        axes[2].plot([p["train_seconds"] for p in ttq], [p["valid_loss"] for p in ttq], "o-", color="C1")
        axes[2].set(title="pretraining: valid loss vs training seconds", xlabel="training-loop seconds", ylabel="loss")
        axes[2].grid(alpha=0.3)
        fig.tight_layout()
        self.png = self.work / "loss_curves.png"
        fig.savefig(self.png, dpi=110)

    def summary(self) -> None:
        pre, sft = self.metrics("ckpt_pretrain", "loss"), self.metrics("ckpt_sft", "loss")
        ev = self.metrics("ckpt_pretrain", "eval_loss")
        rows = [
            ("model", "MiniMoE tiny-moe (4 experts, top-2, ep 2)" if self.args.moe else "MiniLLM tiny"),
            ("pretrain loss (first -> last logged)", f"{pre[0]['loss']:.3f} -> {pre[-1]['loss']:.3f}"),
            ("pretrain valid loss (last)", f"{ev[-1]['eval_loss']:.3f}" if ev else "-"),
            ("held-out loss / ppl", f"{self.heldout['loss']:.3f} / {math.exp(self.heldout['loss']):.1f}"),
            ("held-out bits per byte", f"{self.heldout['bits_per_byte']:.3f}"),
            ("SFT loss (first -> last logged)", f"{sft[0]['loss']:.3f} -> {sft[-1]['loss']:.3f}"),
            ("SFT exact match (held-out arithmetic)",
             f"{self.exact_match['correct']}/{self.exact_match['total']}"),
            ("SFT exact match by operation", format_by_op(self.exact_match)),
            ("pretrain tokens/s (last logged)", f"{pre[-1].get('tokens_per_s', float('nan')):,.0f}"),
            ("HF export", str(self.work / "hf")),
            ("loss curves", str(self.png)),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n" + "=" * 72 + "\nSummary\n" + "=" * 72)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print("-" * 72)
        for name, secs in self.timings:
            print(f"{name:<{width}}  {secs:7.1f} s")
        print(f"{'total':<{width}}  {sum(s for _, s in self.timings):7.1f} s")
        (self.work / "summary.json").write_text(json.dumps({
            "rows": dict(rows), "timings_s": dict(self.timings), "heldout": self.heldout,
            "exact_match": self.exact_match, "samples": self.samples, "time_to_quality": self.time_to_quality},
            indent=2) + "\n")

    def report(self) -> None:
        from megatron_lite.eval.report import write_report

        w = self.work
        path = write_report(w, title=f"main job: {'MiniMoE tiny-moe' if self.args.moe else 'MiniLLM tiny'}",
                            command=[Path(sys.executable).name, *sys.argv],
                            stages={"pretrain": w / "ckpt_pretrain", "SFT": w / "ckpt_sft"},
                            model_ckpt=w / "ckpt_sft", hf_dir=w / "hf",
                            data={"pretraining text (train)": w / "corpus/pretrain_train.jsonl",
                                  "pretraining tokens": w / "data/pretrain_train_text_document",
                                  "held-out text": w / "corpus/pretrain_valid.jsonl",
                                  "SFT conversations": w / "corpus/sft_train.jsonl"},
                            harness=self.harness, png=self.png)
        print(f"report: {path}")


if __name__ == "__main__":
    with exit_on_user_error("main_job.py"):
        args = parse_args()
    Pipeline(args).main()
