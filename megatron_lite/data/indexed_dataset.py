"""Megatron's memory-mapped indexed dataset (`.bin` tokens + `.idx` index, "MMIDIDX" version 1).

`.idx` layout (little endian), byte-compatible with megatron-core's `IndexedDataset`:

    b"MMIDIDX\\x00\\x00"  <Q version=1  <B dtype code  <Q sequence count S  <Q document count D
    int32[S] sequence lengths (in tokens)   int64[S] sequence byte offsets into .bin
    int64[D] document indices (0, ..., S: sequence i..j-1 form one document)

`.bin` is the raw concatenation of all sequences. We write one sequence per document, so
D == S + 1 and `ds[i]` is document i.

A small sidecar `PREFIX.meta.json` written next to our outputs records `max_token_id` (and a few
counts) so `max_token_id()` is O(1); for files from other writers it is computed by a chunked scan.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from array import array

import numpy as np

from megatron_lite.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

# The .idx dtype code of each numpy token dtype: megatron-core's `DType` enum values, so files interchange.
NUMPY_DTYPE_OF_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                       7: np.float32, 8: np.uint16}
CODE_OF_NUMPY_DTYPE = {np.dtype(v): k for k, v in NUMPY_DTYPE_OF_CODE.items()}


def best_dtype(vocab_size: int):
    """Megatron's rule: uint16 tokens while the vocabulary fits, int32 beyond."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _fail(prefix: str, what: str, fix: str = "re-create it with tools/preprocess_data.py"):
    raise UserError(f"dataset {prefix!r}: {what}; {fix}")


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx. `ds[i]` is a zero-copy np.ndarray over the mmap.

    Pickles as its prefix, so DataLoader workers re-open their own maps instead of copying data.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def _open(self):
        prefix = self.prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                hint = ("pass the prefix without .bin/.idx" if prefix.endswith((".bin", ".idx"))
                        else "check the prefix (e.g. data/corpus_text_document for its .bin/.idx)")
                _fail(prefix, f"missing {p}", hint)
        idx_size = os.path.getsize(idx_path)
        if idx_size == 0:
            _fail(prefix, f"{idx_path} is empty")
        if idx_size < _HEADER.size:
            _fail(prefix, f"{idx_path} is truncated ({idx_size} bytes, header needs {_HEADER.size})")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            _fail(prefix, f"{idx_path} is not a Megatron MMIDIDX index (magic {magic[:9]!r})")
        if version != VERSION:
            _fail(prefix, f"{idx_path} has index version {version}, only version {VERSION} is supported")
        if code not in NUMPY_DTYPE_OF_CODE:
            _fail(prefix, f"{idx_path} has unknown dtype code {code}")
        self.dtype = np.dtype(NUMPY_DTYPE_OF_CODE[code])
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if idx_size != expected:
            _fail(prefix, f"{idx_path} is truncated or corrupt ({idx_size} bytes, header implies {expected})")
        if n_seq == 0:
            _fail(prefix, "contains no documents", "preprocess a non-empty input")

        self._idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx_map, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(self._idx_map, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(self._idx_map, np.int64, n_doc, off)

        bin_size = os.path.getsize(bin_path)
        itemsize = self.dtype.itemsize
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        if end != bin_size:
            _fail(prefix, f"{bin_path} has {bin_size} bytes but the index points to {end} "
                          f"(truncated .bin or mismatched .idx)")
        # Pointers must be the running sum of lengths: catches indexes from a different .bin.
        # One vectorised O(S) pass, cheap next to opening the files.
        if self.sequence_pointers[0] != 0 or (n_seq > 1 and not np.array_equal(
                np.diff(self.sequence_pointers), self.sequence_lengths[:-1].astype(np.int64) * itemsize)):
            _fail(prefix, f"{idx_path} sequence pointers do not match sequence lengths")
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            _fail(prefix, f"{idx_path} document indices do not cover its {n_seq} sequences")
        # An empty .bin (every sequence of length 0) cannot be mmapped; keep a zero-length array.
        self._bin_map = (np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size
                         else np.zeros(0, np.uint8))

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i, optionally only `length` tokens starting at `offset` (no copy)."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"sequence {i} has {n} tokens; asked for [{offset}, {offset + length})")
        ptr = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, self.dtype, length, ptr)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def max_token_id(self) -> int:
        """Largest token id; from the sidecar when it describes this .bin, else a chunked scan."""
        meta = read_meta(self.prefix)
        if meta.get("bin_bytes") == os.path.getsize(self.prefix + ".bin") and "max_token_id" in meta:
            return int(meta["max_token_id"])
        flat = np.frombuffer(self._bin_map, self.dtype)
        step = 1 << 24
        return int(max((flat[i:i + step].max() for i in range(0, len(flat), step)), default=-1))

    def check_vocab(self, vocab_size: int):
        """UserError when some token id does not fit the model's embedding table."""
        m = self.max_token_id()
        if m >= vocab_size:
            raise UserError(f"dataset {self.prefix!r} has token id {m} but the vocabulary size is "
                            f"{vocab_size}; preprocess it with the same tokenizer as the model")


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_meta(prefix: str) -> dict:
    try:
        with open(meta_path(prefix)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class IndexedDatasetBuilder:
    """Streaming writer. Tokens go straight to disk; only per-document lengths stay in memory.

    Output is written under temporary names and appears at PREFIX.bin/.idx only on `commit()`, so
    a crash or error never leaves a partial dataset. Use as a context manager to abort on error:

        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document(tokens)
        # committed here
    """

    def __init__(self, prefix: str, dtype=np.int32, meta: dict | None = None):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_NUMPY_DTYPE:
            raise ValueError(f"unsupported dtype {self.dtype}")
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}"
        self._bin = open(prefix + ".bin" + self._tmp, "wb")
        self._lengths = array("q")  # int64 so very long documents cannot overflow before we check
        self._max = -1
        self.meta = dict(meta or {})
        self._finalized = False

    # -- writing
    def add_document(self, tokens):
        tokens = np.asarray(tokens)
        self.add_documents(tokens.reshape(-1), [tokens.size])

    def add_documents(self, flat, lengths):
        """Append many documents at once: `flat` is their concatenation, `lengths` their sizes."""
        flat = np.asarray(flat)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens were given")
        if flat.size:
            m = int(flat.max())
            if self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                if int(flat.min()) < info.min or m > info.max:
                    raise ValueError(f"values out of range for {self.dtype}")
            self._max = max(self._max, m)
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.frombytes(lengths.tobytes())

    def merge(self, other_prefix: str):
        """Append every document of another dataset (same dtype) by copying its .bin bytes."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise UserError(f"cannot merge {other_prefix!r} ({other.dtype}) into a {self.dtype} dataset; "
                            f"preprocess both with the same tokenizer")
        self._bin.flush()
        with open(other_prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._max = max(self._max, other.max_token_id())

    # -- finishing
    def finalize(self):
        """Write the index (still under temporary names)."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, np.int64) if len(self._lengths) else np.zeros(0, np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2^31 tokens")
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self.prefix + ".idx" + self._tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_NUMPY_DTYPE[self.dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        self.meta.update(max_token_id=self._max, num_documents=len(lengths),
                         num_tokens=int(lengths.sum()), dtype=self.dtype.name,
                         bin_bytes=int(lengths.sum()) * self.dtype.itemsize)
        with open(meta_path(self.prefix) + self._tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
        self._finalized = True

    def _paths(self):
        return [self.prefix + ".bin", self.prefix + ".idx", meta_path(self.prefix)]

    def commit(self):
        """Move the finished files to their real names."""
        if not self._finalized:
            self.finalize()
        for p in self._paths():
            os.replace(p + self._tmp, p)

    def abort(self):
        """Drop everything written so far."""
        if not self._bin.closed:
            self._bin.close()
        for p in self._paths():
            try:
                os.remove(p + self._tmp)
            except FileNotFoundError:
                pass

    def __len__(self):
        return len(self._lengths)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def expand_prefixes(inputs: list[str]) -> list[str]:
    """Dataset prefixes from PREFIX, PREFIX.bin/.idx or a directory (each of its .idx files, sorted)."""
    import glob

    prefixes = []
    for x in inputs:
        if os.path.isdir(x):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(x, "*.idx")))
            if not found:
                raise UserError(f"--input directory {x!r} contains no .idx files")
            prefixes += found
        else:
            prefixes.append(x[:-4] if x.endswith((".bin", ".idx")) else x)
    return prefixes


def merge_datasets(inputs: list[str], output_prefix: str) -> int:
    """tools/merge_datasets.py: concatenate datasets, in order, into OUTPUT.bin/.idx; returns the documents."""
    import sys

    from tqdm import tqdm

    prefixes = expand_prefixes(inputs)
    if os.path.abspath(output_prefix) in map(os.path.abspath, prefixes):
        raise UserError(f"--output-prefix {output_prefix!r} is also an input; choose a new name")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetBuilder(output_prefix, first.dtype) as b:
        for pre in tqdm(prefixes, desc="merge", unit="dataset", file=sys.stderr, disable=None):
            b.merge(pre)
        n = len(b)
    print(f"merge_datasets: {len(prefixes)} datasets, {n} documents -> {output_prefix}.{{bin,idx}}", file=sys.stderr)
    return n
