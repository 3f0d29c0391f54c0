"""SFT dataset: one conversation per sample, truncated or right-padded to seq_length (no packing,
so no cross-conversation attention to reset).

Reads the aligned pair written by `tools/preprocess_data.py --chat --output-prefix P`:
`P_text_document` (tokens) and `P_loss_mask_document` (1 on assistant tokens and their <|im_end|>).
`--data-path` may name either `P_text_document` or `P`; blends work as for pretraining.

Item j: input_ids = tokens[0:L] (padded with the tokenizer's pad id), labels[t] = tokens[t+1] where
the mask of tokens[t+1] is 1, else IGNORE_INDEX (user/system turns, role headers, padding).

Order: epoch e visits the split's conversations in a permutation seeded by (seed, e), so sample i is
a pure function of (seed, i) however many samples are requested.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.gpt_dataset import blend_datasets, parse_data_path, parse_split, split_ranges
from megatron_lite.data.indexed_dataset import IndexedDataset, read_meta
from megatron_lite.errors import UserError

IGNORE_INDEX = -100  # the label cross-entropy skips (PyTorch's default ignore_index)


def sft_prefixes(prefix: str) -> tuple[str, str]:
    """(token prefix, loss-mask prefix) for P or P_text_document."""
    base = prefix[: -len("_text_document")] if prefix.endswith("_text_document") else prefix
    return base + "_text_document", base + "_loss_mask_document"


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, doc_start: int, doc_end: int,
                 num_samples: int, seq_length: int, seed: int, pad_id: int):
        self.tokens_ds, self.mask_ds = tokens, mask
        self.num_samples, self.seq_length, self.seed, self.pad_id = num_samples, seq_length, seed, pad_id
        # A conversation whose assistant tokens all fall past the truncation point would give a sample
        # with no label at all (a 0/0 loss): leave those out.
        lengths = mask.sequence_lengths
        self.docs = np.array([d for d in range(doc_start, doc_end)
                              if lengths[d] > 1 and mask.get(d, 1, min(int(lengths[d]), seq_length + 1) - 1).any()],
                             dtype=np.int64)
        self.dropped = (doc_end - doc_start) - len(self.docs)
        if not len(self.docs):
            raise UserError(f"dataset {tokens.prefix!r}: no conversation in documents [{doc_start}, {doc_end}) has "
                            f"an assistant token within the first {seq_length} tokens; raise --seq-length")
        self.n = len(self.docs)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self):
        return self.num_samples

    def conversation_index(self, i: int) -> int:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        epoch, k = divmod(i, self.n)
        if epoch not in self._perms:  # one permutation per epoch, built on first use
            self._perms[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
        return int(self.docs[self._perms[epoch][k]])

    def __getitem__(self, i: int):
        c = self.conversation_index(i)
        L = self.seq_length
        toks = self.tokens_ds[c][: L + 1].astype(np.int64)
        keep = self.mask_ds[c][: L + 1].astype(bool)
        input_ids = torch.full((L,), self.pad_id, dtype=torch.long)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        n = len(toks) - 1  # positions that have a next token
        if n > 0:
            input_ids[:n] = torch.from_numpy(toks[:-1])
            nxt = torch.from_numpy(toks[1:])
            labels[:n] = torch.where(torch.from_numpy(keep[1:]), nxt, IGNORE_INDEX)
        if n < L and len(toks):  # the last real token still goes in when the sequence is short
            input_ids[n] = int(toks[-1])
        return {"input_ids": input_ids, "labels": labels}


def _open_pair(prefix: str):
    tp, mp = sft_prefixes(prefix)
    tokens, mask = IndexedDataset(tp), IndexedDataset(mp)
    if not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
        raise UserError(f"{tp!r} and {mp!r} are not aligned (different document lengths); "
                        f"re-run tools/preprocess_data.py --chat")
    return tokens, mask


def build_sft_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], pad_id: int | None = None,
                       vocab_size: int | None = None):
    """(train, valid, test) SFT datasets, same item format as `build_gpt_datasets`.

    pad_id defaults to the tokenizer's pad id recorded by preprocess_data.py (else 0); padded
    positions are never trained on, so its value only matters for what the model sees.
    With `vocab_size`, a dataset holding a larger token id is a UserError.
    """
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    pairs = [_open_pair(p) for p in prefixes]
    if vocab_size is not None:
        for tok, _ in pairs:
            tok.check_vocab(vocab_size)
    num_samples = [int(n or 0) for n in num_samples]
    out = []
    for s in range(3):
        live = []
        for (tok, mask), w in zip(pairs, weights):
            a, b = split_ranges(len(tok), fractions)[s]
            if b > a and w > 0:
                pid = pad_id if pad_id is not None else read_meta(tok.prefix).get("pad_id", 0)
                live.append(((tok, mask, a, b, pid), w))
        if not live or num_samples[s] <= 0:
            out.append(None)
            continue
        ws = [w for _, w in live]
        builders = [(lambda n, a=args: SFTDataset(a[0], a[1], a[2], a[3], n, seq_length, seed, a[4]))
                    for args, _ in live]
        out.append(blend_datasets(builders, [w / sum(ws) for w in ws], num_samples[s]))
    return tuple(out)
