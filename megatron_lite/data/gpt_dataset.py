"""Megatron-style packed GPT pretraining dataset: split, shuffle, pack, blend, cache.

How a sample is made (for one prefix and one split):
- the split's documents are laid end to end, once per epoch, each epoch in its own seeded order;
- that token stream is cut into windows of `seq_length + 1` tokens with stride `seq_length`
  (windows cross document boundaries, nothing is padded or dropped except the stream's tail);
- windows are shuffled in blocks of one epoch's worth of samples, each block with its own seed.

Every piece depends only on (data, split, seq_length, seed) and the sample's index, never on how
many samples were asked for, so sample i is the same whether a run asks for 1k or 1M samples — a
resumed run with more iterations sees the same data for the steps already taken.

The document order, sample starts and shuffle are cached as .npy files in `cache/` next to the data;
rank 0 builds them, other ranks wait at a barrier and load them (or, where the data sits on a node-local
disk, build their own copy).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.errors import UserError


# ---------------------------------------------------------------- arguments

def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float]]:
    """["P"] or ["0.3", "P1", "0.7", "P2"] -> (prefixes, normalised weights)."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    if not data_path:
        raise UserError("--data-path is empty; pass a dataset prefix or a blend like '0.3 P1 0.7 P2'")
    if len(data_path) == 1:
        return [data_path[0]], [1.0]
    if len(data_path) % 2:
        raise UserError(f"--data-path {' '.join(data_path)}: a blend needs weight/prefix pairs, "
                        f"e.g. '0.3 P1 0.7 P2'")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise UserError(f"--data-path {' '.join(data_path)}: blend weights must be numbers, "
                        f"e.g. '0.3 P1 0.7 P2'") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--data-path weights {weights} must be >= 0 with a positive sum")
    total = sum(weights)
    return list(data_path[1::2]), [w / total for w in weights]


def parse_split(split: str) -> list[float]:
    """'969,30,1' or '98/2/0' -> three fractions summing to 1."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"--split {split!r} must be numbers like 969,30,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--split {split!r} must be non-negative with a positive sum, e.g. 969,30,1")
    return [p / sum(parts) for p in parts]


def split_ranges(n_docs: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Document index ranges [start, end) for train/valid/test.

    Rounding the cumulative fractions (not each part) keeps the bounds monotonic and summing to n.
    """
    cum = np.cumsum([0.0] + list(fractions))
    bounds = [int(round(c * n_docs)) for c in cum[:-1]] + [n_docs]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# ---------------------------------------------------------------- distributed-aware cache

def _save_atomic(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none


def _rank0_builds(path: str, build) -> np.ndarray:
    """Build-and-save on rank 0 (or the only process); everyone then loads the file.

    A rank that still finds no file after the barrier reads its data from a node-local disk (the same path on
    every node, another disk): it builds its own copy. The build is deterministic and the write atomic, so the
    ranks of one node that race to write it write the same bytes."""
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    if not os.path.exists(path) and (not dist_on or dist.get_rank() == 0):
        _save_atomic(path, build())
    if dist_on:
        dist.barrier()
        if not os.path.exists(path):
            _save_atomic(path, build())
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------- one prefix, one split

class GPTDataset(torch.utils.data.Dataset):
    """Packed windows over documents [doc_start, doc_end) of one IndexedDataset."""

    def __init__(self, indexed: IndexedDataset, doc_start: int, doc_end: int, num_samples: int,
                 seq_length: int, seed: int, name: str):
        self.indexed, self.seq_length, self.num_samples = indexed, seq_length, num_samples
        lengths = indexed.sequence_lengths[doc_start:doc_end].astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch <= 1:
            raise UserError(f"dataset {indexed.prefix!r}: the {name} split has {tokens_per_epoch} tokens; "
                            f"add data or change --split")
        # Shuffle blocks are one epoch of samples; build whole blocks so order never depends on N.
        block = max(1, tokens_per_epoch // seq_length)
        n_blocks = -(-num_samples // block)
        needed_tokens = n_blocks * block * seq_length + 1
        n_epochs = -(-needed_tokens // tokens_per_epoch)

        key = json.dumps([os.path.abspath(indexed.prefix), os.path.getsize(indexed.prefix + ".bin"),
                          doc_start, doc_end, seq_length, seed, n_epochs, n_blocks, block])
        tag = hashlib.md5(key.encode()).hexdigest()[:16]
        stem = os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "cache",
                            f"{os.path.basename(indexed.prefix)}-{name}-{tag}")

        def build_doc_idx():
            # One independent permutation per epoch (seeded by (seed, epoch)) so epoch e's order
            # is the same however many epochs are built.
            return np.concatenate([
                doc_start + np.random.default_rng([seed, e]).permutation(doc_end - doc_start)
                for e in range(n_epochs)]).astype(np.int64)

        self.doc_idx = _rank0_builds(stem + "-doc_idx.npy", build_doc_idx)

        def build_sample_idx():
            # Row s = (position in doc_idx, token offset) where window s starts; row N+1 ends the last.
            ends = np.cumsum(indexed.sequence_lengths[self.doc_idx].astype(np.int64))
            starts = np.arange(n_blocks * block + 1, dtype=np.int64) * seq_length
            pos = np.searchsorted(ends, starts, side="right")
            offset = starts - (ends[pos] - indexed.sequence_lengths[self.doc_idx[pos]])
            return np.stack([pos, offset], axis=1).astype(np.int64)

        self.sample_idx = _rank0_builds(stem + "-sample_idx.npy", build_sample_idx)

        def build_shuffle_idx():
            return np.concatenate([b * block + np.random.default_rng([seed, 1 << 20, b]).permutation(block)
                                   for b in range(n_blocks)]).astype(np.int64)

        self.shuffle_idx = _rank0_builds(stem + "-shuffle_idx.npy", build_shuffle_idx)

    def __len__(self):
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        j = int(self.shuffle_idx[i])
        pos, off = (int(x) for x in self.sample_idx[j])
        need, parts = self.seq_length + 1, []
        while need:
            doc = int(self.doc_idx[pos])
            take = min(need, int(self.indexed.sequence_lengths[doc]) - off)
            parts.append(self.indexed.get(doc, off, take))
            need -= take
            pos, off = pos + 1, 0
        return np.concatenate(parts)

    def __getitem__(self, i: int):
        t = torch.from_numpy(self.tokens(i).astype(np.int64))
        return {"input_ids": t[:-1].clone(), "labels": t[1:].clone()}


# ---------------------------------------------------------------- blends

def blend_indices(weights: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample i goes to the dataset furthest behind its target share.

    Returns (dataset index, index within that dataset) for samples 0..n-1. Greedy and prefix-stable:
    the first k entries are the same for every n >= k.
    """
    # Plain Python lists: for a handful of datasets they beat per-sample numpy calls by far.
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which, within = [0] * n, [0] * n
    ks = range(len(w))
    for i in range(n):
        d = max(ks, key=lambda j: w[j] * (i + 1) - counts[j])  # first index wins ties, like argmax
        which[i], within[i] = d, counts[d]
        counts[d] += 1
    return np.asarray(which, np.int64), np.asarray(within, np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets, which, within):
        self.datasets, self.which, self.within = datasets, which, within

    def __len__(self):
        return len(self.which)

    def __getitem__(self, i):
        return self.datasets[int(self.which[i])][int(self.within[i])]


def blend_datasets(builders, weights, n: int):
    """builders[d](num_samples) -> dataset; None when n == 0 or every part is empty."""
    if n <= 0:
        return None
    if len(builders) == 1:
        return builders[0](n)
    which, within = blend_indices(weights, n)
    counts = np.bincount(which, minlength=len(weights))
    parts = [b(int(c)) if c else None for b, c in zip(builders, counts)]
    return BlendedDataset(parts, which, within)


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], vocab_size: int | None = None):
    """(train, valid, test) packed GPT datasets; an entry is None when its split or count is empty.

    Items are {"input_ids": LongTensor(seq_length), "labels": LongTensor(seq_length)}, labels being the
    inputs shifted by one token. With `vocab_size`, a dataset holding a larger token id is a UserError.
    """
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    indexed = [IndexedDataset(p) for p in prefixes]
    if vocab_size is not None:
        for ds in indexed:
            ds.check_vocab(vocab_size)
    num_samples = [int(n or 0) for n in num_samples]
    names = ("train", "valid", "test")
    out = []
    for s, name in enumerate(names):
        ranges = [split_ranges(len(ds), fractions)[s] for ds in indexed]
        live = [(ds, r, w) for ds, r, w in zip(indexed, ranges, weights) if r[1] > r[0] and w > 0]
        if not live or num_samples[s] <= 0:
            out.append(None)
            continue
        ws = [w for _, _, w in live]
        builders = [(lambda n, ds=ds, r=r: GPTDataset(ds, r[0], r[1], n, seq_length, seed, name))
                    for ds, r, _ in live]
        out.append(blend_datasets(builders, [w / sum(ws) for w in ws], num_samples[s]))
    return tuple(out)
