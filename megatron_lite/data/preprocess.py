"""Offline preprocessing (tools/preprocess_data.py): JSONL or `datasets` files -> Megatron .bin/.idx.

The pipeline, one stage per section below:
- read: the input is streamed in batches of lines (bounded by count and bytes), never loaded whole;
- encode: a `BatchEncoder` parses and tokenizes a batch and packs it into flat arrays. With --workers N
  each of N worker processes builds its own encoder once, from picklable `EncodeSettings`;
- write: the parent appends each batch to one `IndexedDatasetBuilder` per output, in input order,
  counts bad lines (`BadLines`) and shows progress; outputs are renamed into place only after the
  whole input succeeded, so a failed run leaves no partial dataset.

Text mode writes P_{key}_document per --json-keys field. Chat mode renders each line's conversation with
ChatML and writes P_text_document (token ids) and P_loss_mask_document (uint8, 1 on assistant content
tokens and their <|im_end|>). Preference mode (DPO data, see preference_format.py) writes that pair twice,
P_chosen_{text,loss_mask}_document and P_rejected_{text,loss_mask}_document, one document per row in each,
the mask 1 on the answer only.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from megatron_lite.data.chat_format import encode_chat
from megatron_lite.data.preference_format import BAD_PREFERENCE_KINDS, PreferenceRowError, encode_preference
from megatron_lite.errors import UserError

BAD_KINDS = {
    "invalid_utf8": "is not valid UTF-8",
    "invalid_json": "is not valid JSON",
    "not_object": "is not a JSON object",
    "missing_key": "lacks a requested --json-keys field",
    "not_string": "has a non-string value for a --json-keys field",
    "empty_text": "has empty text (nothing to tokenize)",
    "bad_conversation": "has a malformed conversation (need a list of {role, content} or {from, value})",
    "no_assistant": "has a conversation with no assistant turn (nothing to train on)",
    **BAD_PREFERENCE_KINDS,
}
PREFERENCE_KEYS = ["chosen_text", "chosen_loss_mask", "rejected_text", "rejected_loss_mask"]
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")


# ---------------------------------------------------------------- read

def read_batches(path: str, batch_size: int, batch_bytes: int = 1 << 20):
    """Yield lists of (line number, raw bytes | record dict). Streams; never loads the whole file.

    A batch ends at `batch_size` lines or `batch_bytes` bytes, whichever comes first: the encoded form
    of a batch takes many times its text size in Python objects, so bytes, not lines, bound memory.
    """
    if not os.path.exists(path):
        raise UserError(f"--input {path!r} does not exist")
    if os.path.isfile(path) and path.endswith(JSONL_SUFFIXES):
        opener = gzip.open if path.endswith(".gz") else open
        batch, size = [], 0
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                batch.append((lineno, raw))
                size += len(raw)
                if len(batch) == batch_size or size >= batch_bytes:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch
        return
    yield from read_dataset_batches(path, batch_size)


def read_dataset_batches(path: str, batch_size: int):
    """Batches of (row number, record) from a parquet/arrow/csv/text file or folder read by `datasets`."""
    import datasets

    kind = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".txt": "text"}.get(
        os.path.splitext(path)[1])
    try:
        if kind:
            ds = datasets.load_dataset(kind, data_files=path, split="train", streaming=True)
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split="train", streaming=True)
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        raise UserError(f"cannot load --input {path!r} with `datasets` ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); use JSONL, parquet, arrow or csv")
    batch = []
    for row, rec in enumerate(ds, 1):
        batch.append((row, rec))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def input_size(path: str) -> int | None:
    """Bytes to read, when known up front (a plain file): the progress bar's total."""
    return os.path.getsize(path) if os.path.isfile(path) and not path.endswith(".gz") else None


# ---------------------------------------------------------------- encode

# Unicode normal forms leave ASCII text as it is: for an ASCII document the tokenizer without this
# normalizer gives the same ids, and skipping the normalizer saves encoding time.
ASCII_STABLE_NORMALIZERS = ("NFKC", "NFC", "NFKD", "NFD")


def without_unicode_normalizer(backend):
    """A copy of `backend` with no normalizer, or None if its normalizer may change ASCII text."""
    if type(backend.normalizer).__name__ not in ASCII_STABLE_NORMALIZERS:
        return None
    from tokenizers import Tokenizer

    twin = Tokenizer.from_str(backend.to_str())
    twin.normalizer = None
    return twin


class TextEncoder:
    """Batch encoding with a bare `tokenizers.Tokenizer`; ASCII texts skip a Unicode normalizer."""

    def __init__(self, backend):
        self.backend = backend
        self.ascii_backend = without_unicode_normalizer(backend)

    def encode(self, texts):
        """(token ids of each text, None where the tokenizer rejects it; sorted indices of those rejected)."""
        if self.ascii_backend is None:
            return _encode_batch(self.backend, texts)
        plain, other = [], []
        for i, t in enumerate(texts):
            (plain if t.isascii() else other).append(i)
        out: list = [None] * len(texts)
        rejected = []
        for backend, where in ((self.ascii_backend, plain), (self.backend, other)):
            ids, bad = _encode_batch(backend, [texts[i] for i in where])
            for i, x in zip(where, ids):
                out[i] = x
            rejected += [where[b] for b in bad]
        return out, sorted(rejected)


def _encode_batch(backend, texts):
    """encode_batch, falling back per text to find strings the tokenizer rejects (lone surrogates)."""
    if not texts:
        return [], []
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)], []
    except TypeError:
        out, bad = [], []
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
                out.append(backend.encode(t, add_special_tokens=False).ids)
            except (TypeError, UnicodeEncodeError):
                out.append(None)
                bad.append(i)
        return out, bad


def parse_record(item):
    """(record dict, bad kind) of one (line number, raw bytes | record) item."""
    _lineno, raw = item
    if isinstance(raw, bytes):
        if not raw.strip():
            return None, "blank"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        try:
            raw = json.loads(text)
        except ValueError:
            return None, "invalid_json"
        if not isinstance(raw, dict):
            return None, "not_object"
    return raw, None


def parse_line(item, keys):
    """(values, bad kind) of one (line number, raw bytes | record) item: values has one entry per key."""
    raw, kind = parse_record(item)
    if kind:
        return None, kind
    values = []
    for k in keys:
        if k not in raw:
            return None, "missing_key"
        values.append(raw[k])
    return values, None


def pack(docs, dtype):
    """Lists of ids -> one flat array + lengths: a single cheap pickle back to the parent."""
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lengths.sum()))
    return flat, lengths


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to encode batches; picklable, so it can start worker processes."""
    tokenizer_file: str
    keys: tuple[str, ...]
    append_eod: bool
    chat: bool
    dtype: type
    eod: int
    preference: bool = False  # rows of {prompt | conversations, chosen, rejected}; keys unused


class EncodedBatch(NamedTuple):
    packed: dict  # output key -> (flat ids, document lengths)
    bad: list  # sorted (line number, bad kind)
    blank_lines: int
    nbytes: int  # input bytes this batch covered
    lines: int


class BatchEncoder:
    """Parses, tokenizes and packs one batch of input lines (text or chat mode)."""

    def __init__(self, settings: EncodeSettings, tokenizer_threads: bool):
        if not tokenizer_threads:
            # N worker processes already use N cores; the tokenizer's own thread pool would oversubscribe.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer  # the bare Rust tokenizer: workers start fast, no transformers

        self.settings = settings
        self.backend = Tokenizer.from_file(settings.tokenizer_file)
        self.text_encoder = TextEncoder(self.backend)
        self.eod = [settings.eod] if settings.append_eod else []

    def __call__(self, batch) -> EncodedBatch:
        s, nbytes = self.settings, 0
        bad, blank, rows = [], 0, []
        for item in batch:
            if isinstance(item[1], bytes):
                nbytes += len(item[1])
            values, kind = parse_record(item) if s.preference else parse_line(item, s.keys)
            if kind == "blank":
                blank += 1
            elif kind:
                bad.append((item[0], kind))
            else:
                rows.append((item[0], values))
        encode = (self.encode_preference_rows if s.preference else self.encode_chat_rows if s.chat
                  else self.encode_text_rows)
        out = encode(rows, bad)
        bad.sort()
        packed = {k: pack(v, np.uint8 if k.endswith("loss_mask") else s.dtype) for k, v in out.items()}
        if not isinstance(batch[0][1], bytes):  # records from `datasets`: count the text we read
            nbytes = sum(len(v) for _, vals in rows for v in (vals.values() if s.preference else vals)
                         if isinstance(v, str))
        return EncodedBatch(packed, bad, blank, nbytes, len(batch))

    def encode_text_rows(self, rows, bad) -> dict:
        """{key: token lists} of the rows whose every value encodes; the others go to `bad`."""
        keys = self.settings.keys
        good = []
        for lineno, vals in rows:
            kind = next(("not_string" if not isinstance(v, str) else "empty_text"
                         for v in vals if not isinstance(v, str) or not v), None)
            if kind:
                bad.append((lineno, kind))
            else:
                good.append((lineno, vals))
        per_key, dropped = {}, {}
        for j, k in enumerate(keys):
            ids, rejected = self.text_encoder.encode([vals[j] for _, vals in good])
            for i in rejected:
                dropped.setdefault(i, "invalid_utf8")
            per_key[k] = ids
        for i in range(len(good)):  # text that encodes to nothing (e.g. removed by NFKC) is empty text
            if i not in dropped and any(not per_key[k][i] for k in keys):
                dropped[i] = "empty_text"
        bad.extend((good[i][0], kind) for i, kind in dropped.items())
        keep = [i for i in range(len(good)) if i not in dropped]
        return {k: [per_key[k][i] + self.eod for i in keep] for k in keys}

    def encode_chat_rows(self, rows, bad) -> dict:
        """{"text": token lists, "loss_mask": 0/1 lists} of the usable conversations; the others go to `bad`."""
        docs, masks = [], []
        for lineno, (conv,) in rows:
            try:
                ids, mask = encode_chat(self.backend, conv)
            except ValueError:
                bad.append((lineno, "bad_conversation"))
                continue
            except (TypeError, UnicodeEncodeError):
                bad.append((lineno, "invalid_utf8"))
                continue
            if not any(mask):
                bad.append((lineno, "no_assistant"))
                continue
            docs.append(ids + self.eod)
            masks.append(mask + [0] * len(self.eod))
        return {"text": docs, "loss_mask": masks}

    def encode_preference_rows(self, rows, bad) -> dict:
        """{PREFERENCE_KEYS: lists} of the usable rows, one document per row in each; the others go to `bad`."""
        out = {k: [] for k in PREFERENCE_KEYS}
        for lineno, row in rows:
            try:
                pair = encode_preference(self.backend, row)
            except PreferenceRowError as e:
                bad.append((lineno, e.kind))
                continue
            except (TypeError, UnicodeEncodeError):
                bad.append((lineno, "invalid_utf8"))
                continue
            for (ids, mask), side in zip(pair, ("chosen", "rejected")):
                out[f"{side}_text"].append(ids + self.eod)
                out[f"{side}_loss_mask"].append(mask + [0] * len(self.eod))
        return out


# The encoder of this worker process, built once by `_start_worker` (the Pool initializer).
_worker_encoder: BatchEncoder | None = None


def _start_worker(settings: EncodeSettings):
    global _worker_encoder
    _worker_encoder = BatchEncoder(settings, tokenizer_threads=False)


def _encode_in_worker(batch) -> EncodedBatch:
    return _worker_encoder(batch)


def encode_batches(batches, settings: EncodeSettings, workers: int):
    """EncodedBatch for each input batch, in input order (in this process when workers == 1)."""
    if workers == 1:
        yield from map(BatchEncoder(settings, tokenizer_threads=True), batches)
        return
    import multiprocessing as mp

    # Bounded in-flight window (not Pool.imap, whose feeder thread would read the whole input ahead).
    # fork starts workers fast, and the parent has not run the tokenizer's thread pool yet.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, _start_worker, (settings,)) as pool:
        pending = deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_in_worker, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- write

class BadLines:
    """Counts skipped lines by kind, keeping the first few line numbers of each; --strict stops at one, and so
    does --preference always: a preference file is all pairs, and a pair lost without notice is a silently
    different preference set (an SFT file passed by mistake would otherwise shrink to nothing row by row)."""

    def __init__(self, input_path: str, strict: bool, preference: bool = False):
        self.input_path, self.strict, self.preference = input_path, strict or preference, preference
        self.counts: Counter = Counter()
        self.first: dict[str, list[int]] = {}

    def add(self, lineno: int, kind: str):
        if self.strict:
            fix = ("every --preference row must be a usable pair" if self.preference
                   else "or drop --strict to skip bad lines")
            raise UserError(f"{self.input_path}:{lineno}: line {BAD_KINDS[kind]}; fix or remove it, {fix}")
        self.counts[kind] += 1
        lines = self.first.setdefault(kind, [])
        if len(lines) < 5:
            lines.append(lineno)

    def summary(self, n_lines: int) -> str:
        if not self.counts:
            return ""
        parts = []
        for kind, n in sorted(self.counts.items()):
            lines = self.first[kind]
            parts.append(f"{kind}={n} (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"
                         f"{', ...' if n > len(lines) else ''})")
        return f"skipped {sum(self.counts.values())} of {n_lines} lines: " + "; ".join(parts)


class Progress:
    """A tqdm bar on a terminal; in logs (CI, nohup) a plain line every `log_interval` documents."""

    def __init__(self, input_path: str, log_interval: int):
        from tqdm import tqdm

        self.bar = tqdm(total=input_size(input_path), unit="B", unit_scale=True, desc="preprocess",
                        mininterval=1.0, file=sys.stderr, disable=None)
        self.log_interval, self.next_log = log_interval, log_interval
        self.t0, self.n_bytes = time.time(), 0

    def update(self, nbytes: int, n_docs: int):
        self.bar.update(nbytes)
        self.n_bytes += nbytes
        el = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(docs_per_s=f"{n_docs / el:.0f}", docs=n_docs, refresh=False)
        if self.bar.disable and n_docs >= self.next_log:
            self.next_log = n_docs + self.log_interval
            print(f"preprocess: {n_docs} documents, {self.n_bytes / 1e6:.1f} MB, {n_docs / el:.0f} docs/s, "
                  f"{self.n_bytes / el / 1e6:.2f} MB/s", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


def _output_keys(json_keys, chat: bool, workers: int, batch_size: int,
                 preference: bool = False) -> tuple[list[str], list[str]]:
    """(--json-keys with its default, the output dataset keys), after checking the options."""
    if preference:
        if chat or json_keys is not None:
            raise UserError("--preference reads its own fields (prompt or conversations, chosen, rejected); "
                            "drop --chat and --json-keys")
        if workers < 1 or batch_size < 1:
            raise UserError("--workers and --batch-size must be >= 1")
        return ["prompt|conversations", "chosen", "rejected"], list(PREFERENCE_KEYS)
    if json_keys is None:
        json_keys = ["conversations"] if chat else ["text"]
    if chat and len(json_keys) != 1:
        raise UserError("--chat takes exactly one --json-keys field (the conversation list)")
    if workers < 1 or batch_size < 1:
        raise UserError("--workers and --batch-size must be >= 1")
    return list(json_keys), (["text", "loss_mask"] if chat else list(json_keys))


def preprocess(input_path: str, output_prefix: str, tokenizer: str, json_keys: list[str] | None = None,
               append_eod: bool = False, chat: bool = False, workers: int = 1, batch_size: int = 1000,
               batch_mb: float = 1.0, strict: bool = False, log_interval: int = 10000,
               preference: bool = False) -> dict:
    """Tokenize the input file into P_{key}_document.{bin,idx,meta.json} datasets; returns counts and timing."""
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
    from megatron_lite.data.tokenizer import load_backend

    json_keys, keys = _output_keys(json_keys, chat, workers, batch_size, preference)
    _, info = load_backend(tokenizer)
    dtype = best_dtype(info["vocab_size"])
    meta = {"tokenizer": os.path.abspath(tokenizer), "vocab_size": info["vocab_size"],
            "eod_id": info["eos_id"], "pad_id": info["pad_id"], "append_eod": append_eod,
            "input": os.path.abspath(input_path)}
    builders = {k: IndexedDatasetBuilder(f"{output_prefix}_{k}_document",
                                         np.uint8 if k.endswith("loss_mask") else dtype,
                                         dict(meta, json_key=json_keys[0] if chat else k))
                for k in keys}
    settings = EncodeSettings(os.path.join(tokenizer, "tokenizer.json"), tuple(json_keys), append_eod, chat,
                              dtype, info["eos_id"], preference)
    bad_lines = BadLines(input_path, strict, preference)
    n_lines = n_docs = n_tokens = blank = 0
    t0 = time.time()
    progress = Progress(input_path, log_interval)
    try:
        batches = read_batches(input_path, batch_size, int(batch_mb * (1 << 20)))
        for result in encode_batches(batches, settings, workers):
            n_lines += result.lines
            blank += result.blank_lines
            for lineno, kind in result.bad:
                bad_lines.add(lineno, kind)
            for k, (flat, lengths) in result.packed.items():
                builders[k].add_documents(flat, lengths)
            n_docs += len(result.packed[keys[0]][1])
            n_tokens += len(result.packed[keys[0]][0])
            progress.update(result.nbytes, n_docs)
        progress.close()
        if n_docs == 0:
            raise UserError(f"no usable documents in {input_path} ({n_lines} lines read"
                            f"{'; ' + bad_lines.summary(n_lines) if bad_lines.counts else ''})"
                            + ("; each line needs a prompt (or conversations), chosen and rejected" if preference
                               else f"; check --json-keys {' '.join(json_keys)}"))
        for b in builders.values():
            b.meta["skipped_lines"] = dict(bad_lines.counts)
            b.finalize()
        for b in builders.values():  # rename only once every output is complete
            b.commit()
    except BaseException:
        progress.close()
        for b in builders.values():
            b.abort()
        raise
    el = time.time() - t0
    size = input_size(input_path)
    print(f"preprocess: {n_docs} documents, {n_tokens} tokens in {el:.1f}s"
          + (f" ({size / el / 1e6:.2f} MB/s)" if size else "")
          + f" -> {output_prefix}_{{{','.join(keys)}}}_document.{{bin,idx}}", file=sys.stderr)
    if bad_lines.counts:
        print(f"preprocess: {bad_lines.summary(n_lines)}", file=sys.stderr)
    return {"documents": n_docs, "tokens": n_tokens, "lines": n_lines, "skipped": dict(bad_lines.counts),
            "blank_lines": blank, "seconds": el, "bytes": size}
