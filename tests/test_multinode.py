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
