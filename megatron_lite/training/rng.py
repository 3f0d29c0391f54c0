"""Random-number state of a training run: reseeded per iteration, saved in the checkpoint's client state."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_step(seed: int, dp_rank: int, iteration: int) -> None:
    """Reseed every RNG from (seed, data-parallel rank, iteration) at the start of each iteration.

    Tensor-parallel ranks of one replica share the stream, so replicated computations (router noise,
    dropout outside TP regions) agree across them.

    Dropout and router noise then depend only on where training is, not on how it got there, so a resumed
    run draws exactly the numbers an uninterrupted one would, on every rank (DeepSpeed saves client state
    from rank 0 only, so per-rank generator states could not be restored from it)."""
    s = np.random.SeedSequence([seed, dp_rank, iteration]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


def rng_state() -> dict:
    # numpy's state holds an ndarray; store its key as a tensor so the checkpoint stays loadable with
    # torch.load(weights_only=True), which refuses numpy objects.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
