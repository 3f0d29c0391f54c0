"""Reliability (issue 8), with real processes: SIGKILL during training and during a save, SIGTERM/SIGINT,
NaN/inf steps, one-line errors for bad input, safe loading of tampered checkpoints, a server soak.

    pytest -m reliability

One uninterrupted 2-rank reference run and one checkpoint folder that goes through a chain of interruptions
(SIGKILL mid-training -> resume -> SIGKILL mid-save -> resume -> SIGTERM -> resume to the end) are shared by
several tests; every loss logged along the chain must equal the reference run's loss at that step exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from launch_utils import REPO, command, env, losses, metrics, pretrain_args, run

pytestmark = pytest.mark.reliability

T, SAVE = 60, 5  # chain: steps and save interval (2 ranks x micro 2)


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def start(args, log: Path, script: str = "launch/pretrain.py") -> subprocess.Popen:
    """A 2-rank run in its own session (process group), so the whole tree can be signalled at once."""
    return subprocess.Popen(command(script, args, ranks=2), cwd=REPO, env=env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, proc: subprocess.Popen, log: Path, what: str, limit_s: float = 300):
    """Poll `cond` until true; fail (not hang) if the run ends first or never gets there."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"never saw {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def rank_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = c.cmdline()
        except psutil.Error:  # a short-lived helper process that just exited
            continue
        if any(a.startswith("--local_rank=") for a in cmd) and any("pretrain.py" in a for a in cmd):
            out.append(c)
    return out


def wait_ranks(proc) -> list[psutil.Process]:
    for _ in range(3000):
        ranks = rank_processes(proc)
        if len(ranks) == 2:
            return ranks
        time.sleep(0.02)
    raise AssertionError("rank processes did not start")


def sigkill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher's whole process group; returns every pid of the tree that was alive."""
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return tree


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def latest_step(ckpt: Path) -> int:
    return int((ckpt / "latest").read_text().removeprefix("global_step"))


def steps_logged(ckpt: Path, since: int = 0) -> list[int]:
    return [m["step"] for m in metrics(ckpt)[since:] if "loss" in m]


def one_line_error(p: subprocess.CompletedProcess, *needles: str):
    """Non-zero exit, stderr exactly one `prog: error: ...` line naming what is wrong, no traceback."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert len(lines) == 1 and ": error: " in lines[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ kill / resume chain

@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted 2-rank run every interrupted one is compared with."""
    ref = tmp_path_factory.mktemp("ref") / "ckpt"
    run("launch/pretrain.py", pretrain_args(data, ref, T, "--micro-batch-size", 2, "--save-interval", SAVE), ranks=2)
    return ref


@pytest.fixture(scope="module")
def chain(data, reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    ck = root / "ckpt"
    args = lambda *extra: pretrain_args(data, ck, T, "--micro-batch-size", 2, "--save-interval", SAVE, *extra)  # noqa: E731
    out = {"ref": reference, "ckpt": ck}

    # 1. SIGKILL (launcher, launch.py and both ranks at once) during training, after a checkpoint exists.
    log = root / "kill1.log"
    p = start(args(), log)
    wait_for(lambda: max(steps_logged(ck), default=0) >= SAVE + 2, p, log, f"step {SAVE + 2}")
    out["kill1_pids"] = sigkill_tree(p)
    out["kill1_last_step"] = max(steps_logged(ck))
    out["kill1_latest"] = latest_step(ck)

    # 2. Resume, then SIGKILL in the middle of the save at step S: every rank's shards are in tmp-global_stepS
    #    (tests/fault_launch.py's before_commit hook holds the ranks there), `latest` still names the previous
    #    checkpoint.
    s = out["kill1_latest"] + 2 * SAVE
    out["S"] = s
    log = root / "kill2.log"
    p = start(["--fault-hold-save", f"{s}:300", *args("--load", ck)], log, script="tests/fault_launch.py")
    tmp = ck / f"tmp-global_step{s}"
    wait_for(lambda: len(list(tmp.glob("*_optim_states.pt"))) == 2, p, log, f"{tmp.name} written")
    out["kill2_pids"] = sigkill_tree(p)
    out["kill2_latest"] = latest_step(ck)
    out["kill2_tmp_left"] = tmp.is_dir()

    # 3. Resume (from S - SAVE), then SIGTERM rank 0 only, as a scheduler's pre-emption would: both ranks
    #    stop at the same step, save it, and the launcher exits 0.
    log = root / "term.log"
    n0 = len(metrics(ck))
    p = start(args("--load", ck), log)
    ranks = wait_ranks(p)
    wait_for(lambda: max(steps_logged(ck, n0), default=0) >= s + 2, p, log, f"step {s + 2}")
    rank0 = next(r for r in ranks if "--local_rank=0" in r.cmdline())
    rank0.send_signal(signal.SIGTERM)
    out["term_rc"] = p.wait(timeout=300)
    out["term_log"] = log.read_text()
    out["term_last_step"] = max(steps_logged(ck, n0))
    out["term_latest"] = latest_step(ck)
    out["term_pids"] = [r.pid for r in ranks]

    # 4. Resume to the end.
    out["final"] = run("launch/pretrain.py", args("--load", ck), ranks=2)
    return out


@pytest.mark.multirank
def test_sigkill_during_training_resumes_from_last_complete_checkpoint(chain):
    assert alive(chain["kill1_pids"]) == []  # launcher, launch.py and both ranks are gone: no orphan
    latest = chain["kill1_latest"]
    assert latest % SAVE == 0 and SAVE <= latest <= chain["kill1_last_step"] < T
    # The resumed run started exactly there: its first logged step is latest + 1.
    m = metrics(chain["ckpt"])
    first_resumed = next(i for i, x in enumerate(m) if i > 0 and x["step"] <= m[i - 1]["step"])
    assert m[first_resumed]["step"] == latest + 1


@pytest.mark.multirank
def test_sigkill_during_save_never_reads_the_partial_checkpoint(chain):
    s = chain["S"]
    assert alive(chain["kill2_pids"]) == []
    assert chain["kill2_tmp_left"]  # killed with the temporary folder on disk ...
    assert chain["kill2_latest"] == s - SAVE  # ... and `latest` still naming the previous complete one
    assert f"resumed from {chain['ckpt']} at step {s - SAVE}" in chain["term_log"]
    ck = chain["ckpt"]
    assert not list(ck.glob("tmp-*")) and not list(ck.glob("trash-*"))  # the next save of step S cleaned up


@pytest.mark.multirank
def test_sigterm_saves_current_step_and_exits_zero(chain):
    assert chain["term_rc"] == 0, chain["term_log"][-3000:]
    step = chain["term_last_step"]
    assert chain["S"] + 2 <= step < T
    assert chain["term_latest"] == step  # saved at the step it stopped at, not the last interval
    assert f"received SIGTERM: stopping at step {step}" in chain["term_log"]
    assert "Traceback" not in chain["term_log"]
    assert alive(chain["term_pids"]) == []
    assert f"resumed from {chain['ckpt']} at step {step}" in chain["final"].stdout


@pytest.mark.multirank
def test_losses_along_the_interrupted_chain_equal_the_uninterrupted_run(chain):
    ref, ck = losses(chain["ref"]), chain["ckpt"]
    rows = [(m["step"], m["loss"]) for m in metrics(ck) if "loss" in m]
    assert {s for s, _ in rows} == set(range(1, T + 1)) == set(ref)
    assert len(rows) > T  # steps after each kill were trained twice
    mismatched = [(s, loss, ref[s]) for s, loss in rows if loss != ref[s]]
    assert not mismatched, mismatched
    assert latest_step(ck) == T
    client = torch.load(ck / f"global_step{T}" / "mp_rank_00_model_states.pt", weights_only=True)
    assert client["consumed_samples"] == T * 4 and client["skipped_steps"] == 0


@pytest.mark.multirank
def test_requeue_same_command_line_survives_sigkill(data, reference, tmp_path):
    """`--save X --load X` on every start, as a requeued job reruns it: the first start (no checkpoint yet)
    trains from scratch, a `kill -9` of the whole launcher group after a checkpoint, then the very same command
    line resumes and ends with exactly the losses of the uninterrupted run."""
    ck, log = tmp_path / "ckpt", tmp_path / "first.log"
    args = pretrain_args(data, ck, T, "--micro-batch-size", 2, "--save-interval", SAVE, "--load", ck)
    p = start(args, log)
    wait_for(lambda: max(steps_logged(ck), default=0) >= SAVE + 2, p, log, f"step {SAVE + 2}")
    sigkill_tree(p)
    latest, n_first = latest_step(ck), len(metrics(ck))
    assert SAVE <= latest < T
    fresh = f"--load {ck}: no checkpoint there yet (it is the --save folder): starting from scratch"
    assert log.read_text().count(fresh) == 1  # rank 0 only

    second = run("launch/pretrain.py", args, ranks=2)
    assert f"resumed from {ck} at step {latest} " in second.stdout and fresh not in second.stdout
    ref = losses(reference)
    resumed = [(m["step"], m["loss"]) for m in metrics(ck)[n_first:] if "loss" in m]
    assert [s for s, _ in resumed] == list(range(latest + 1, T + 1))
    assert [loss for _, loss in resumed] == [ref[s] for s, _ in resumed]
    first = [(m["step"], m["loss"]) for m in metrics(ck)[:n_first] if "loss" in m]
    assert first and [loss for _, loss in first] == [ref[s] for s, _ in first]
    assert latest_step(ck) == T


def test_sigint_saves_and_exits_zero(data, tmp_path):
    """Ctrl-C on a one-process run: finish the step, save it, exit 0."""
    ck, log = tmp_path / "ckpt", tmp_path / "log"
    p = subprocess.Popen(command("launch/pretrain.py", pretrain_args(data, ck, 2000, "--micro-batch-size", 2)),
                         cwd=REPO, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for(lambda: max(steps_logged(ck), default=0) >= 3, p, log, "step 3")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    step = max(steps_logged(ck))
    assert 3 <= step < 2000 and latest_step(ck) == step
    assert f"received SIGINT: stopping at step {step}" in log.read_text()


# ------------------------------------------------------------------------------------------ NaN / inf

def _weights(ckpt: Path, step: int) -> dict:
    return torch.load(ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multirank
def test_nan_steps_are_skipped_then_the_run_stops(data, tmp_path):
    """NaN loss on rank 0 only (injected by tests/fault_launch.py) at steps 3, 5, 6, 7 with --max-bad-steps 3: each
    update is skipped on both ranks (weights unchanged), counted in metrics.jsonl, and the third bad step in a row
    stops the run with one error line, the last checkpoint intact."""
    ck = tmp_path / "ckpt"
    p = run("tests/fault_launch.py", ["--fault-nan-at", "3,5,6,7",
                                      *pretrain_args(data, ck, 10, "--micro-batch-size", 2, "--save-interval", 1,
                                                     "--max-bad-steps", 3)],
            ranks=2, check=False)
    assert p.returncode != 0
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "launch/pretrain.py: error:" in line]
    assert errors and all("stopped at step 7: 3 consecutive steps had a non-finite loss or gradients" in e and
                          f"the last checkpoint is {ck}/global_step6" in e for e in errors), errors
    assert "Traceback" not in p.stderr
    m = {x["step"]: x for x in metrics(ck)}
    assert [m[s]["skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 3, 4]
    assert all(np.isfinite(m[s]["loss"]) for s in m)  # rank 1's finite losses; NaN never reaches the log
    w = {s: _weights(ck, s) for s in range(2, 7)}
    assert _same(w[2], w[3]) and not _same(w[3], w[4]) and _same(w[4], w[5]) and _same(w[5], w[6])
    assert all(torch.isfinite(v).all() for v in w[6].values())
    assert latest_step(ck) == 6 and not (ck / "global_step7").exists()


def test_optimizer_skips_non_finite_gradients_in_process():
    from megatron_lite.training.engine import NonFiniteSkippingAdamW

    p = torch.nn.Parameter(torch.ones(4))
    opt = NonFiniteSkippingAdamW([p], lr=0.1, fused=True)
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    opt.step()
    assert opt.last_skipped and torch.equal(p.detach(), torch.ones(4)) and not opt.state
    p.grad = torch.ones(4)
    opt.bad_loss = torch.tensor(1.0)  # the loop saw a NaN loss on this rank
    opt.step()
    assert opt.last_skipped and torch.equal(p.detach(), torch.ones(4)) and opt.bad_loss is None
    opt.step()
    assert not opt.last_skipped and not torch.equal(p.detach(), torch.ones(4))


# ------------------------------------------------------------------------------------------ full disk

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size, or None where mounting is not allowed (not root)."""
    mounted = []

    def mount(size: str) -> Path | None:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                                               capture_output=True).returncode != 0:
            return None
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.multirank
def test_full_disk_at_save_time_is_one_line_and_keeps_the_last_checkpoint(data, tmpfs, tmp_path):
    """2 ranks saving every 2 steps onto a 3 MiB tmpfs: step 2's checkpoint fits, step 4's runs out of space
    (under torch.save, on whichever rank hits it). Where no tmpfs can be mounted, the last rank's save of step
    4 fails with ENOSPC instead (tests/fault_launch.py)."""
    from megatron_lite.checkpoint.layout import tree_bytes
    from megatron_lite.checkpoint.load import load_full_state_dict
    from megatron_lite.checkpoint.save import checkpoint_bytes

    disk = tmpfs("3m")
    ck, fault = (disk / "ckpt", []) if disk else (tmp_path / "ckpt", ["--fault-no-space", 4])
    p = run("tests/fault_launch.py", [*fault, *pretrain_args(data, ck, 6, "--micro-batch-size", 2, "--save-interval", 2)],
            ranks=2, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out, out[-5000:]
    errors = [line for line in out.splitlines() if "launch/pretrain.py: error:" in line]
    assert len(errors) == 1, errors  # rank 0 reports it, the other rank exits quietly
    assert errors[0].startswith(f"launch/pretrain.py: error: no space left to save global_step4 in {ck}: "), errors
    assert " free, one checkpoint needs about " in errors[0]
    assert f"the partial tmp-global_step4 was removed and {ck}/latest still names global_step2" in errors[0]
    assert "saved checkpoint" in out and f"{ck}/global_step4" not in out
    assert latest_step(ck) == 2
    assert sorted(f.name for f in ck.iterdir() if f.name.startswith(("global_step", "tmp-", "trash-"))) == ["global_step2"]
    config, _ = load_full_state_dict(ck)  # the checkpoint left is complete and readable
    client = torch.load(ck / "global_step2" / "mp_rank_00_model_states.pt", weights_only=True)
    assert client["iteration"] == 2 and len(list((ck / "global_step2").glob("zero_pp_rank_*"))) == 2
    # The pre-flight's estimate (ZeRO-2 over 2 ranks, fp32) bounds the real size from above, closely.
    size = tree_bytes(ck / "global_step2")
    assert size <= checkpoint_bytes(config, json.loads((ck / "ds_config.json").read_text())) <= 1.1 * size + 2 ** 18


def test_preflight_refuses_a_save_folder_that_cannot_hold_one_checkpoint(data, tmpfs):
    import re

    disk = tmpfs("1m")
    if disk is None:
        pytest.skip("needs root to mount a tmpfs")
    ck = disk / "ckpt"
    p = run("launch/pretrain.py", pretrain_args(data, ck, 2, "--micro-batch-size", 2), check=False)
    line = one_line_error(p, f"--save {ck}: ", "free on its filesystem", "weights and optimizer state")
    free, needed = map(float, re.search(r"([\d.]+) MiB free .* needs about ([\d.]+) MiB", line).groups())
    assert free <= 1.0 < needed
    assert p.stdout == "" and not ck.exists()  # refused before anything started or was written


# ------------------------------------------------------------------------------------------ one-line errors

def _copy_dataset(src_prefix: str, dst_prefix: Path) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(src_prefix + ext, str(dst_prefix) + ext)
    return str(dst_prefix)


def _patch(path: str, offset: int, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _corrupt(kind: str, prefix: str):
    idx, bn = prefix + ".idx", prefix + ".bin"
    if kind == "empty":
        open(idx, "w").close()
        open(bn, "w").close()
    elif kind == "truncated_bin":
        os.truncate(bn, os.path.getsize(bn) - 2)
    elif kind == "truncated_idx":
        os.truncate(idx, os.path.getsize(idx) - 8)
    elif kind == "magic":
        _patch(idx, 0, b"XXXXXXX")
    elif kind == "version":
        _patch(idx, 9, struct.pack("<Q", 2))
    elif kind == "dtype_unknown":
        _patch(idx, 17, bytes([99]))
    elif kind == "dtype_int32":  # uint16 tokens read as int32: the .bin size no longer matches
        _patch(idx, 17, bytes([4]))
    elif kind == "pointers":
        n = struct.unpack_from("<Q", open(idx, "rb").read(), 18)[0]
        _patch(idx, 34 + 4 * n + 8, struct.pack("<q", 2))  # sequence_pointers[1]


CORRUPTIONS = [
    ("missing", "missing"),
    ("empty", "is empty"),
    ("truncated_bin", "truncated .bin"),
    ("truncated_idx", "truncated or corrupt"),
    ("magic", "not a Megatron MMIDIDX index"),
    ("version", "index version 2"),
    ("dtype_unknown", "unknown dtype code 99"),
    ("dtype_int32", "truncated .bin or mismatched .idx"),
    ("pointers", "sequence pointers do not match"),
]


def _bad_prefix(data, tmp_path, kind) -> str:
    prefix = str(tmp_path / "bad_text_document")
    if kind != "missing":
        _copy_dataset(data["pt"], tmp_path / "bad_text_document")
        _corrupt(kind, prefix)
    return prefix


@pytest.mark.parametrize("kind, needle", CORRUPTIONS)
def test_corrupt_dataset_is_refused_on_open(data, tmp_path, kind, needle):
    from megatron_lite.data.indexed_dataset import IndexedDataset
    from megatron_lite.errors import UserError

    prefix = _bad_prefix(data, tmp_path, kind)
    with pytest.raises(UserError) as e:
        IndexedDataset(prefix)
    assert needle in str(e.value) and prefix in str(e.value)


@pytest.mark.parametrize("kind, needle", [c for c in CORRUPTIONS if c[0] in ("missing", "empty", "pointers")])
def test_bad_dataset_is_one_line_error(data, tmp_path, kind, needle):
    """The same errors from the command line: one line, nothing started (every kind: the test above)."""
    prefix = _bad_prefix(data, tmp_path, kind)
    p = run("launch/pretrain.py", ["--tokenizer", data["tok"], "--data-path", prefix, "--train-iters", 1], check=False)
    one_line_error(p, needle, prefix)
    assert p.stdout == ""  # nothing started, nothing half-printed


@pytest.fixture(scope="module")
def tok300(data, tmp_path_factory):
    """A smaller tokenizer (300 tokens) than the one the data and checkpoints were made with (400)."""
    tok = tmp_path_factory.mktemp("tok300") / "tok"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(data["dir"] / "pretrain_train.jsonl"),
                    "--vocab-size", "300", "--output-dir", str(tok)], cwd=REPO, env=env(), check=True,
                   capture_output=True)
    return tok


def test_out_of_vocab_ids_and_smaller_tokenizer(data, tok300, tmp_path):
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "oov_text_document")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for i in range(20):
            b.add_document(np.arange(100) + (5000 if i == 7 else 0))
    p = run("launch/pretrain.py", ["--tokenizer", data["tok"], "--data-path", prefix, "--train-iters", 1], check=False)
    one_line_error(p, "token id 5099", "the vocabulary size is 400", prefix)
    # A tokenizer smaller than the one the data was made with.
    p = run("launch/pretrain.py", ["--tokenizer", tok300, "--data-path", data["pt"], "--train-iters", 1], check=False)
    one_line_error(p, "the vocabulary size is 300", "same tokenizer")


@pytest.mark.parametrize("case", ["not_json", "inconsistent_batch", "seq_length", "tp_world", "ep_world",
                                  "load_missing", "load_not_ckpt", "load_typo", "load_file", "max_bad_steps"])
def test_bad_flags_are_one_line_errors(data, tmp_path, case):
    base = ["--tokenizer", data["tok"], "--data-path", data["pt"], "--train-iters", 1]
    extra_env, needles = {}, []
    if case == "not_json":
        (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 2,')
        extra, needles = ["--deepspeed", tmp_path / "ds.json"], ["is not valid JSON", "ds.json"]
    elif case == "inconsistent_batch":
        (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                                                      "gradient_accumulation_steps": 1}))
        extra, needles = ["--deepspeed", tmp_path / "ds.json"], ["inconsistent", "train_batch_size 7"]
    elif case == "seq_length":
        extra, needles = ["--seq-length", 100000], ["--seq-length 100000", "max_seq_len"]
    elif case == "tp_world":  # what `deepspeed --num_gpus 3` sets; checked before any rank talks
        extra, needles, extra_env = ["--tp", 2], ["world size 3 is not divisible by --tp 2"], {"WORLD_SIZE": "3"}
    elif case == "ep_world":
        extra, needles = ["--model", "tiny-moe", "--num-experts", 4, "--ep", 4], ["--ep 4 must divide"]
        extra_env = {"WORLD_SIZE": "2"}
    elif case == "load_missing":
        extra, needles = ["--load", tmp_path / "nope"], ["--load", "does not exist"]
    elif case == "load_not_ckpt":
        (tmp_path / "half").mkdir()
        extra, needles = ["--load", tmp_path / "half"], ["no 'latest' file"]
    elif case == "load_typo":  # --load names another folder than --save, with no checkpoint: not a fresh start
        (tmp_path / "ckpt2").mkdir()
        extra, needles = ["--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt2"], ["ckpt2", "no 'latest' file"]
    elif case == "load_file":
        (tmp_path / "latest").write_text("global_step2")
        extra, needles = ["--load", tmp_path / "latest"], [f"--load {tmp_path / 'latest'} is a file, not a checkpoint folder"]
    else:
        extra, needles = ["--max-bad-steps", -1], ["--max-bad-steps"]
    p = run("launch/pretrain.py", base + extra, check=False, **extra_env)
    one_line_error(p, *needles)
    assert p.stdout == ""


@pytest.fixture(scope="module")
def small_ckpt(data, tmp_path_factory):
    """A 1-process checkpoint of the tiny model (2 steps)."""
    ck = tmp_path_factory.mktemp("small") / "ckpt"
    run("launch/pretrain.py", pretrain_args(data, ck, 2, "--micro-batch-size", 2))
    return ck


def test_load_and_pretrained_errors(data, small_ckpt, tok300, tmp_path):
    # A checkpoint of a different model.
    p = run("launch/pretrain.py", ["--model", "tiny", "--hidden-size", 32, "--num-heads", 4, "--tokenizer", data["tok"],
                                   "--data-path", data["pt"], "--train-iters", 4, "--load", small_ckpt], check=False)
    one_line_error(p, "holds a different model", "hidden_size 64 there, 32 from --hidden-size")
    # The same model with another tokenizer: its vocabulary does not match the checkpoint's embedding.
    args = pretrain_args(data, tmp_path / "z", 4, "--load", small_ckpt)
    args[args.index(data["tok"])] = tok300
    p = run("launch/pretrain.py", args, check=False)
    one_line_error(p, "holds a different model", "vocab_size 448 there, 320 from --tokenizer")
    # A corrupt (truncated) shard: refused before DeepSpeed reads it.
    bad = tmp_path / "bad"
    shutil.copytree(small_ckpt, bad)
    f = bad / "global_step2" / "mp_rank_00_model_states.pt"
    os.truncate(f, os.path.getsize(f) // 2)
    p = run("launch/pretrain.py", pretrain_args(data, tmp_path / "y", 4, "--load", bad), check=False)
    one_line_error(p, "cannot read", "mp_rank_00_model_states.pt")
    # SFT with a tokenizer that has no chat template.
    tok = tmp_path / "tok_no_template"
    shutil.copytree(data["tok"], tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in tok.glob("chat_template.*"):
        f.unlink()
    p = run("launch/sft.py", ["--pretrained", small_ckpt, "--tokenizer", tok, "--data-path", data["pt"],
                              "--train-iters", 1], check=False)
    one_line_error(p, "no chat_template", str(tok))


def test_convert_unsupported_shape_is_one_line_error(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from inference_utils import make_tokenizer, tiny_config, tiny_model
    from megatron_lite.checkpoint.save import save_checkpoint_folder

    cfg = tiny_config(ffn_type="mlp")
    save_checkpoint_folder(tmp_path / "mlp", cfg, tiny_model(cfg).state_dict(), make_tokenizer())
    p = run("tools/convert_to_hf.py", ["--load", tmp_path / "mlp", "--output", tmp_path / "hf"], check=False)
    one_line_error(p, "ffn_type 'mlp'")
    assert not (tmp_path / "hf").exists()  # nothing half-written


# ------------------------------------------------------------------------------------------ safe loading

class _Evil:
    """Unpickling this runs `touch MARKER` (what a tampered checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_everywhere(data, small_ckpt, tmp_path):
    from megatron_lite.inference.loading import load_model
    from megatron_lite.errors import UserError

    marker = tmp_path / "PWNED"
    # Sanity: the payload does run when unpickled unsafely (so the checks below can fail).
    torch.save({"x": _Evil(tmp_path / "sanity")}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert (tmp_path / "sanity").exists()

    evil = tmp_path / "evil"
    shutil.copytree(small_ckpt, evil)
    f = evil / "global_step2" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)
    state["payload"] = _Evil(marker)
    torch.save(state, f)
    with pytest.raises(UserError, match="cannot read"):
        load_model(evil)
    p = run("tools/convert_to_hf.py", ["--load", evil, "--output", tmp_path / "hf"], check=False)
    one_line_error(p, "cannot read")
    p = run("launch/pretrain.py", pretrain_args(data, tmp_path / "x", 4, "--load", evil), check=False)
    one_line_error(p, "posix.system", "refusing")
    p = run("launch/sft.py", ["--pretrained", evil, "--data-path", data["pt"], "--train-iters", 1], check=False)
    one_line_error(p, "posix.system", "refusing")
    # An expert-style extra shard with a payload is refused the same way by --load.
    evil2 = tmp_path / "evil2"
    shutil.copytree(small_ckpt, evil2)
    torch.save({"w": _Evil(marker)}, evil2 / "global_step2" / "layer_0_expert_0_mp_rank_00_model_states.pt")
    p = run("launch/pretrain.py", pretrain_args(data, tmp_path / "y", 4, "--load", evil2), check=False)
    one_line_error(p, "posix.system")
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """Every torch.load in megatron_lite/, tools/ and launch/ passes weights_only=True."""
    import re

    offenders = []
    for path in [*REPO.glob("megatron_lite/**/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("launch/*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\(", line) and not line.lstrip().startswith("#") and "`" not in line \
                    and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------ server soak

def _request(port: int, method: str, path: str, body: bytes | None = None):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
        r = c.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        c.close()


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _soak_case(i: int, port: int):
    """Request number i of the mix: (what it is, response check). Every response must be well-formed."""
    msgs = [{"role": "user", "content": f"Hello {i}"}]
    kind = i % 11
    if kind == 0:
        st, ct, b = _request(port, "POST", "/v1/chat/completions",
                             json.dumps({"messages": msgs, "max_tokens": 1 + i % 4, "seed": i}).encode())
        r = json.loads(b)
        assert st == 200 and isinstance(r["choices"][0]["message"]["content"], str), (st, b)
        assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] <= 4
    elif kind == 1:
        st, ct, b = _request(port, "POST", "/v1/chat/completions",
                             json.dumps({"messages": msgs, "max_tokens": 3, "stream": True}).encode())
        lines = [ln for ln in b.decode().split("\n") if ln]
        assert st == 200 and ct.startswith("text/event-stream") and lines[-1] == "data: [DONE]", (st, b)
        assert all(ln.startswith("data: ") for ln in lines)
        [json.loads(ln[6:]) for ln in lines[:-1]]
    elif kind == 2:
        st, ct, b = _request(port, "POST", "/v1/completions", json.dumps({"prompt": "The quick", "max_tokens": 2}).encode())
        assert st == 200 and isinstance(json.loads(b)["choices"][0]["text"], str), (st, b)
    elif kind == 3:
        st, ct, b = _request(port, "GET", "/v1/models")
        assert st == 200 and json.loads(b)["data"][0]["id"], (st, b)
    else:
        bad = {4: (b'{"messages": [', 400, None),
               5: (json.dumps({"messages": msgs, "max_tokens": 1000}).encode(), 400, "max_tokens"),
               6: (json.dumps({"messages": msgs, "pad": "x" * 20000}).encode(), 413, None),
               7: (json.dumps({"messages": [{"role": "user", "content": "hello world " * 200}]}).encode(), 400,
                   "messages"),
               8: (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
               9: (b"[" * 5000 + b"]" * 5000, 400, None),
               10: (json.dumps({"messages": msgs, "temperature": "hot"}).encode(), 400, "temperature")}[kind]
        st, ct, b = _request(port, "POST", "/v1/chat/completions", bad[0])
        err = json.loads(b)["error"]
        assert st == bad[1] and isinstance(err["message"], str) and err["type"], (kind, st, b)
        assert bad[2] is None or err["param"] == bad[2], (kind, err)
    return kind


def test_server_soak_mixed_requests(tmp_path):
    """1,100 mixed valid/invalid requests from 4 concurrent clients against `tools/serve.py`: no crash, every
    response well-formed with the expected status, and RSS after warm-up grows by less than 50 MB."""
    from concurrent.futures import ThreadPoolExecutor

    from launch_utils import free_port
    sys.path.insert(0, str(REPO / "tests"))
    from inference_utils import make_tokenizer, tiny_config, tiny_model
    from megatron_lite.checkpoint.save import save_checkpoint_folder

    cfg = tiny_config()
    save_checkpoint_folder(tmp_path / "ckpt", cfg, tiny_model(cfg).state_dict(), make_tokenizer())
    port = free_port()
    log = tmp_path / "serve.log"
    srv = subprocess.Popen(command("tools/serve.py", ["--load", tmp_path / "ckpt", "--port", port,
                                                      "--max-tokens-limit", 8, "--max-body-bytes", 16384,
                                                      "--max-prompt-tokens", 64, "--log-level", "warning",
                                                      "--no-compile"]),  # compiled default: test_server.py
                           cwd=REPO, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return _request(port, "GET", "/health")[0] == 200
            except OSError:
                return False
        wait_for(up, srv, log, "the server answering /health", limit_s=120)
        for i in range(220):  # warm-up: every kind of request, caches and allocator pools filled
            _soak_case(i, port)
        rss0 = _rss_kb(srv.pid)
        with ThreadPoolExecutor(4) as pool:
            kinds = list(pool.map(lambda i: _soak_case(i, port), range(220, 1100)))
        assert sorted(set(kinds)) == list(range(11))
        assert srv.poll() is None, log.read_text()[-3000:]
        growth_mb = (_rss_kb(srv.pid) - rss0) / 1024
        assert growth_mb < 50, growth_mb
    finally:
        srv.terminate()
        srv.wait(timeout=60)


def test_server_slow_body_gets_408():
    """A client that never finishes its body is answered 408 after body_timeout_s, not held forever."""
    import socket
    import threading

    import uvicorn

    sys.path.insert(0, str(REPO / "tests"))
    from inference_utils import make_tokenizer, tiny_config, tiny_model
    from launch_utils import free_port
    from megatron_lite.inference.server import Limits, create_app

    app = create_app(tiny_model(tiny_config()), make_tokenizer(), "t", Limits(max_tokens=8, body_timeout_s=0.5))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        for _ in range(3000):
            if srv.started:
                break
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\":")
            reply = b""
            while b"}}" not in reply and (chunk := s.recv(65536)):  # headers and body may come apart
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "timeout"
    finally:
        srv.should_exit = True
        t.join(10)


def test_server_busy_queue_times_out_with_503():
    """While one request holds the model, a second one that waits longer than queue_timeout_s gets a 503
    (OpenAI error shape), and the first still completes."""
    import threading

    import uvicorn

    sys.path.insert(0, str(REPO / "tests"))
    from inference_utils import make_tokenizer, tiny_config, tiny_model
    from launch_utils import free_port
    from megatron_lite.inference.server import Limits, create_app

    model = tiny_model(tiny_config())
    entered, release = threading.Event(), threading.Event()

    def hold(*_):  # the first forward of request A parks here until the test has seen B's 503
        entered.set()
        release.wait(60)
    handle = model.register_forward_pre_hook(hold)
    app = create_app(model, make_tokenizer(), "t", Limits(max_tokens=8, queue_timeout_s=0.2))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    try:
        for _ in range(3000):
            if srv.started:
                break
            time.sleep(0.01)
        first = {}
        a = threading.Thread(target=lambda: first.update(r=_request(port, "POST", "/v1/chat/completions", body)))
        a.start()
        assert entered.wait(60)
        st, _, b = _request(port, "POST", "/v1/chat/completions", body)
        assert st == 503 and json.loads(b)["error"]["code"] == "server_busy", (st, b)
        handle.remove()
        release.set()
        a.join(60)
        assert first["r"][0] == 200, first
    finally:
        release.set()
        srv.should_exit = True
