"""Packed GPT dataset: exact windows over the shuffled token stream, splits, determinism, cache, blends."""
import os

import numpy as np
import pytest
import torch

from megatron_lite.data.gpt_dataset import (GPTDataset, blend_indices, build_gpt_datasets, parse_data_path,
                                            split_ranges)
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
from megatron_lite.errors import UserError

L = 16


def make(prefix, n_docs=40, base=0, rng_seed=0):
    """Document d holds tokens base + d*100 + 0..len-1, so every token tells where it came from."""
    rng = np.random.default_rng(rng_seed)
    with IndexedDatasetBuilder(str(prefix), np.int32) as b:
        for d in range(n_docs):
            b.add_document(base + d * 100 + np.arange(rng.integers(1, 40)))
    return str(prefix)


def doc_of(token, base=0):
    return (int(token) - base) // 100


def test_samples_are_exact_windows_of_the_epoch_stream(tmp_path):
    p = make(tmp_path / "a")
    train, valid, test = build_gpt_datasets([p], "80,10,10", L, seed=3, num_samples=(100, 5, 5))
    assert len(train) == 100 and len(valid) == 5 and len(test) == 5
    item = train[0]
    assert item["input_ids"].shape == (L,) and item["input_ids"].dtype == torch.long
    assert isinstance(train, GPTDataset)
    # Rebuild the token stream from the cached document order and check every window against it.
    ds = train.indexed
    stream = np.concatenate([ds[int(d)] for d in train.doc_idx])
    for i in range(len(train)):
        j = int(train.shuffle_idx[i])
        want = stream[j * L: j * L + L + 1]
        x = train[i]
        assert x["input_ids"].tolist() == want[:-1].tolist()
        assert x["labels"].tolist() == want[1:].tolist()
    # Each epoch visits every train document exactly once.
    n_train = split_ranges(len(ds), [0.8, 0.1, 0.1])[0][1]
    for e in range(len(train.doc_idx) // n_train):
        assert sorted(train.doc_idx[e * n_train:(e + 1) * n_train].tolist()) == list(range(n_train))


def test_splits_are_disjoint_by_document(tmp_path):
    p = make(tmp_path / "a")
    ranges = split_ranges(40, [0.8, 0.1, 0.1])
    assert ranges == [(0, 32), (32, 36), (36, 40)]
    for ds, (a, b) in zip(build_gpt_datasets([p], "80,10,10", L, 1, (50, 20, 20)), ranges):
        docs = {doc_of(t) for i in range(len(ds)) for t in ds[i]["input_ids"]}
        assert docs <= set(range(a, b))
    train, valid, test = build_gpt_datasets([p], "1,0,0", L, 1, (10, 10, 10))
    assert valid is None and test is None


def test_deterministic_and_prefix_stable(tmp_path):
    p = make(tmp_path / "a")
    a = build_gpt_datasets([p], "969,30,1", L, 7, (20, 0, 0))[0]
    b = build_gpt_datasets([p], "969,30,1", L, 7, (500, 0, 0))[0]  # more samples: same first 20
    c = build_gpt_datasets([p], "969,30,1", L, 8, (20, 0, 0))[0]
    for i in range(20):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    assert any(not torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(20))


def test_index_cache_is_reused(tmp_path):
    p = make(tmp_path / "a")
    build_gpt_datasets([p], "1,0,0", L, 1, (30, 0, 0))
    cache = tmp_path / "cache"
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(f.endswith(".npy") for f in files)
    mtimes = [os.path.getmtime(cache / f) for f in files]
    ds = build_gpt_datasets([p], "1,0,0", L, 1, (30, 0, 0))[0]
    assert [os.path.getmtime(cache / f) for f in files] == mtimes
    assert isinstance(ds.doc_idx, np.memmap)


def test_blend_weights_and_sources(tmp_path):
    p1 = make(tmp_path / "a", base=0)
    p2 = make(tmp_path / "b", base=1_000_000, rng_seed=1)
    train = build_gpt_datasets(["0.3", p1, "0.7", p2], "1,0,0", L, 5, (1000, 0, 0))[0]
    assert len(train) == 1000
    counts = np.bincount(train.which, minlength=2)
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 700) <= 1
    for i in range(0, 1000, 97):
        toks = train[i]["input_ids"]
        assert bool((toks >= 1_000_000).all()) == (train.which[i] == 1)
    which, within = blend_indices([0.5, 0.5], 6)
    assert which.tolist() == [0, 1, 0, 1, 0, 1] and within.tolist() == [0, 0, 1, 1, 2, 2]


def test_distributed_rank0_builds(tmp_path):
    import torch.distributed as dist
    p = make(tmp_path / "a")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ds = build_gpt_datasets([p], "1,0,0", L, 1, (10, 0, 0))[0]
        assert len(ds) == 10
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", [[], ["0.3", "a", "0.7"], ["x", "a", "0.5", "b"], ["-1", "a", "1", "b"]])
def test_bad_data_path(bad):
    with pytest.raises(UserError):
        parse_data_path(bad)


def test_missing_prefix_and_bad_split(tmp_path):
    with pytest.raises(UserError, match="missing"):
        build_gpt_datasets([str(tmp_path / "nope")], "1,0,0", L, 1, (1, 0, 0))
    with pytest.raises(UserError, match="split"):
        build_gpt_datasets([make(tmp_path / "a")], "a,b", L, 1, (1, 0, 0))


def _rank_worker(rank, tmp, prefix, q):
    import torch.distributed as dist

    import megatron_lite.data.gpt_dataset as g
    built = []
    real = g._rank0_builds

    def spy(path, build):  # record which rank actually runs a build
        return real(path, lambda: (built.append(path), build())[1])

    g._rank0_builds = spy
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        ds = g.build_gpt_datasets([prefix], "1,0,0", L, 9, (25, 0, 0))[0]
        q.put((rank, len(built), [ds[i]["input_ids"].tolist() for i in range(25)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_two_ranks_rank0_builds_others_load(tmp_path):
    import multiprocessing as mp
    p = make(tmp_path / "a")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, str(tmp_path), p, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    results = dict((r, (n, s)) for r, n, s in (q.get(timeout=120) for _ in procs))
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    assert results[0][0] == 3 and results[1][0] == 0  # rank 0 built the three index files; rank 1 only loaded
    assert results[0][1] == results[1][1]
