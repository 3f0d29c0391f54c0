"""The ranks of a multi-node run agree before training starts.

Each rank checks its flags and files on its own node before it joins the others (checks that fail there are
one line and no DeepSpeed import). On node-local disks those checks can differ between nodes: one rank may
find no dataset, or no checkpoint to resume from, while the others go on. A rank that fails alone would
leave the rest blocked at start-up until the rendezvous times out, and a rank that starts from scratch while
the others resume would train silently wrong. So, once connected, the ranks exchange what they found: any
failure, or any difference in the checkpoint they would resume from, stops every rank, rank 0 printing one
line that names the rank and host concerned; the other ranks exit with the same status and print nothing.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

from megatron_lite.checkpoint.layout import latest_tag
from megatron_lite.errors import UserError


def launched_with_peers() -> bool:
    """Whether a launcher started this process as one of several ranks (they wait for it at start-up)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _what(tag: str | None) -> str:
    return f"checkpoint {tag}" if tag else "no checkpoint"


def mismatch(seen: list[tuple[str, str | None, str | None]], load_flag: str | None) -> str | None:
    """The one-line problem in every rank's (host, pre-flight error, checkpoint tag --load names there), if
    any. Different checkpoints come first: they are why one node's pre-flight fails (a missing `latest`, a
    ZeRO shard count that does not match) where the others' passes."""
    host0, _, tag0 = seen[0]
    for rank, (host, _, tag) in enumerate(seen):
        if load_flag is not None and tag != tag0:
            return (f"--load {load_flag}: rank 0 (host {host0}) sees {_what(tag0)} there but rank {rank} (host "
                    f"{host}) sees {_what(tag)}; every rank must read the same checkpoint: put --save/--load on a "
                    f"filesystem all nodes share, or copy the complete checkpoint folder (every node's global_stepN "
                    f"files and rank 0's latest) to each node")
    for rank, (host, error, _) in enumerate(seen):
        if error:
            return error if rank == 0 else f"rank {rank} (host {host}): {error}"
    return None


def agree_at_start(failure: UserError | None, load_flag: str | None) -> None:
    """Collective, right after torch.distributed starts and before any other collective: raise on rank 0
    (SystemExit(2) elsewhere) when any rank's pre-flight failed or --load names different checkpoints (or
    none) on different ranks."""
    mine = (socket.gethostname(), str(failure) if failure else None,
            latest_tag(Path(load_flag)) if load_flag else None)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        seen = [mine]
    else:
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, mine)
    problem = mismatch(seen, load_flag)
    if problem is None:
        return
    if dist.is_initialized() and dist.get_rank() != 0:
        raise SystemExit(2)
    raise UserError(problem)
