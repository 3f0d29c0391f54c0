"""Tokenizer training and loading (the chat format itself lives in `chat_format.py`).

Two tokenizer types, both trained with HF `tokenizers` and saved as a `PreTrainedTokenizerFast`
(so `transformers.AutoTokenizer.from_pretrained(dir)` loads them with no remote code):

- ``bpe`` (default): GPT-2 style byte-level BPE (NFKC, ByteLevel pre-tokenizer/decoder). Every string,
  Chinese and emoji included, round-trips exactly because the alphabet is the 256 bytes.
- ``sentencepiece``: Llama/SentencePiece style BPE (NFKC, ``▁`` metaspace, byte fallback ``<0xNN>``
  pieces for characters never seen in training). Trained by `tokenizers` rather than the
  `sentencepiece` library because transformers 5 no longer converts `.model` files on load.

Both split numbers into single digits by default (``split_digits``, as Llama and DeepSeek do): "345" is
always the three tokens 3, 4, 5 instead of whatever merges the corpus happened to favour, so a model sees
every number digit by digit in the same way and arithmetic is learnable.

Special tokens: ``<unk>`` (id 0), ``<|im_start|>`` (1) and ``<|im_end|>`` (2). ``<|im_end|>`` is EOS,
PAD and the end-of-document token that `preprocess_data.py --append-eod` appends.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from megatron_lite.data.chat_format import CHAT_TEMPLATE, IM_END, IM_START
from megatron_lite.errors import UserError

UNK = "<unk>"
SPECIAL_TOKENS = [UNK, IM_START, IM_END]


def _build_backend(kind: str, split_digits: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # Isolating every digit as its own pre-token means no merge can ever span two digits.
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFKC()
        # add_prefix_space=False keeps encode(a) + encode(b) == encode(a + b) at whitespace boundaries.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
        tok.normalizer = normalizers.NFKC()
        # Digits after the metaspace, so " 12" is "▁", "1", "2" as in SentencePiece's split_digits (Llama).
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), *digits])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        raise UserError(f"unknown tokenizer type {kind!r}; use --type bpe or --type sentencepiece")
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str, kind: str = "bpe",
                    min_frequency: int = 2, length: int | None = None, split_digits: bool = True):
    """Train on an iterator of strings (streamed; never materialised) and save to `output_dir`.

    `split_digits` (default) makes every digit its own token; False lets BPE merge digit runs.

    Returns the saved tokenizer as a `PreTrainedTokenizerFast`.
    """
    from tokenizers import models, pre_tokenizers, trainers

    n_reserved = len(SPECIAL_TOKENS) + (256 if kind == "sentencepiece" else 0)
    if vocab_size < n_reserved + 256 and kind == "bpe" or vocab_size <= n_reserved:
        raise UserError(f"--vocab-size {vocab_size} is too small for a {kind} tokenizer; use at least "
                        f"{n_reserved + 256 if kind == 'bpe' else n_reserved + 1}")
    tok = _build_backend(kind, split_digits)
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer, length=length)
    else:
        # Leave room for the 256 byte-fallback pieces, which are appended after training.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      # Rare characters fall back to bytes; cap the alphabet so a small
                                      # vocabulary still has room for merges (and stays <= vocab_size).
                                      limit_alphabet=max(1, min(1000, (vocab_size - n_reserved) // 2)))
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        vocab = tok.get_vocab()
        merges = _bpe_merges(tok)
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        tok.model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True)
    return _save(tok, output_dir)


def _bpe_merges(tok) -> list[tuple[str, str]]:
    """Read the merge list back out of a trained BPE model (the Python API has no getter)."""
    import json

    model = json.loads(tok.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _save(backend, output_dir: str):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=IM_END,
                                 pad_token=IM_END, additional_special_tokens=[IM_START],
                                 chat_template=CHAT_TEMPLATE, model_max_length=1 << 30,
                                 clean_up_tokenization_spaces=False)
    os.makedirs(output_dir, exist_ok=True)
    hf.save_pretrained(output_dir)
    return hf


def load_tokenizer(path: str):
    """Load a tokenizer directory written by `train_tokenizer` (or any HF fast tokenizer directory)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory {path!r} not found; create one with "
                        f"tools/train_tokenizer.py --output-dir {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer from {path!r} ({str(e).splitlines()[0]}); "
                        f"re-create it with tools/train_tokenizer.py") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer in {path!r} is not a fast (tokenizers) tokenizer; "
                        f"re-create it with tools/train_tokenizer.py")
    return tok


def load_backend(path: str):
    """(bare `tokenizers.Tokenizer`, {"vocab_size", "eos_id", "pad_id"}) without importing transformers.

    For tools that only encode (preprocessing), which should not pay for importing transformers.
    """
    import json

    from tokenizers import Tokenizer

    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise UserError(f"{tj!r} not found; pass a directory made by tools/train_tokenizer.py "
                        f"(or any HF fast tokenizer directory)")
    backend = Tokenizer.from_file(tj)
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {}

    def token_id(name, default):
        tok = cfg.get(name, default)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return backend.token_to_id(tok) if tok else None

    eos = token_id("eos_token", IM_END)
    if eos is None:
        raise UserError(f"tokenizer in {path!r} has no end-of-document token ({IM_END} or eos_token)")
    pad = token_id("pad_token", None)
    return backend, {"vocab_size": backend.get_vocab_size(with_added_tokens=True), "eos_id": eos,
                     "pad_id": eos if pad is None else pad}


def iter_jsonl_texts(path: str, keys: list[str]) -> Iterator[str]:
    """Stream the string values of `keys` from a JSONL (or .jsonl.gz) file, skipping bad lines."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                for k in keys:
                    if isinstance(obj.get(k), str) and obj[k]:
                        yield obj[k]


def train_tokenizer_from_jsonl(paths: list[str], json_keys: list[str], vocab_size: int, output_dir: str,
                               kind: str = "bpe", min_frequency: int = 2, split_digits: bool = True):
    """tools/train_tokenizer.py: train on the `json_keys` strings of JSONL files, with a progress bar."""
    import sys

    from tqdm import tqdm

    for f in paths:
        if not os.path.isfile(f):
            raise UserError(f"--input {f!r} does not exist; pass a JSONL file with a "
                            f"{json_keys[0]!r} field per line")
    total = sum(os.path.getsize(f) for f in paths)

    def texts():
        # Progress in bytes of text seen; the trainer consumes this generator lazily.
        with tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=sys.stderr, disable=None) as bar:
            n = 0
            for f in paths:
                for t in iter_jsonl_texts(f, json_keys):
                    n += 1
                    bar.update(len(t.encode("utf-8", "replace")))
                    yield t
            if n == 0:
                raise UserError(f"no text found under --json-keys {' '.join(json_keys)} in {' '.join(paths)}")

    tok = train_tokenizer(texts(), vocab_size, output_dir, kind=kind, min_frequency=min_frequency,
                          split_digits=split_digits)
    print(f"train_tokenizer: saved {kind} tokenizer with {len(tok)} tokens to {output_dir}", file=sys.stderr)
    return tok
