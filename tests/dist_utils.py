"""Run a function on N real processes with torch.distributed (gloo) initialised — for multi-rank tests.

    results = run_distributed(worker, world_size=2, args=(...))   # worker(rank, world_size, *args)

`worker` must be a module-level function (it is pickled by reference into spawned processes). Each rank's
return value comes back in a list indexed by rank; an exception on any rank (or a hang past `timeout`)
kills the others and raises here with that rank's traceback.

Spawning costs a few seconds of `import torch` per process, so a test module should spawn once and run
all its checks inside (see `run_checks`), not spawn per test.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp

from megatron_lite.parallel import free_port


def _entry(rank: int, world_size: int, fn: Callable, args: Sequence, init_file: str, port: int,
           threads: int, q) -> None:
    # env:// style variables too, so code under test that calls deepspeed.init_distributed() or reads
    # RANK/LOCAL_RANK sees a consistent single-node world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)  # the CI box has 2 cores for everyone
    try:
        # a file store, not a TCP port: no race with other test runs for a free port
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        # plain pickle, not the queue's: torch's queue pickler passes tensors as shared-memory handles
        # that die with this process
        q.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence = (), timeout: float = 120.0,
                    threads: int = 1) -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="ml_dist_")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, fn, tuple(args), os.path.join(tmp, "store"),
                                              port, threads, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = q.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run did not finish in {timeout:.0f}s "
                                       f"(ranks done: {sorted(results)})")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return [results[r] for r in range(world_size)]


def run_checks(checks: Dict[str, Callable], *args) -> Dict[str, Optional[str]]:
    """Inside a worker: run each named check, returning {name: None if it passed else its traceback}.

    Every rank runs the checks in the same order. A check should do all its collectives before its
    asserts, so a failure on one rank does not leave the other waiting in a collective (the gloo timeout
    and `run_distributed`'s timeout catch it if it does)."""
    out: Dict[str, Optional[str]] = {}
    for name, check in checks.items():
        try:
            check(*args)
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc()
    return out


def assert_check_passed(per_rank: List[Dict[str, Optional[str]]], name: str) -> None:
    """Fail with every rank's traceback if check `name` failed anywhere."""
    failures = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(per_rank) if res.get(name)]
    if failures:
        raise AssertionError(f"check {name!r} failed:\n" + "\n".join(failures))
