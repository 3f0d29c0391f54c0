"""MMIDIDX v1 reader/writer: exact contents, zero-copy reads, merge, megatron-core interop, bad files."""
import os
import pickle
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype, merge_datasets
from megatron_lite.errors import UserError

DOCS = [[5, 6, 7], [], [65499, 0], list(range(1000)), [42]]


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(np.array(d, dtype=np.int64))
    return str(prefix)


def test_round_trip_and_layout(tmp_path):
    p = write(tmp_path / "a")
    ds = IndexedDataset(p)
    assert len(ds) == len(DOCS) and ds.dtype == np.uint16
    for i, d in enumerate(DOCS):
        assert ds[i].tolist() == d
    assert ds.get(3, offset=10, length=5).tolist() == [10, 11, 12, 13, 14]
    assert ds.num_tokens == sum(map(len, DOCS))
    # Exact header bytes: magic, version 1, dtype code 8 (uint16), 5 sequences, 6 document indices.
    raw = open(p + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 5, 6)
    assert os.path.getsize(p + ".bin") == 2 * sum(map(len, DOCS))
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32


def test_reads_are_zero_copy_and_pickle(tmp_path):
    ds = IndexedDataset(write(tmp_path / "a"))
    x = ds[3]
    assert not x.flags.writeable and not x.flags.owndata  # a view over the mmap, not a copy
    ds2 = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 200  # pickles as its prefix only
    assert ds2[3].tolist() == list(range(1000))


def test_builder_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "a"), np.int32) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        IndexedDatasetBuilder(str(tmp_path / "b"), np.uint16).add_document([70000])


def test_merge(tmp_path):
    a, b = write(tmp_path / "a"), write(tmp_path / "b", [[1], [2, 3]])
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16) as m:
        m.merge(a)
        m.merge(b)
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS + [[1], [2, 3]]
    assert ds.max_token_id() == 65499
    c = write(tmp_path / "c", [[1]], np.int32)
    with pytest.raises(UserError, match="same tokenizer"):
        with IndexedDatasetBuilder(str(tmp_path / "n"), np.uint16) as m:
            m.merge(c)


def test_merge_datasets_tool(tmp_path):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "b", [[1], [2, 3]])
    write(tmp_path / "in" / "a")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(tmp_path / "in"),
                        str(tmp_path / "in" / "b.idx"), "--output-prefix", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "m"))  # a directory's datasets in name order, then the named one
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS + [[1], [2, 3]] * 2
    with pytest.raises(UserError, match="also an input"):
        merge_datasets([str(tmp_path / "m")], str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .idx files"):
        merge_datasets([str(tmp_path / "empty")], str(tmp_path / "x"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_reads_ours(tmp_path, mcore, dtype):
    p = write(tmp_path / "a", dtype=dtype)
    theirs = mcore.IndexedDataset(p)
    assert len(theirs) == len(DOCS)
    for i, d in enumerate(DOCS):
        assert theirs[i].dtype == dtype and theirs[i].tolist() == d
    assert theirs.document_indices.tolist() == list(range(len(DOCS) + 1))


def test_we_read_megatron_core_files(tmp_path, mcore):
    p = str(tmp_path / "m")
    b = mcore.IndexedDatasetBuilder(p + ".bin", dtype=np.uint16)
    for d in DOCS:
        b.add_item(torch.tensor(d, dtype=torch.int64))
        b.end_document()
    b.finalize(p + ".idx")
    ds = IndexedDataset(p)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.max_token_id() == 65499  # no sidecar: computed by scanning
    with pytest.raises(UserError, match="vocabulary size is 1000"):
        ds.check_vocab(1000)
    ds.check_vocab(65500)


def _corrupt(tmp_path, how):
    p = write(tmp_path / "a")
    idx, bin_ = p + ".idx", p + ".bin"
    raw = bytearray(open(idx, "rb").read())
    if how == "missing":
        os.remove(bin_)
    elif how == "empty":
        open(idx, "wb").close()
    elif how == "magic":
        raw[:7] = b"NOTIDX!"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 99
    elif how == "idx_truncated":
        raw = raw[:-8]
    elif how == "header_truncated":
        raw = raw[:20]
    elif how == "bin_truncated":
        with open(bin_, "r+b") as f:
            f.truncate(os.path.getsize(bin_) - 2)
    elif how == "pointers":
        raw[34 + 4 * 5 + 8] ^= 0x40  # second sequence pointer
    elif how == "no_docs":
        os.remove(idx)
        IndexedDatasetBuilder(p, np.uint16).commit()
    if how not in ("missing", "empty", "bin_truncated", "no_docs"):
        open(idx, "wb").write(bytes(raw))
    return p


@pytest.mark.parametrize("how,match", [
    ("missing", "missing"), ("empty", "empty"), ("magic", "magic"), ("version", "version 2"),
    ("dtype", "dtype code 99"), ("idx_truncated", "truncated"), ("header_truncated", "truncated"),
    ("bin_truncated", "truncated"), ("pointers", "pointers"), ("no_docs", "no documents")])
def test_bad_files_raise_one_line_user_error(tmp_path, how, match):
    p = _corrupt(tmp_path, how)
    with pytest.raises(UserError, match=match) as e:
        IndexedDataset(p)
    assert "\n" not in str(e.value) and p in str(e.value)
