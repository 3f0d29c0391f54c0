"""The training loop, top to bottom: batches -> forward -> backward -> step -> log / eval / save.

Data order. Iteration `it` consumes the global batch of samples [c, c + global_batch) where c is the number
of samples consumed before it. Micro-step m of data-parallel rank r reads
    c + (m * dp + r) * micro_batch  ...  + micro_batch
so the global batch is the same set of samples for any split into dp x grad_accum, and resuming only needs
c (samples are a pure function of their index). Tensor-parallel ranks of one dp rank read the same data.

The objective. By default a micro-batch's loss is the model's own LM loss (pretraining, SFT). `train` takes
another `objective(engine, micro_batch) -> output` (DPO: training/dpo.py): the output has the model output's
fields (loss, logits, aux_loss, expert_counts) and may add `metrics`, scalar tensors that are averaged over
the logged steps like the loss and written beside it (evaluation adds them as eval_NAME). Such an objective
names them up front in `metric_names`, so every rank reduces the same list even when one had nothing to
score.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.config import ModelConfig
from megatron_lite.data.sft_dataset import IGNORE_INDEX
from megatron_lite.errors import UserError
from megatron_lite.checkpoint.layout import latest_tag
from megatron_lite.checkpoint.save import save_training_checkpoint
from megatron_lite.training.engine import nonfinite_guard
from megatron_lite.training.rng import rng_state, seed_step


@dataclass
class TrainSettings:
    train_iters: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    dp_rank: int
    seq_length: int
    seed: int
    log_interval: int = 1
    eval_interval: int = 0
    eval_iters: int = 0
    save_interval: int = 0
    save_dir: str | None = None
    exit_interval: int = 0  # stop (after saving) once the step count is a multiple of this
    peak_flops: float | None = None  # per rank, for MFU
    max_bad_steps: int = 10  # stop after this many consecutive steps with non-finite loss/gradients (0: never)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size


@dataclass
class Progress:
    """Where the run stands after `iteration` optimizer steps: what a checkpoint holds to resume exactly."""
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradients, over the whole run
    bad_streak: int = 0  # of those, in a row up to now (not saved: a resumed run starts a new streak)

    def advance(self, global_batch: int, skipped: bool) -> None:
        self.iteration += 1
        self.consumed_samples += global_batch
        if skipped:
            self.skipped_steps += 1
            self.bad_streak += 1
        else:
            self.bad_streak = 0


@dataclass
class Faults:
    """Failures a test injects into a real run (tests/fault_launch.py builds one; production passes none)."""
    nan_at_steps: frozenset[int] = frozenset()  # rank 0's first micro-batch loss is NaN at these steps (1-based)
    before_commit: Callable[[Path], None] | None = None  # runs inside each save, shards written, before `latest`


class StopRequest:
    """SIGTERM / SIGINT during training: finish the current step, save, return normally (exit 0).

    That is what a cluster scheduler's pre-emption expects (SIGTERM, then SIGKILL after a grace period).
    The handler only sets a flag; the loop acts on it between steps, where the state is consistent, and
    all-reduces it so every rank stops at the same step even when only one got the signal (the save is
    collective). A second SIGINT interrupts at once (Ctrl-C twice).
    """

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, dev: torch.device) -> bool:
        """Collective: True on every rank once any rank got a signal."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None  # one rank: no device tensor, no host sync per step
        flag = torch.tensor(float(self.signum is not None), device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


@dataclass
class MicroBatch:
    """One rank's micro-batch on the device, and what the host already knows about it."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    extra: dict  # more model inputs the dataset gives: packed SFT's position_ids and document_ids
    has_targets: bool  # False when every label is IGNORE_INDEX (an SFT batch whose replies were all truncated away)
    num_tokens: int  # non-padding tokens (every token unless the items say how many they hold)

    def forward(self, engine):
        return engine(self.input_ids, self.labels, **self.extra)


MODEL_INPUTS = ("position_ids", "document_ids")  # optional item fields passed on to GPT.forward


def micro_batch(dataset, s: TrainSettings, first_sample: int, micro_step: int, dev: torch.device) -> MicroBatch:
    """This rank's micro-batch; has_targets and num_tokens are read on the host before the copy."""
    start = first_sample + (micro_step * s.dp_size + s.dp_rank) * s.micro_batch_size
    items = [dataset[i] for i in range(start, start + s.micro_batch_size)]
    input_ids = torch.stack([x["input_ids"] for x in items])
    labels = torch.stack([x["labels"] for x in items])
    has_targets = bool((labels != IGNORE_INDEX).any())
    num_tokens = (sum(int(x["num_tokens"]) for x in items) if "num_tokens" in items[0] else input_ids.numel())
    extra = {k: torch.stack([x[k] for x in items]).to(dev, non_blocking=True) for k in MODEL_INPUTS if k in items[0]}
    return MicroBatch(input_ids.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), extra, has_targets,
                      num_tokens)


def lm_objective(engine, mb: MicroBatch):
    """The model's own next-token loss on the micro-batch's labels."""
    return mb.forward(engine)


def flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x active weights touched by matmuls + causal-free attention scores
    (PaLM appendix B, as Megatron/nanoGPT count it)."""
    n = config.num_params(active_only=True)
    if not config.tie_embeddings:
        n -= config.vocab_size * config.hidden_size  # the input embedding is a lookup, not a matmul
    return 6 * n + 12 * config.num_layers * config.hidden_size * seq_length


def _dp_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _dp_mean(t: torch.Tensor, group) -> torch.Tensor:
    """Mean over the data-parallel group; None means dp == 1 (not the world: tp ranks hold the same value)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t


def _to_float(x):
    if x is None:
        return None
    x = float(x.item()) if torch.is_tensor(x) else float(x)
    return x if math.isfinite(x) else None  # a skipped step's norm is NaN/inf: JSON has no such numbers


@torch.no_grad()
def eval_metrics(engine, dataset, s: TrainSettings, group, objective=lm_objective) -> dict:
    """Mean loss (and the objective's metrics) over the first eval_iters global batches of `dataset` (the
    same samples every time, so successive evals are comparable)."""
    engine.eval()
    dev = engine.device
    sums = {k: torch.zeros((), device=dev) for k in ("loss", *getattr(objective, "metric_names", ()))}
    n = 0
    per_rank_steps = s.eval_iters * s.grad_accum
    for m in range(per_rank_steps):
        if (m * s.dp_size + s.dp_rank + 1) * s.micro_batch_size > len(dataset):
            break
        mb = micro_batch(dataset, s, 0, m, dev)
        if mb.has_targets:
            out = objective(engine, mb)
            for k, v in {"loss": out.loss, **(getattr(out, "metrics", None) or {})}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n += 1
    engine.train()
    names = list(sums)
    means = _dp_mean(torch.stack([sums[k] for k in names]) / max(n, 1), group).tolist()
    return dict(zip(names, means))


def evaluate(engine, dataset, s: TrainSettings, group) -> tuple[float, float]:
    """Mean LM loss and perplexity over the first eval_iters global batches of `dataset`."""
    loss = eval_metrics(engine, dataset, s, group)["loss"]
    return loss, math.exp(min(loss, 50.0))


class LogInterval:
    """What the steps since the last log line add up to, and the clock behind tokens/s and the ETA.

    The sums stay on the device: nothing syncs with the host until `row()` builds the log step's metrics
    (and starts the next interval)."""

    def __init__(self, s: TrainSettings, config: ModelConfig, dev: torch.device, dp_group, metric_names=()):
        self.s, self.config, self.dev, self.dp_group = s, config, dev, dp_group
        self.metric_names = tuple(metric_names)  # the objective's own metrics, summed like the loss
        self.flops_per_token = flops_per_token(config, s.seq_length)
        self.run_started = self.started = time.perf_counter()  # `started` moves forward past eval and save time
        self.steps_timed = 0
        self._zero()

    def _zero(self) -> None:
        self.steps = 0
        self.n_loss = 0  # micro-batches with targets
        self.loss_sum = torch.zeros((), device=self.dev)
        self.bad_sum = torch.zeros((), device=self.dev)  # of those, with a non-finite loss
        self.aux_sum = torch.zeros((), device=self.dev)
        self.counts_sum = None  # (layers, experts) tokens routed
        self.metric_sums = {k: torch.zeros((), device=self.dev) for k in self.metric_names}
        self.num_tokens = 0  # non-padding tokens this rank trained on (a host count: no sync)

    def add_micro_batch(self, out, lm_loss: torch.Tensor, bad: torch.Tensor, has_targets: bool,
                        num_tokens: int) -> None:
        self.num_tokens += num_tokens
        if has_targets:
            self.loss_sum += torch.where(bad > 0, 0.0, lm_loss.detach().float())  # keep NaN out of the mean
            self.bad_sum += bad
            self.n_loss += 1
            for k, v in (getattr(out, "metrics", None) or {}).items():
                self.metric_sums[k] += torch.where(bad > 0, 0.0, v.detach().float())
        if out.aux_loss is not None:
            self.aux_sum += out.aux_loss.detach().float()
            c = out.expert_counts.detach().float()
            self.counts_sum = c if self.counts_sum is None else self.counts_sum + c

    @contextmanager
    def paused(self):
        """Time spent inside (eval, save) is not training throughput."""
        t0 = time.perf_counter()
        yield
        self.started += time.perf_counter() - t0

    def row(self, p: Progress, lrs: dict, grad_norm) -> tuple[dict, float]:
        """(metrics row of this log step, ETA in seconds); the next interval starts empty. `lrs`: `step_lrs`."""
        s, dev, group = self.s, self.dev, self.dp_group
        # Token-free micro-batches count on no rank: sum losses and counts over dp, then divide. The same
        # reduction sums the ranks' real (non-padding) tokens, which is what tokens/s and MFU count.
        names = self.metric_names
        stats = _dp_sum(torch.stack([self.loss_sum, torch.tensor(float(self.n_loss), device=dev) - self.bad_sum,
                                     torch.tensor(float(self.num_tokens), device=dev),
                                     *(self.metric_sums[k] for k in names)]), group)
        # None when every micro-batch since the last log had a non-finite loss.
        loss = (stats[0] / stats[1]).item() if stats[1] > 0 else None
        now = time.perf_counter()
        tok_s = stats[2].item() / (now - self.started)
        self.steps_timed += self.steps
        metrics = {"step": p.iteration, "loss": loss, **lrs, "grad_norm": _to_float(grad_norm),
                   "tokens_per_s": tok_s, "consumed_samples": p.consumed_samples, "skipped_steps": p.skipped_steps}
        for j, k in enumerate(names):
            metrics[k] = (stats[3 + j] / stats[1]).item() if stats[1] > 0 else None
        if s.peak_flops:
            world = dist.get_world_size() if dist.is_initialized() else 1
            metrics["mfu"] = tok_s * self.flops_per_token / (s.peak_flops * world)
        if self.config.is_moe:
            metrics["aux_loss"] = _dp_mean(self.aux_sum / (self.steps * s.grad_accum), group).item()
            counts = _dp_mean(self.counts_sum, group)
            metrics["expert_load"] = (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()
        eta = (now - self.run_started) / self.steps_timed * (s.train_iters - p.iteration)
        self._zero()
        self.started = time.perf_counter()
        return metrics, eta


def step_lrs(engine) -> dict:
    """The learning rates the next update uses (the scheduler advances inside step()): `lr`, AdamW's (with Muon,
    its AdamW side's, as --lr sets it), and with Muon `muon_lr` too."""
    groups = engine.optimizer.param_groups
    adam = next((g for g in groups if not g.get("use_muon")), groups[0])
    muon = next((g for g in groups if g.get("use_muon")), None)
    return {"lr": adam["lr"], **({"muon_lr": muon["lr"]} if muon is not None else {})}


def train_step(engine, dataset, s: TrainSettings, p: Progress, interval: LogInterval,
               nan_at_steps: frozenset[int], objective=lm_objective) -> tuple[dict, bool]:
    """Optimizer step p.iteration + 1: grad_accum micro-batches forward and backward, then the update.
    Returns the learning rates the update used (`step_lrs`) and whether it was skipped (non-finite loss or
    gradients)."""
    seed_step(s.seed, s.dp_rank, p.iteration)
    lrs = step_lrs(engine)
    ds_skipped_before = engine.skipped_steps
    guard = nonfinite_guard(engine)
    if guard is not None:
        guard.bad_loss, guard.last_skipped = None, False
    for m in range(s.grad_accum):
        mb = micro_batch(dataset, s, p.consumed_samples, m, engine.device)
        has_targets = mb.has_targets
        out = objective(engine, mb)
        # No targets: CE is 0/0 = NaN. Back-propagate an exact zero instead (every rank must still run
        # backward for ZeRO's gradient reduction) and leave the batch out of the logged loss.
        lm_loss = out.loss if has_targets else out.logits.sum() * 0.0
        if p.iteration + 1 in nan_at_steps and s.dp_rank == 0 and m == 0:
            lm_loss = lm_loss * float("nan")
        loss = lm_loss if out.aux_loss is None else lm_loss + out.aux_loss
        engine.backward(loss)
        bad = (~torch.isfinite(loss.detach())).float()  # on the device: no host sync per micro-step
        if guard is not None:  # read by the optimizer at the accumulation boundary, inside engine.step()
            guard.bad_loss = bad if guard.bad_loss is None else guard.bad_loss + bad
        engine.step()
        interval.add_micro_batch(out, lm_loss, bad, has_targets, mb.num_tokens)
    interval.steps += 1
    # Both verdicts are already agreed over ranks (all-reduced), so every rank takes the same branch.
    skipped = engine.skipped_steps > ds_skipped_before or (guard is not None and guard.last_skipped)
    return lrs, skipped


def is_log_step(it: int, s: TrainSettings) -> bool:
    return it % s.log_interval == 0 or it == s.train_iters


def maybe_eval(engine, valid_ds, s: TrainSettings, dp_group, it: int, metrics: dict | None,
               interval: LogInterval, objective=lm_objective) -> dict | None:
    """On eval steps (and the last step): this step's row with eval_loss and eval_ppl (LM loss) or the
    objective's eval_NAME metrics added."""
    if not (s.eval_interval and valid_ds is not None and s.eval_iters
            and (it % s.eval_interval == 0 or it == s.train_iters)):
        return metrics
    with interval.paused():
        ev = eval_metrics(engine, valid_ds, s, dp_group, objective)
    row = {**(metrics or {"step": it}), **{f"eval_{k}": v for k, v in ev.items()}}
    if objective is lm_objective:
        row["eval_ppl"] = math.exp(min(ev["loss"], 50.0))
    return row


def check_bad_streak(p: Progress, s: TrainSettings) -> None:
    """Stop with a UserError after max_bad_steps skipped updates in a row (the last checkpoint stays as it was)."""
    if not (s.max_bad_steps and p.bad_streak >= s.max_bad_steps):
        return
    tag = latest_tag(Path(s.save_dir)) if s.save_dir else None
    kept = f"the last checkpoint is {s.save_dir}/{tag}" if tag else "no checkpoint was saved"
    raise UserError(f"stopped at step {p.iteration}: {p.bad_streak} consecutive steps had a non-finite loss or "
                    f"gradients (--max-bad-steps {s.max_bad_steps}); {kept}; lower --lr or check the "
                    f"data, then resume with --load")


def is_save_step(it: int, s: TrainSettings) -> bool:
    return bool(s.save_dir and (s.save_interval and it % s.save_interval == 0 or it == s.train_iters))


def should_stop(it: int, s: TrainSettings, stop: StopRequest | None, dev: torch.device) -> str | None:
    """Why the run ends after step `it`, short of train_iters (a signal, --exit-interval), or None.
    Collective when `stop` is given: every rank calls it after every step."""
    if it >= s.train_iters:
        return None
    if stop is not None and stop.requested(dev):
        name = signal.Signals(stop.signum).name if stop.signum else "a stop signal (on another rank)"
        return (f"received {name}: stopping at step {it}"
                + (f"; resume with --load {s.save_dir}" if s.save_dir else " (no --save: nothing saved)"))
    if s.exit_interval and it % s.exit_interval == 0:
        return f"exiting at step {it} (--exit-interval {s.exit_interval})"
    return None


def train(engine, config: ModelConfig, train_ds, valid_ds, s: TrainSettings, monitor, dp_group,
          progress: Progress | None = None, stop: StopRequest | None = None, faults: Faults | None = None,
          objective=lm_objective) -> dict:
    """Run iterations progress.iteration+1 .. train_iters with `objective` (see the module docstring).
    Returns the last logged metrics.

    Non-finite loss or gradients: the update is skipped on every rank (see engine.NonFiniteSkippingAdamW;
    DeepSpeed's own overflow check may skip it first), counted in `skipped_steps`, and after
    `max_bad_steps` consecutive ones the run stops with a UserError, leaving the last checkpoint as it was."""
    p = progress or Progress()
    faults = faults or Faults()
    interval = LogInterval(s, config, engine.device, dp_group, getattr(objective, "metric_names", ()))
    last = {}

    def save() -> None:  # collective
        state = {"iteration": p.iteration, "consumed_samples": p.consumed_samples, "rng": rng_state(),
                 "model_config": config.to_dict(), "global_batch_size": s.global_batch, "seed": s.seed,
                 "skipped_steps": p.skipped_steps}
        tag = save_training_checkpoint(engine, s.save_dir, p.iteration, state, before_commit=faults.before_commit)
        monitor.print(f"saved checkpoint {s.save_dir}/{tag}")

    while p.iteration < s.train_iters:
        lrs, skipped = train_step(engine, train_ds, s, p, interval, faults.nan_at_steps, objective)
        p.advance(s.global_batch, skipped)
        monitor.advance()
        if skipped:
            monitor.print(f"step {p.iteration}: non-finite loss or gradients, update skipped "
                          f"({p.bad_streak} in a row, {p.skipped_steps} in total)")

        metrics, eta = (interval.row(p, lrs, engine.get_global_grad_norm()) if is_log_step(p.iteration, s)
                        else (None, None))
        metrics = maybe_eval(engine, valid_ds, s, dp_group, p.iteration, metrics, interval, objective)
        if metrics is not None:
            monitor.log(metrics, eta_s=eta)
            last = metrics
        check_bad_streak(p, s)

        saved = is_save_step(p.iteration, s)
        if saved:
            with interval.paused():
                save()
        reason = should_stop(p.iteration, s, stop, engine.device)
        if reason:
            if s.save_dir and not saved:
                save()
            monitor.print(reason)
            break
    return last
