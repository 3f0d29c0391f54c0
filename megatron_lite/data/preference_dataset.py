"""Preference (DPO) dataset: (chosen, rejected) pairs of token ids and labels, one pair per sample.

Reads the four aligned datasets written by `tools/preprocess_data.py --preference --output-prefix P`:
`P_chosen_text_document`, `P_chosen_loss_mask_document`, `P_rejected_text_document` and
`P_rejected_loss_mask_document` (document i of each is row i). `--data-path` names `P` (or any of the four);
blends and --split work as for pretraining, the split counted in pairs.

Each side is laid out as one unpacked SFT sample: input_ids = the conversation's tokens, right-padded or cut
to seq_length; labels[t] = token t+1 where that token is part of the answer (mask 1), else IGNORE_INDEX. A
pair whose chosen or rejected answer has no token left within seq_length is left out (its log-probability
would be an empty sum). Items are {"input_ids": (2, seq_length), "labels": (2, seq_length), "num_tokens"},
row 0 chosen and row 1 rejected. Sample i is the i-th pair of an endless stream of seeded per-epoch
permutations, so it is a pure function of (data, seed, seq_length, i) and resuming needs only the count.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.gpt_dataset import blend_datasets, parse_data_path, parse_split, split_ranges
from megatron_lite.data.indexed_dataset import IndexedDataset, read_meta
from megatron_lite.data.sft_dataset import IGNORE_INDEX
from megatron_lite.errors import UserError

SIDES = ("chosen", "rejected")


def preference_prefixes(prefix: str) -> list[str]:
    """The four dataset prefixes of P (or of P_chosen_text_document and its siblings), in the order
    chosen tokens, chosen mask, rejected tokens, rejected mask."""
    for side in SIDES:
        for kind in ("text", "loss_mask"):
            suffix = f"_{side}_{kind}_document"
            if prefix.endswith(suffix):
                prefix = prefix[: -len(suffix)]
    return [f"{prefix}_{side}_{kind}_document" for side in SIDES for kind in ("text", "loss_mask")]


def _answer_in_window(mask: IndexedDataset, d: int, seq_length: int) -> bool:
    """Whether document d has an answer token among the labels of a seq_length window (tokens 1..L)."""
    n = int(mask.sequence_lengths[d])
    return n > 1 and bool(mask.get(d, 1, min(n, seq_length + 1) - 1).any())


class PreferenceDataset(torch.utils.data.Dataset):
    def __init__(self, parts: list[IndexedDataset], doc_start: int, doc_end: int, num_samples: int,
                 seq_length: int, seed: int, pad_id: int):
        self.parts = parts  # chosen tokens, chosen mask, rejected tokens, rejected mask
        self.num_samples, self.seq_length, self.seed, self.pad_id = num_samples, seq_length, seed, pad_id
        self.pairs = np.array([d for d in range(doc_start, doc_end)
                               if _answer_in_window(parts[1], d, seq_length)
                               and _answer_in_window(parts[3], d, seq_length)], dtype=np.int64)
        self.dropped = (doc_end - doc_start) - len(self.pairs)
        if not len(self.pairs):
            raise UserError(f"dataset {parts[0].prefix!r}: no pair in documents [{doc_start}, {doc_end}) has both "
                            f"answers starting within the first {seq_length} tokens; raise --seq-length")
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self):
        return self.num_samples

    def pair_index(self, i: int) -> int:
        """The row (document index) of sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        epoch, j = divmod(i, len(self.pairs))
        if epoch not in self._perms:  # one permutation per epoch, built on first use
            self._perms[epoch] = np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.pairs))
        return int(self.pairs[self._perms[epoch][j]])

    def _side(self, tokens: IndexedDataset, mask: IndexedDataset, d: int):
        L = self.seq_length
        toks = torch.from_numpy(tokens[d][: L + 1].astype(np.int64))
        keep = torch.from_numpy(mask[d][: L + 1].astype(bool))
        input_ids = torch.full((L,), self.pad_id, dtype=torch.long)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        n = min(len(toks), L)
        input_ids[:n] = toks[:n]
        labels[: len(toks) - 1] = torch.where(keep[1:], toks[1:], IGNORE_INDEX)  # label t = token t+1
        return input_ids, labels, n

    def __getitem__(self, i: int):
        d = self.pair_index(i)
        chosen = self._side(self.parts[0], self.parts[1], d)
        rejected = self._side(self.parts[2], self.parts[3], d)
        return {"input_ids": torch.stack([chosen[0], rejected[0]]), "labels": torch.stack([chosen[1], rejected[1]]),
                "num_tokens": torch.tensor(chosen[2] + rejected[2])}


def open_preference_data(prefix: str) -> list[IndexedDataset]:
    """The four datasets of one preprocessed preference file, checked to describe the same rows."""
    parts = [IndexedDataset(p) for p in preference_prefixes(prefix)]
    for side, (tokens, mask) in zip(SIDES, (parts[:2], parts[2:])):
        if not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
            raise UserError(f"{tokens.prefix!r} and {mask.prefix!r} are not aligned (different document lengths); "
                            f"re-run tools/preprocess_data.py --preference")
    if len(parts[0]) != len(parts[2]):
        raise UserError(f"{parts[0].prefix!r} has {len(parts[0])} rows but {parts[2].prefix!r} has {len(parts[2])}; "
                        f"re-run tools/preprocess_data.py --preference")
    return parts


def build_preference_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                              num_samples: tuple[int, int, int], pad_id: int | None = None,
                              vocab_size: int | None = None):
    """(train, valid, test) preference datasets of `num_samples` pairs each (None where a split is empty).

    pad_id defaults to the tokenizer's pad id recorded by preprocess_data.py (else 0); padded positions
    are never scored. With `vocab_size`, a dataset holding a larger token id is a UserError.
    """
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    files = [open_preference_data(p) for p in prefixes]
    if vocab_size is not None:
        for parts in files:
            parts[0].check_vocab(vocab_size)
            parts[2].check_vocab(vocab_size)
    num_samples = [int(n or 0) for n in num_samples]
    out = []
    for s in range(3):
        live = []
        for parts, w in zip(files, weights):
            a, b = split_ranges(len(parts[0]), fractions)[s]
            if b > a and w > 0:
                pid = pad_id if pad_id is not None else read_meta(parts[0].prefix).get("pad_id", 0)
                live.append(((parts, a, b, pid), w))
        if not live or num_samples[s] <= 0:
            out.append(None)
            continue
        ws = [w for _, w in live]
        builders = [(lambda n, a=args: PreferenceDataset(a[0], a[1], a[2], n, seq_length, seed, a[3]))
                    for args, _ in live]
        out.append(blend_datasets(builders, [w / sum(ws) for w in ws], num_samples[s]))
    return tuple(out)
