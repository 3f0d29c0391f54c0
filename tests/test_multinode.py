"""Multi-node start-up on one machine: two "nodes" over loopback, each its own working directory holding its own
copy of the data, tokenizer and --save folder (a node-local disk: the same relative paths, other files).

One run is started the two ways a cluster starts it and must train exactly as `deepspeed --num_gpus 2` does:
  1. `torchrun --nnodes 2 --node-rank R --rdzv-backend c10d` once per node (what `srun ... torchrun` runs),
     until a checkpoint at step 2;
  2. `launch/multinode.sh HOSTFILE` with NODE_RANK set, once per node (`deepspeed --hostfile --no_ssh`),
     resuming to step 4. (DeepSpeed's default pdsh launcher needs sshd and pdsh on every host: not testable
     here.)
On the way: global rank 0 alone writes `latest`, metrics.jsonl and the run files, node 1 only its own shards;
a resume where the nodes see different checkpoints is refused with one line. Also one line each, never a
hang: a check that fails on one node only, and a bad hostfile.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import DEEPSPEED, REPO, SMALL, env, losses
from megatron_lite.errors import UserError
from megatron_lite.hostfile import parse_hostfile
from megatron_lite.parallel import free_port
from megatron_lite.training.rank_agreement import mismatch

TRAIN = ["--model", "tiny", *SMALL, "--tokenizer", "tok", "--data-path", "data/pt_text_document",
         "--train-iters", "4", "--lr", "3e-3", "--warmup-iters", "2", "--save", "ckpt", "--load", "ckpt",
         "--save-interval", "2"]
PRETRAIN = str(REPO / "launch" / "pretrain.py")
SHARD1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # the only file rank 1 writes (ZeRO-2, dp 2)


def make_node(root: Path, name: str, data: dict) -> Path:
    """A node's working directory with its own copy of the tokenizer and the pretraining data."""
    d = root / name
    (d / "data").mkdir(parents=True)
    shutil.copytree(data["tok"], d / "tok")
    for suffix in (".bin", ".idx"):
        shutil.copy(data["pt"] + suffix, d / "data" / ("pt_text_document" + suffix))
    return d


def node_env() -> dict:
    # The `deepspeed` launcher next to this interpreter, as on a node whose environment is activated.
    return env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_nodes(cmds: dict[Path, list[str]], envs: dict[Path, dict] | None = None) -> dict[Path, subprocess.CompletedProcess]:
    """Start one command per node directory at once (with that node's extra env); wait for all of them."""
    envs = envs or {}
    procs = {d: subprocess.Popen(cmd, cwd=d, env={**node_env(), **envs.get(d, {})}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
             for d, cmd in cmds.items()}
    out = {}
    try:
        for d, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            out[d] = subprocess.CompletedProcess(cmds[d], p.returncode, stdout, stderr)
    finally:
        for p in procs.values():  # a launcher that hangs takes its ranks with it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def check_ok(results: dict[Path, subprocess.CompletedProcess]) -> None:
    for d, r in results.items():
        assert r.returncode == 0, (f"{d.name}: {' '.join(r.args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                   f"{r.stderr[-5000:]}")


def files(ckpt: Path) -> set[str]:
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}


@pytest.mark.multirank
def test_two_nodes_torchrun_then_hostfile_resume_match_single_node(tiny_data, tmp_path):
    ref = make_node(tmp_path, "ref", tiny_data)
    check_ok(run_nodes({ref: [DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", "2", PRETRAIN, *TRAIN]}))
    expected = losses(ref / "ckpt")
    assert sorted(expected) == [1, 2, 3, 4]

    # 1. torchrun on each node (c10d rendezvous), to a checkpoint at step 2.
    n0, n1 = make_node(tmp_path, "n0", tiny_data), make_node(tmp_path, "n1", tiny_data)
    check_ok(torchrun_nodes((n0, n1), *TRAIN, "--exit-interval", "2"))
    assert losses(n0 / "ckpt") == {s: expected[s] for s in (1, 2)}
    # Global rank 0 writes `latest`, metrics and the run files; node 1's disk gets its rank's shard, committed.
    assert (n0 / "ckpt" / "latest").read_text() == "global_step2"
    assert {"metrics.jsonl", "model_config.json", "args.json", "global_step2/mp_rank_00_model_states.pt",
            "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= files(n0 / "ckpt")
    assert SHARD1 not in " ".join(files(n0 / "ckpt"))
    assert files(n1 / "ckpt") == {f"global_step2/{SHARD1}"}

    # 2. The same resume command on both nodes: each node sees another checkpoint (node 1 has no `latest`),
    # so rank 0 stops both with one line before anything is written.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, one process each\nnode0 slots=1\nnode1 slots=1\n")
    multinode = ["bash", str(REPO / "launch" / "multinode.sh"), str(hostfile), PRETRAIN, *TRAIN]
    port = str(free_port())
    hostenvs = {d: {"NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                for r, d in enumerate((n0, n1))}
    before = {d: files(d / "ckpt") for d in (n0, n1)}
    refused = run_nodes({d: multinode for d in (n0, n1)}, hostenvs)
    assert all(r.returncode != 0 for r in refused.values())
    host = socket.gethostname()
    errors = [line for r in refused.values() for line in r.stderr.splitlines() if "error:" in line]
    assert errors == [f"launch/pretrain.py: error: --load ckpt: rank 0 (host {host}) sees checkpoint global_step2 "
                      f"there but rank 1 (host {host}) sees no checkpoint; every rank must read the same checkpoint: "
                      "put --save/--load on a filesystem all nodes share, or copy the complete checkpoint folder "
                      "(every node's global_stepN files and rank 0's latest) to each node"]
    assert {d: files(d / "ckpt") for d in (n0, n1)} == before

    # 3. What the line asks for: the complete checkpoint on both nodes (metrics stay on node 0), then resume.
    shutil.copy(n1 / "ckpt" / "global_step2" / SHARD1, n0 / "ckpt" / "global_step2")
    shutil.copytree(n0 / "ckpt", n1 / "ckpt", dirs_exist_ok=True, ignore=shutil.ignore_patterns("metrics.jsonl"))
    port = str(free_port())
    for e in hostenvs.values():
        e["MASTER_PORT"] = port
    check_ok(run_nodes({d: multinode for d in (n0, n1)}, hostenvs))
    assert losses(n0 / "ckpt") == expected
    assert (n0 / "ckpt" / "latest").read_text() == "global_step4"
    assert (n1 / "ckpt" / "latest").read_text() == "global_step2"  # node 1 never writes it
    assert not (n1 / "ckpt" / "metrics.jsonl").exists()
    assert {f for f in files(n1 / "ckpt") if f.startswith("global_step4")} == {f"global_step4/{SHARD1}"}


def torchrun_nodes(nodes: tuple[Path, ...], *args) -> dict[Path, subprocess.CompletedProcess]:
    """The same torchrun command on every node, c10d rendezvous. Ranks follow the sorted node addresses
    (torchrun ignores --node-rank with c10d), so node i, at 127.0.0.(i+1), hosts rank i."""
    port = free_port()
    return run_nodes({d: [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)),
                          "--nproc-per-node", "1", "--node-rank", str(r), "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", f"127.0.0.{r + 1}", PRETRAIN,
                          *args] for r, d in enumerate(nodes)})


@pytest.mark.multirank
def test_a_check_failing_on_one_node_only_stops_every_node_with_one_line(tiny_data, tmp_path):
    """Node 1 lacks a data file: its rank fails its pre-flight alone. It still joins the others to say so,
    so rank 0 prints one line naming rank and host, and both nodes stop instead of node 0 waiting at
    start-up until the rendezvous times out."""
    n0, n1 = make_node(tmp_path, "n0", tiny_data), make_node(tmp_path, "n1", tiny_data)
    (n1 / "data" / "pt_text_document.idx").unlink()
    results = torchrun_nodes((n0, n1), *TRAIN)
    assert all(r.returncode != 0 for r in results.values())
    errors = [line for r in results.values() for line in r.stderr.splitlines() if "launch/pretrain.py: error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"launch/pretrain.py: error: rank 1 (host {socket.gethostname()}): "), errors
    assert "data/pt_text_document.idx" in errors[0]
    assert not (n0 / "ckpt").exists() and not (n1 / "ckpt").exists()


def test_bad_hostfile_is_one_line_before_anything_starts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1\n")
    p = subprocess.run(["bash", str(REPO / "launch" / "multinode.sh"), str(hostfile), PRETRAIN, "--train-iters", "1"],
                       cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == (f"python -m megatron_lite.hostfile: error: hostfile {hostfile} line 2: 'node1' names "
                                "no slots; write 'node1 slots=N' (N processes on that node)")
    assert p.stdout == ""
    usage = subprocess.run(["bash", str(REPO / "launch" / "multinode.sh"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "NODE_RANK=R" in usage.stdout and "MASTER_PORT" in usage.stdout


VALID_HOSTFILES = ["node0 slots=8\nnode1 slots=8\n",
                   "# comment\n\n  worker-0 slots=2   # inline\nworker-1\tslots=1\n"]


@pytest.mark.parametrize("text", VALID_HOSTFILES)
def test_hostfile_reads_as_deepspeed_reads_it(tmp_path, text):
    from deepspeed.launcher.runner import _parse_hostfile

    (tmp_path / "h").write_text(text)
    assert parse_hostfile(tmp_path / "h") == dict(_parse_hostfile(text.splitlines(keepends=True)))


@pytest.mark.parametrize("text, message", [
    ("node0 slots=2\nnode1\n", "line 2: 'node1' names no slots; write 'node1 slots=N'"),
    ("node0 slots=0\n", "line 1: node0 has slots=0; every node needs at least one slot"),
    ("node0 slots=4gpus\n", "line 1: 'node0 slots=4gpus' is not 'HOST slots=N'"),
    ("node0 gpus=4\n", "line 1: 'node0 gpus=4' is not 'HOST slots=N'"),
    ("a slots=1\nb slots=1\na slots=1\n", "line 3: a is listed twice"),
    ("# nothing\n\n", "names no node"),
])
def test_bad_hostfile_names_file_and_line(tmp_path, text, message):
    (tmp_path / "h").write_text(text)
    with pytest.raises(UserError) as e:
        parse_hostfile(tmp_path / "h")
    assert f"hostfile {tmp_path / 'h'}" in str(e.value) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_rank_agreement_names_the_rank_that_differs():
    same = [("a", None, "global_step2"), ("b", None, "global_step2")]
    assert mismatch(same, "ck") is None and mismatch([("a", None, None), ("b", None, None)], None) is None
    assert mismatch([("a", None, "global_step4"), ("b", None, "global_step2")], "ck").startswith(
        "--load ck: rank 0 (host a) sees checkpoint global_step4 there but rank 1 (host b) sees checkpoint global_step2;")
    # A pre-flight error on one rank only: rank 0 reports it, naming where it happened.
    assert mismatch([("a", None, None), ("b", "dataset d.idx: missing", None)], None) == \
        "rank 1 (host b): dataset d.idx: missing"
    assert mismatch([("a", "bad flag", None), ("b", "bad flag", None)], None) == "bad flag"
    # Different checkpoints explain a pre-flight that fails on one node only, so they are reported first.
    assert mismatch([("a", "1 ZeRO shard", "global_step2"), ("b", None, None)], "ck").startswith("--load ck: rank 0")


class _ShardEngine:
    """Writes what DeepSpeed's ZeRO-2 engine writes on each rank: rank 0 the model states and its optimizer
    shard, every other rank its optimizer shard only."""
    device = "cpu"

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import torch
        import torch.distributed as dist

        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            torch.save({"it": client_state["it"]}, d / "mp_rank_00_model_states.pt")
        torch.save({"it": client_state["it"]}, d / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        dist.barrier()  # as DeepSpeed's save_checkpoint ends


def _save_node_local_and_shared(rank: int, world: int, base: str) -> dict:
    from megatron_lite.checkpoint.save import save_training_checkpoint

    local, shared = Path(base) / f"node{rank}", Path(base) / "shared"
    if rank == 1:  # a crash mid-save left this node's half-written folder behind
        (local / "tmp-global_step2").mkdir(parents=True)
        (local / "tmp-global_step2" / "stale").write_text("x")
    for it in (1, 2, 2):  # the second save of step 2 replaces the first (a rerun into the same folder)
        save_training_checkpoint(_ShardEngine(rank), str(local), it, {"it": it})
        save_training_checkpoint(_ShardEngine(rank), str(shared), it, {"it": it})
    return {name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
            for name, d in (("local", local), ("shared", shared))}


@pytest.mark.multirank
def test_node_local_save_commits_each_nodes_shards_and_only_rank0_writes_latest(tmp_path):
    from dist_utils import run_distributed

    node0, node1 = run_distributed(_save_node_local_and_shared, world_size=2, args=(str(tmp_path),))
    shard = "zero_pp_rank_{}_mp_rank_00_optim_states.pt".format
    assert node0["local"] == ["global_step1/mp_rank_00_model_states.pt", f"global_step1/{shard(0)}",
                              "global_step2/mp_rank_00_model_states.pt", f"global_step2/{shard(0)}", "latest"]
    assert node1["local"] == [f"global_step1/{shard(1)}", f"global_step2/{shard(1)}"]  # no latest, no tmp-*
    assert node0["shared"] == node1["shared"] == [
        "global_step1/mp_rank_00_model_states.pt", f"global_step1/{shard(0)}", f"global_step1/{shard(1)}",
        "global_step2/mp_rank_00_model_states.pt", f"global_step2/{shard(0)}", f"global_step2/{shard(1)}", "latest"]
    assert (tmp_path / "node0" / "latest").read_text() == (tmp_path / "shared" / "latest").read_text() == "global_step2"
