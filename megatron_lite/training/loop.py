"""The training loop, top to bottom: batches -> forward -> backward -> step -> log / eval / save.

Data order. Iteration `it` consumes the global batch of samples [c, c + global_batch) where c is the number
of samples consumed before it. Micro-step m of data-parallel rank r reads
    c + (m * dp + r) * micro_batch  ...  + micro_batch
so the global batch is the same set of samples for any split into dp x grad_accum, and resuming only needs
c (samples are a pure function of their index). Tensor-parallel ranks of one dp rank read the same data.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.save import save_training_checkpoint
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
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


def _inject_nan_steps() -> set[int]:
    """Test-only: MEGATRON_LITE_INJECT_NAN_AT="3,5" makes rank 0's loss NaN at those steps (1-based)."""
    return {int(x) for x in os.environ.get("MEGATRON_LITE_INJECT_NAN_AT", "").split(",") if x.strip()}


def micro_batch(dataset, s: TrainSettings, first_sample: int, micro_step: int, dev: torch.device):
    """(input_ids, labels, has_targets) of this rank's micro-batch; has_targets is False when every label is
    -100 (an SFT batch whose replies were all truncated away), checked on the host before the copy."""
    start = first_sample + (micro_step * s.dp_size + s.dp_rank) * s.micro_batch_size
    items = [dataset[i] for i in range(start, start + s.micro_batch_size)]
    input_ids = torch.stack([x["input_ids"] for x in items])
    labels = torch.stack([x["labels"] for x in items])
    has_targets = bool((labels != -100).any())
    return input_ids.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), has_targets


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


@torch.no_grad()
def evaluate(engine, dataset, s: TrainSettings, group) -> tuple[float, float]:
    """Mean LM loss and perplexity over the first eval_iters global batches of `dataset` (the same
    samples every time, so successive evals are comparable)."""
    engine.eval()
    dev = engine.device
    total = torch.zeros((), device=dev)
    n = 0
    per_rank_steps = s.eval_iters * s.grad_accum
    for m in range(per_rank_steps):
        if (m * s.dp_size + s.dp_rank + 1) * s.micro_batch_size > len(dataset):
            break
        input_ids, labels, has_targets = micro_batch(dataset, s, 0, m, dev)
        if has_targets:
            total += engine(input_ids, labels).loss.float()
            n += 1
    engine.train()
    loss = _dp_mean(total / max(n, 1), group).item()
    return loss, math.exp(min(loss, 50.0))


def train(engine, config: ModelConfig, train_ds, valid_ds, s: TrainSettings, monitor, dp_group,
          start_iter: int = 0, consumed_samples: int = 0, client_extra: dict | None = None,
          stop: StopRequest | None = None, skipped_steps: int = 0) -> dict:
    """Run iterations start_iter+1 .. train_iters. Returns the last logged metrics.

    Non-finite loss or gradients: the update is skipped on every rank (see engine.NonFiniteSkippingAdamW;
    DeepSpeed's own overflow check may skip it first), counted in `skipped_steps`, and after
    `max_bad_steps` consecutive ones the run stops with a UserError, leaving the last checkpoint as it was."""
    dev = engine.device
    tokens_per_iter = s.global_batch * s.seq_length
    fpt = flops_per_token(config, s.seq_length)
    world = dist.get_world_size() if dist.is_initialized() else 1

    # Running sums since the last log step stay on the device: no host sync until we print.
    loss_sum = torch.zeros((), device=dev)
    bad_sum = torch.zeros((), device=dev)  # micro-batches with a non-finite loss since the last log
    aux_sum = torch.zeros((), device=dev)
    counts_sum = None
    iters_since_log = n_loss = 0  # n_loss: micro-batches with targets since the last log
    last = {}
    t_log = time.perf_counter()
    t_start, iters_timed = t_log, 0
    guard = nonfinite_guard(engine)
    nan_at = _inject_nan_steps()
    bad_streak = 0

    def save(iteration: int):
        state = {"iteration": iteration, "consumed_samples": consumed_samples, "rng": rng_state(),
                 "model_config": config.to_dict(), "global_batch_size": s.global_batch, "seed": s.seed,
                 "skipped_steps": skipped_steps, **(client_extra or {})}
        hold = os.environ.get("MEGATRON_LITE_TEST_SLOW_SAVE", "")  # test-only "STEP:SECONDS": pause before the commit
        tag = save_training_checkpoint(engine, s.save_dir, iteration, state, before_commit=(
            lambda _: time.sleep(float(hold.split(":")[1]))) if hold.startswith(f"{iteration}:") else None)
        monitor.print(f"saved checkpoint {s.save_dir}/{tag}")

    it = start_iter
    while it < s.train_iters:
        seed_step(s.seed, s.dp_rank, it)
        lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler advances inside step())
        ds_skipped_before = engine.skipped_steps
        if guard is not None:
            guard.bad_loss, guard.last_skipped = None, False
        for m in range(s.grad_accum):
            input_ids, labels, has_targets = micro_batch(train_ds, s, consumed_samples, m, dev)
            out = engine(input_ids, labels)
            # No targets: CE is 0/0 = NaN. Back-propagate an exact zero instead (every rank must still run
            # backward for ZeRO's gradient reduction) and leave the batch out of the logged loss.
            lm_loss = out.loss if has_targets else out.logits.sum() * 0.0
            if it + 1 in nan_at and s.dp_rank == 0 and m == 0:
                lm_loss = lm_loss * float("nan")  # test-only injection (MEGATRON_LITE_INJECT_NAN_AT)
            loss = lm_loss if out.aux_loss is None else lm_loss + out.aux_loss
            engine.backward(loss)
            bad = (~torch.isfinite(loss.detach())).float()  # on the device: no host sync per micro-step
            if guard is not None:  # read by the optimizer at the accumulation boundary, inside engine.step()
                guard.bad_loss = bad if guard.bad_loss is None else guard.bad_loss + bad
            engine.step()
            if has_targets:
                loss_sum += torch.where(bad > 0, 0.0, lm_loss.detach().float())  # keep NaN out of the mean
                bad_sum += bad
                n_loss += 1
            if out.aux_loss is not None:
                aux_sum += out.aux_loss.detach().float()
                c = out.expert_counts.detach().float()
                counts_sum = c if counts_sum is None else counts_sum + c
        it += 1
        consumed_samples += s.global_batch
        iters_since_log += 1
        monitor.advance()
        # Both verdicts are already agreed over ranks (all-reduced), so every rank takes the same branch.
        if engine.skipped_steps > ds_skipped_before or (guard is not None and guard.last_skipped):
            skipped_steps += 1
            bad_streak += 1
            monitor.print(f"step {it}: non-finite loss or gradients, update skipped "
                          f"({bad_streak} in a row, {skipped_steps} in total)")
        else:
            bad_streak = 0

        metrics = None
        if it % s.log_interval == 0 or it == s.train_iters:
            n = iters_since_log * s.grad_accum
            # Token-free micro-batches count on no rank: sum losses and counts over dp, then divide.
            stats = _dp_sum(torch.stack([loss_sum, torch.tensor(float(n_loss), device=dev) - bad_sum]), dp_group)
            # None when every micro-batch since the last log had a non-finite loss.
            loss_v = (stats[0] / stats[1]).item() if stats[1] > 0 else None
            now = time.perf_counter()
            tok_s = tokens_per_iter * iters_since_log / (now - t_log)
            iters_timed += iters_since_log
            metrics = {"step": it, "loss": loss_v, "lr": lr,
                       "grad_norm": _to_float(engine.get_global_grad_norm()),
                       "tokens_per_s": tok_s, "consumed_samples": consumed_samples,
                       "skipped_steps": skipped_steps}
            if s.peak_flops:
                metrics["mfu"] = tok_s * fpt / (s.peak_flops * world)
            if config.is_moe:
                metrics["aux_loss"] = _dp_mean(aux_sum / n, dp_group).item()
                counts = _dp_mean(counts_sum, dp_group)  # (layers, experts) tokens routed
                metrics["expert_load"] = (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()
                aux_sum.zero_()
                counts_sum = None
            loss_sum.zero_()
            bad_sum.zero_()
            iters_since_log = n_loss = 0
            eta = (now - t_start) / iters_timed * (s.train_iters - it)
            t_log = time.perf_counter()
        if s.eval_interval and valid_ds is not None and s.eval_iters and \
                (it % s.eval_interval == 0 or it == s.train_iters):
            t0 = time.perf_counter()
            eval_loss, ppl = evaluate(engine, valid_ds, s, dp_group)
            metrics = metrics or {"step": it}
            metrics.update(eval_loss=eval_loss, eval_ppl=ppl)
            t_log += time.perf_counter() - t0  # eval time is not training throughput
        if metrics is not None:
            monitor.log(metrics, eta_s=eta if "loss" in metrics else None)
            last = metrics
        if s.max_bad_steps and bad_streak >= s.max_bad_steps:
            latest = os.path.join(s.save_dir, "latest") if s.save_dir else None
            kept = (f"the last checkpoint is {s.save_dir}/{open(latest).read().strip()}"
                    if latest and os.path.exists(latest) else "no checkpoint was saved")
            raise UserError(f"stopped at step {it}: {bad_streak} consecutive steps had a non-finite loss or "
                            f"gradients (--max-bad-steps {s.max_bad_steps}); {kept}; lower --lr or check the "
                            f"data, then resume with --load")
        saved = False
        if s.save_dir and (s.save_interval and it % s.save_interval == 0 or it == s.train_iters):
            t0 = time.perf_counter()
            save(it)
            saved = True
            t_log += time.perf_counter() - t0
        if stop is not None and it < s.train_iters and stop.requested(dev):
            if s.save_dir and not saved:
                save(it)
            name = signal.Signals(stop.signum).name if stop.signum else "a stop signal (on another rank)"
            monitor.print(f"received {name}: stopping at step {it}"
                          + (f"; resume with --load {s.save_dir}" if s.save_dir else " (no --save: nothing saved)"))
            break
        if s.exit_interval and it % s.exit_interval == 0 and it < s.train_iters:
            if s.save_dir and not (s.save_interval and it % s.save_interval == 0):
                save(it)
            monitor.print(f"exiting at step {it} (--exit-interval {s.exit_interval})")
            break
    return last


def _to_float(x):
    if x is None:
        return None
    x = float(x.item()) if torch.is_tensor(x) else float(x)
    return x if math.isfinite(x) else None  # a skipped step's norm is NaN/inf: JSON has no such numbers
