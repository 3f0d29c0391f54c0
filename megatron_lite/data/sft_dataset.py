"""SFT dataset: whole conversations packed into seq_length windows (the default), or one per window.

Reads the aligned pair written by `tools/preprocess_data.py --chat --output-prefix P`:
`P_text_document` (tokens) and `P_loss_mask_document` (1 on assistant tokens and their <|im_end|>).
`--data-path` may name either `P_text_document` or `P`; blends work as for pretraining.

A conversation of n tokens fills n positions: input_ids = its tokens, labels[t] = token t+1 where the mask
of token t+1 is 1, else IGNORE_INDEX (user/system turns, role headers, its last position, padding). One
longer than seq_length is cut to seq_length + 1 tokens and fills a window alone (the extra token is only
a label).

Order: the conversation stream is epoch 0's permutation, then epoch 1's, ... (permutation e seeded by
(seed, e)). Unpacked, window i is stream conversation i. Packed, each epoch is cut into windows by greedy
first fit over the stream with OPEN_WINDOWS windows open: a conversation goes into the first open window
it fits in, else opens a new one, which closes the oldest when too many are open (a full window closes at
once); windows are numbered in the order they close, then right-padded. A handful of open windows fills
them far better than cutting the stream strictly in order, yet keeps each window's conversations in stream
order and near in it. Either way window i is a pure function of (data, seed, seq_length, i), however many
windows are requested, so resuming needs only the count consumed. A window never straddles two epochs,
so it never holds one conversation twice, and every conversation of an epoch is in exactly one window.

Packed items also carry position_ids (restarting at 0 in each conversation, so each sees the positions it
would see alone) and document_ids (k = 1, 2, ... for the window's conversations, 0 for padding): the model
attends within equal ids only. Every item carries num_tokens, its non-padding tokens (for tokens/s).
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.gpt_dataset import blend_datasets, parse_data_path, parse_split, split_ranges
from megatron_lite.data.indexed_dataset import IndexedDataset, read_meta
from megatron_lite.errors import UserError

IGNORE_INDEX = -100  # the label cross-entropy skips (PyTorch's default ignore_index)
OPEN_WINDOWS = 8  # packing: windows filled at once (more fill the windows a little better, each step less)


def sft_prefixes(prefix: str) -> tuple[str, str]:
    """(token prefix, loss-mask prefix) for P or P_text_document."""
    base = prefix[: -len("_text_document")] if prefix.endswith("_text_document") else prefix
    return base + "_text_document", base + "_loss_mask_document"


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, doc_start: int, doc_end: int,
                 num_samples: int, seq_length: int, seed: int, pad_id: int, pack: bool = True):
        self.tokens_ds, self.mask_ds = tokens, mask
        self.num_samples, self.seq_length, self.seed, self.pad_id = num_samples, seq_length, seed, pad_id
        self.pack = pack
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
        # positions each kept conversation fills in a window
        self.fill = np.minimum(lengths[self.docs].astype(np.int64), seq_length)
        self._perms: dict[int, np.ndarray] = {}
        # packed, grown an epoch at a time on demand: the windows' stream positions back to back, where
        # each window starts in that list, and the first window number of every epoch built (then the end)
        self._order: list[np.ndarray] = []
        self._bounds: list[np.ndarray] = []
        self._first_window = [0]

    def __len__(self):
        return self.num_samples

    def _stream(self, k: int) -> int:
        """Position in self.docs of the k-th conversation of the (endless) shuffled stream."""
        epoch, j = divmod(k, self.n)
        if epoch not in self._perms:  # one permutation per epoch, built on first use
            self._perms[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
        return int(self._perms[epoch][j])

    def _pack_epoch(self, e: int) -> None:
        """Cut epoch e's stream positions into windows (greedy first fit, OPEN_WINDOWS open at a time)."""
        L, base = self.seq_length, e * self.n
        open_: list[list] = []  # [filled positions, stream positions]
        closed: list[list[int]] = []
        for k in range(base, base + self.n):
            f = int(self.fill[self._stream(k)])
            w = next((w for w in open_ if w[0] + f <= L), None)
            if w is None:
                w = [0, []]
                open_.append(w)
            w[0] += f
            w[1].append(k)
            if w[0] == L:
                open_.remove(w)
                closed.append(w[1])
            elif len(open_) > OPEN_WINDOWS:
                closed.append(open_.pop(0)[1])
        closed += [w[1] for w in open_]
        self._order.append(np.fromiter((k for w in closed for k in w), dtype=np.int64))
        self._bounds.append(np.cumsum([0] + [len(w) for w in closed]))
        self._first_window.append(self._first_window[-1] + len(closed))

    def _window(self, i: int) -> list[int]:
        """Stream positions of window i's conversations."""
        if not self.pack:
            return [i]
        while self._first_window[-1] <= i:
            self._pack_epoch(len(self._order))
        e = int(np.searchsorted(self._first_window, i, side="right")) - 1
        j = i - self._first_window[e]
        return self._order[e][self._bounds[e][j]:self._bounds[e][j + 1]].tolist()

    def conversation_indices(self, i: int) -> list[int]:
        """Document indices of the conversations in window i, in order."""
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return [int(self.docs[self._stream(k)]) for k in self._window(i)]

    def conversation_index(self, i: int) -> int:
        """The (first) conversation of window i."""
        return self.conversation_indices(i)[0]

    def __getitem__(self, i: int):
        L = self.seq_length
        input_ids = torch.full((L,), self.pad_id, dtype=torch.long)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(L, dtype=torch.long)
        document_ids = torch.zeros(L, dtype=torch.long)
        at = 0
        for d, c in enumerate(self.conversation_indices(i), start=1):
            toks = torch.from_numpy(self.tokens_ds[c][: L + 1].astype(np.int64))
            keep = torch.from_numpy(self.mask_ds[c][: L + 1].astype(bool))
            n = min(len(toks), L)  # positions filled
            input_ids[at:at + n] = toks[:n]
            labels[at:at + len(toks) - 1] = torch.where(keep[1:], toks[1:], IGNORE_INDEX)  # label t = token t+1
            position_ids[at:at + n] = torch.arange(n)
            document_ids[at:at + n] = d
            at += n
        position_ids[at:] = torch.arange(L - at)  # padding: its own block, any positions do
        item = {"input_ids": input_ids, "labels": labels, "num_tokens": torch.tensor(at)}
        if self.pack:
            item.update(position_ids=position_ids, document_ids=document_ids)
        return item


def _open_pair(prefix: str):
    tp, mp = sft_prefixes(prefix)
    tokens, mask = IndexedDataset(tp), IndexedDataset(mp)
    if not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
        raise UserError(f"{tp!r} and {mp!r} are not aligned (different document lengths); "
                        f"re-run tools/preprocess_data.py --chat")
    return tokens, mask


def build_sft_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], pad_id: int | None = None,
                       vocab_size: int | None = None, pack: bool = True):
    """(train, valid, test) SFT datasets of `num_samples` windows each; items as `build_gpt_datasets`'s plus
    num_tokens, and with `pack` (several conversations per window) position_ids and document_ids.

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
        builders = [(lambda n, a=args: SFTDataset(a[0], a[1], a[2], a[3], n, seq_length, seed, a[4], pack))
                    for args, _ in live]
        out.append(blend_datasets(builders, [w / sum(ws) for w in ws], num_samples[s]))
    return tuple(out)
