"""Multi-node start-up on one machine: two "nodes" over loopback, each its own working directory holding its own
copy of the data, tokenizer and --save folder (a node-local disk: the same relative paths, other files).

One run is started the two ways a cluster starts it and must train exactly as `deepspeed --num_gpus 2` does:
  1. `torchrun --nnodes 2 --node-rank R --rdzv-backend c10d` once per node (what `srun ... torchrun` runs),
     until a checkpoint at step 2;
  2. `launch/multinode.sh HOSTFILE` with NODE_RANK set, once per node (`deepspeed --hostfile --no_ssh`),
     resuming to step 4. (DeepSpeed's default pdsh launcher needs sshd and pdsh on every host: not testable
     here.)
On the way: global rank 0 alone writes `latest`, metrics.jsonl and the run files, node 1 only its own shards;
a resume where the nodes see different checkpoints is refused with one line; a bad hostfile is one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import REPO, env
from megatron_lite.errors import UserError
from megatron_lite.hostfile import parse_hostfile

PRETRAIN = str(REPO / "launch" / "pretrain.py")


def node_env() -> dict:
    # The `deepspeed` launcher next to this interpreter, as on a node whose environment is activated.
    return env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_bad_hostfile_is_one_line_before_anything_starts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1\n")
    p = subprocess.run(["bash", str(REPO / "launch" / "multinode.sh"), str(hostfile), PRETRAIN, "--train-iters", "1"],
                       cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == (f"python -m megatron_lite.hostfile: error: hostfile {hostfile} line 2: 'node1' names "
                                "no slots; write 'node1 slots=N' (N processes on that node)")
    assert p.stdout == ""


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
