"""report.md: one readable page per run, written beside its summary.json.

Sections: environment, model and data sizes, each training stage's losses and throughput, step timings,
held-out and lm-eval harness scores, sample chats, the loss-curve PNG. Every figure is read from the run's
own files (model_config.json, metrics.jsonl, .idx headers, harness JSON), so the page never disagrees with them.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

from megatron_lite.training.monitor import read_metrics


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def environment() -> list[tuple[str, str]]:
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform()), ("device", device)]
    rows += [(p, _version(p)) for p in ("torch", "deepspeed", "transformers", "lm_eval")]
    return rows


def stage_row(name: str, ckpt: Path) -> list[str]:
    """[stage, steps, train loss first -> last, last valid loss, last tokens/s] from CKPT/metrics.jsonl."""
    rows = read_metrics(ckpt)
    train, valid = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    loss = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}" if train else "-"
    tps = train[-1].get("tokens_per_s") if train else None
    return [name, str(train[-1]["step"]) if train else "-", loss,
            f"{valid[-1]['eval_loss']:.3f}" if valid else "-", f"{tps:,.0f}" if tps else "-"]


def model_rows(ckpt: Path) -> list[tuple[str, str]]:
    from megatron_lite.config import ModelConfig

    c = ModelConfig.load(str(ckpt))
    rows = [("name", c.name), ("layers / hidden / heads / kv heads", f"{c.num_layers} / {c.hidden_size} / "
                                                                    f"{c.num_heads} / {c.num_kv_heads}"),
            ("FFN", f"{c.ffn_type} {c.ffn_hidden_size}"), ("vocabulary", str(c.vocab_size)),
            ("context", str(c.max_seq_len))]
    if c.is_moe:
        rows.append(("experts", f"{c.num_experts}, top-{c.topk}"))
    return rows


def parameter_count(hf_dir: Path) -> int | None:
    """Parameters of the exported folder (tied embeddings stored once), read from safetensors headers."""
    from safetensors import safe_open

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def data_rows(paths: dict[str, Path]) -> list[list[str]]:
    """[name, documents, size] for JSONL files (lines, MB) and .bin/.idx prefixes (documents, tokens)."""
    from megatron_lite.data.indexed_dataset import IndexedDataset

    out = []
    for name, p in paths.items():
        p = Path(p)
        if p.suffix == ".jsonl" and p.is_file():
            with open(p, "rb") as f:
                lines = sum(1 for _ in f)
            out.append([name, f"{lines:,}", f"{p.stat().st_size / 1e6:.2f} MB"])
        elif Path(str(p) + ".idx").is_file():
            ds = IndexedDataset(str(p))
            out.append([name, f"{len(ds):,}", f"{ds.num_tokens:,} tokens"])
    return out


def harness_rows(results: dict) -> list[list[str]]:
    """[task, metric, value, stderr] from lm-eval's results JSON (metric keys are 'METRIC,FILTER')."""
    out = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{filt}")
            out.append([task, metric, f"{value:.4f}", f"{err:.4f}" if isinstance(err, (int, float)) else "-"])
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def render(*, title: str, command: list[str] | None, summary: dict, stages: dict[str, Path],
           model_ckpt: Path, hf_dir: Path | None, data: dict[str, Path], harness: dict | None,
           png: Path | None, base: Path) -> str:
    parts = [f"# {title}", ""]
    if command:
        parts += ["```", " ".join(str(c) for c in command), "```", ""]
    parts += ["## Environment", "", table(["", ""], [list(r) for r in environment()]), ""]
    model = [list(r) for r in model_rows(model_ckpt)]
    n = parameter_count(hf_dir) if hf_dir else None
    if n:
        model.append(["parameters", f"{n / 1e6:.2f} M"])
    parts += ["## Model", "", table(["", ""], model), ""]
    if data:
        parts += ["## Data", "", table(["data", "documents", "size"], data_rows(data)), ""]
    parts += ["## Training", "", table(["stage", "steps", "train loss (first -> last)", "valid loss (last)",
                                        "tokens/s (last)"], [stage_row(k, v) for k, v in stages.items()]), ""]
    timings = summary.get("timings_s", {})
    if timings:
        rows = [[k, f"{v:.1f}"] for k, v in timings.items()] + [["total", f"{sum(timings.values()):.1f}"]]
        parts += ["## Timings", "", table(["step", "seconds"], rows), ""]
    scores = [[k, v] for k, v in summary.get("rows", {}).items() if any(
        w in k for w in ("held-out", "exact match"))]
    if scores:
        parts += ["## Held-out scores", "", table(["", ""], scores), ""]
    if harness:
        parts += ["## lm-evaluation-harness", ""]
        if hf_dir:  # SFT moves a model away from raw text: its bits per byte differ from the pretrained ones above
            parts += [f"Scored by `lm_eval` on the HF export `{os.path.relpath(hf_dir, base)}`, the final model; "
                      "the held-out bits per byte above are the pretrained checkpoint's.", ""]
        parts += [table(["task", "metric", "value", "stderr"], harness_rows(harness)), ""]
    if summary.get("samples"):
        parts += ["## Sample chats", ""]
        for q, a in summary["samples"]:
            parts += [f"**user:** {q}", "", f"**assistant:** {a}", ""]
    if png and Path(png).is_file():
        parts += ["## Loss curves", "", f"![loss curves]({os.path.relpath(png, base)})", ""]
    return "\n".join(parts)


def write_report(work_dir: str | Path, **kw) -> Path:
    """Render (see `render`'s keywords; `summary` defaults to WORK/summary.json) to WORK/report.md atomically."""
    work = Path(work_dir)
    if "summary" not in kw:
        kw["summary"] = json.loads((work / "summary.json").read_text())
    text = render(base=work, **kw)
    out = work / "report.md"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
