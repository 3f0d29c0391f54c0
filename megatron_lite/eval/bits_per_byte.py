"""Our own bits per byte of a model on whole documents, counted the way lm-eval's `loglikelihood_rolling`
counts them, so the two numbers are comparable on the same text:

- each document is tokenized alone (no special tokens) and preceded by one prefix token: BOS if the
  tokenizer has one, else EOS (lm-eval's rule). Our tokenizers have no BOS, so it is the end-of-document
  token every pretraining document follows in our `.bin` streams;
- [prefix] + tokens is cut into disjoint windows of the model's context (max_seq_len): every document token
  is predicted exactly once, with the tokens of its own window before it as context;
- bits per byte = sum of next-token NLL (nats) / sum of UTF-8 bytes / ln 2.
"""
from __future__ import annotations

import math

import torch

from megatron_lite.config import IGNORE_INDEX


def windows(token_ids: list[int], prefix_id: int, length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) of the disjoint windows over [prefix] + token_ids; labels are inputs shifted by one."""
    seq = [prefix_id] + list(token_ids)
    return [(seq[s:s + length], seq[s + 1:s + length + 1]) for s in range(0, len(seq) - 1, length)]


@torch.no_grad()
def document_bits_per_byte(model, tokenizer, texts: list[str], window: int | None = None,
                           batch_size: int = 8) -> dict:
    """{"bits_per_byte", "nats", "tokens", "bytes", "documents"} of our model on `texts`."""
    window = window or model.config.max_seq_len
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pieces = [w for t in texts for w in windows(tokenizer(t, add_special_tokens=False)["input_ids"], prefix, window)]
    dev = next(model.parameters()).device
    nats, tokens = 0.0, 0
    for i in range(0, len(pieces), batch_size):
        batch = pieces[i:i + batch_size]
        width = max(len(x) for x, _ in batch)
        # Right padding: causal attention keeps the pad out of every real position's context.
        ids = torch.tensor([x + [prefix] * (width - len(x)) for x, _ in batch], device=dev)
        labels = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in batch], device=dev)
        n = int((labels != IGNORE_INDEX).sum())
        nats += model(ids, labels).loss.double().item() * n  # the loss is the mean over the n labels
        tokens += n
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bits_per_byte": nats / n_bytes / math.log(2), "nats": nats, "tokens": tokens, "bytes": n_bytes,
            "documents": len(texts)}
