#!/usr/bin/env python
"""launch/pretrain.py with failures injected, for tests that run real processes.

    python tests/fault_launch.py [--fault-nan-at 3,5] [--fault-hold-save 10:300] [--fault-no-space 4] FLAGS...
    deepspeed --num_gpus 2 tests/fault_launch.py [--fault-...] FLAGS...

FLAGS are launch/pretrain.py's own. Errors read `launch/pretrain.py: error: ...`, as from the script this
stands in for. The failures reach the loop as a `Faults` argument: production code reads no test switch.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import time
from pathlib import Path

from megatron_lite.training.cli import run_script
from megatron_lite.training.loop import Faults


def hold_save(step: int, seconds: float):
    """A before_commit hook that sleeps in the save of `step`: shards on disk, `latest` not yet moved."""
    def before_commit(tmp_folder: Path) -> None:
        if int(re.search(r"(\d+)$", tmp_folder.name).group(1)) == step:
            time.sleep(seconds)
    return before_commit


def no_space(step: int):
    """A before_commit hook: the last rank's write in the save of `step` fails as on a full disk."""
    def before_commit(tmp_folder: Path) -> None:
        last = int(os.environ.get("RANK", 0)) == int(os.environ.get("WORLD_SIZE", 1)) - 1
        if last and int(re.search(r"(\d+)$", tmp_folder.name).group(1)) == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_folder))
    return before_commit


def parse(argv=None) -> tuple[Faults, list[str]]:
    """(faults, launch/pretrain.py's own flags)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--fault-nan-at", default="", help="comma-separated steps (1-based) where rank 0's loss is NaN")
    p.add_argument("--fault-hold-save", default=None, metavar="STEP:SECONDS",
                   help="every rank sleeps SECONDS in the save of STEP, before it is committed")
    p.add_argument("--fault-no-space", type=int, default=None, metavar="STEP",
                   help="the save of STEP fails on the last rank with ENOSPC (a full disk)")
    a, rest = p.parse_known_args(argv)
    nan_at = frozenset(int(x) for x in a.fault_nan_at.split(",") if x.strip())
    before_commit = None
    if a.fault_hold_save:
        step, seconds = a.fault_hold_save.split(":")
        before_commit = hold_save(int(step), float(seconds))
    if a.fault_no_space is not None:
        before_commit = no_space(a.fault_no_space)
    return Faults(nan_at_steps=nan_at, before_commit=before_commit), rest


if __name__ == "__main__":
    faults, argv = parse()
    run_script("pretrain", argv, faults)
