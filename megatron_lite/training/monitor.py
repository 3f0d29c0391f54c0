"""What a run reports, from rank 0 only: a console line per log step above a progress bar,
`metrics.jsonl` (one JSON object per logged step, appended across resumes) and, optionally, wandb.

wandb runs offline unless an API key is configured, so a machine without network access still gets a
`wandb/offline-run-*` folder that `wandb sync` uploads later.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


def read_metrics(ckpt: str | Path, key: str | None = None) -> list[dict]:
    """Rows of CKPT/metrics.jsonl ([] when there is none), only those holding `key` if given (eval-only rows
    have no train loss)."""
    path = Path(ckpt) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if key is None or key in r]


def training_clock(rows: list[dict], tokens_per_step: int) -> dict[int, float]:
    """Cumulative training-loop seconds at every logged step of metrics rows: each row's tokens_per_s covers
    the steps since the previous row, so the time spent saving and evaluating is left out."""
    clock, seconds, prev = {}, 0.0, 0
    for r in rows:
        if r.get("tokens_per_s"):
            seconds += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
            clock[r["step"]] = seconds
            prev = r["step"]
    return clock

def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Monitor:
    def __init__(self, enabled: bool, metrics_path: str | None, total_iters: int, start_iter: int,
                 wandb_project: str | None = None, wandb_dir: str | None = None, run_config: dict | None = None,
                 wandb_name: str | None = None):
        self.enabled = enabled
        self.metrics_file = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        if metrics_path:
            Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(metrics_path, "a", buffering=1)  # line-buffered: a crash keeps every line
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, disable=None, leave=False)
        if wandb_project:
            import wandb

            if "WANDB_MODE" not in os.environ and not _wandb_has_key():
                os.environ["WANDB_MODE"] = "offline"
            wdir = wandb_dir or "."
            Path(wdir).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=wandb_project, dir=wdir, config=run_config or {}, name=wandb_name,
                                    resume="allow")

    def print(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, metrics: dict, eta_s: float | None = None) -> None:
        """One logged step: console line, metrics.jsonl and wandb (all on rank 0)."""
        if not self.enabled:
            return
        step = metrics["step"]
        parts = [f"step {step}"]
        for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("eval_ppl", ".2f"), ("reward_margin", ".4f"),
                         ("reward_accuracy", ".1%"), ("eval_reward_margin", ".4f"), ("lr", ".3e"), ("muon_lr", ".3e"),
                         ("grad_norm", ".3f"), ("aux_loss", ".4f"), ("tokens_per_s", ",.0f"), ("mfu", ".1%")):
            v = metrics.get(key)
            if v is not None:
                parts.append(f"{key} {v:{fmt}}")
        if eta_s is not None:
            parts.append(f"eta {_fmt_eta(eta_s)}")
        self.print(" | ".join(parts))
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in metrics.items() if k != "step" and not isinstance(v, (list, dict))}
            for k, v in metrics.items():  # expert load: one scalar series per (layer, expert)
                if k == "expert_load":
                    for li, row in enumerate(v):
                        for e, frac in enumerate(row):
                            flat[f"moe/layer{li}_expert{e}"] = frac
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
