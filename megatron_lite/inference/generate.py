"""Autoregressive generation with a preallocated KV cache: prefill the prompt once, then one token per step.

Batched prompts are left-padded so every row's next token sits in the last column; padded key positions
are masked out and position ids count real tokens only (cumsum(mask) - 1), so a padded row computes the
same logits as that prompt alone. Sampling: greedy, temperature, top-k, top-p, repetition penalty (HF's
CTRL-style rule), with an explicit torch.Generator so a seed reproduces a run.

Text comes out through `_TextStream`, which re-decodes the row's tokens and only releases text that is
final: no half of a multi-byte UTF-8 character (decoded as U+FFFD until its last byte arrives) and no
prefix of a stop string that might still complete.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from megatron_lite.errors import UserError
from megatron_lite.inference.fast_decode import compiled_decoder_of
from megatron_lite.inference.sampling import SamplingParams, pick_next, process_logits

__all__ = ["Completion", "SamplingParams", "StreamEvent", "generate", "stream"]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, the EOS included


@dataclass
class StreamEvent:
    """One step of a streamed generation: new text (may be empty) and, on the last event, why it ended."""
    text: str
    finish_reason: str | None = None
    completion: Completion | None = field(default=None, repr=False)


# ---------------------------------------------------------------- text

class _TextStream:
    """Incremental detokenisation of one row, holding back unfinished characters and stop-string prefixes."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []  # generated tokens, EOS excluded
        self.generated = 0
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        text = self.text
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text, self.stopped = text[:at], True
                text, final = self.text, True
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":  # a character still waiting for bytes
                end -= 1
            for s in self.stop:  # a suffix that could grow into a stop string stays back
                for n in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if text[end - n:end] == s[:n]:
                        end -= n
                        break
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def finish(self) -> str:
        return self._release(final=True)


# ---------------------------------------------------------------- the generator

def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return [int(t) for t in prompt]


def eos_ids(tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return ids


class EagerDecoding:
    """One generation on the plain model's own forward over a dynamic KV cache."""

    def __init__(self, model, batch_size: int, prompt_mask: torch.Tensor, needed_len: int):
        self.model = model
        self.cache = model.new_kv_cache(batch_size, needed_len)
        self.attn = prompt_mask if bool((prompt_mask == 0).any()) else None  # None: nothing to hide

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._logits(ids, positions)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.attn is not None:
            self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        return self._logits(tokens, positions), None

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(ids, position_ids=positions, attention_mask=self.attn, kv_cache=self.cache,
                          logits_to_keep=1).logits[:, -1]


def start_decoding(model, batch_size: int, prompt_mask: torch.Tensor, needed_len: int):
    """The model's compiled decoder (`fast_decode.compile_decoder`) when it has one, else its plain forward."""
    compiled = compiled_decoder_of(model)
    if compiled is not None:
        return compiled.start(batch_size, prompt_mask, needed_len)
    return EagerDecoding(model, batch_size, prompt_mask, needed_len)


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) token ids, right-aligned, and their (B, P) 0/1 mask of real tokens."""
    B, P = len(prompts), max(len(x) for x in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    return ids.to(device), mask.to(device)


def _check_prompts(prompts: list[list[int]], max_len: int) -> None:
    if not prompts or any(len(x) == 0 for x in prompts):
        raise UserError("every prompt needs at least one token")
    longest = max(len(x) for x in prompts)
    if longest >= max_len:
        raise UserError(f"prompt of {longest} tokens does not fit the model's context of {max_len} tokens")


def _sampler(model, prompts: list[list[int]], p: SamplingParams, device):
    """A function (B, V) logits -> (B,) next tokens that applies `p` (its penalty state and seeded generator
    inside), and whether the greedy argmax of the raw logits is the whole rule."""
    seen = None
    if p.repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), model.config.vocab_size), dtype=torch.bool, device=device)
        for i, x in enumerate(prompts):  # prompt tokens only, never the padding
            seen[i, torch.tensor(x, device=device)] = True
    gen = None
    if not p.is_greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        nxt = pick_next(process_logits(logits.float(), seen, p), p, gen)  # (B,)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        return nxt

    return sample, p.is_greedy and seen is None


@torch.inference_mode()
def _steps(model, tokenizer, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[list, list, list]]:
    """Yields, per decoding step, (text delta of every row, finish reason of every row (None while running),
    the rows' _TextStreams). A finished row keeps decoding padding until the whole batch is done; its
    output is ignored."""
    p.validate()
    max_len = model.config.max_seq_len
    _check_prompts(prompts, max_len)
    B = len(prompts)
    streams = [_TextStream(tokenizer, p.stop) for _ in range(B)]
    device = model.embed_tokens.weight.device
    ids, mask = _left_padded(prompts, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, device)
    new_tokens = min(p.max_new_tokens, max_len - ids.shape[1])
    if new_tokens == 0:
        yield [""] * B, ["length"] * B, streams
        return
    sample, argmax_is_the_rule = _sampler(model, prompts, p, device)
    stop_ids = eos_ids(tokenizer) if p.stop_at_eos else set()
    reasons: list[str | None] = [None] * B

    decoding = start_decoding(model, B, mask, ids.shape[1] + new_tokens)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, greedy_pick = decoding.prefill(ids, pos), None
    pos = pos[:, -1:]
    for step in range(new_tokens):
        nxt = greedy_pick if greedy_pick is not None and argmax_is_the_rule else sample(logits)
        deltas = [""] * B
        for i, token in enumerate(nxt.tolist()):
            if reasons[i] is None:
                deltas[i], reasons[i] = _advance(streams[i], token, stop_ids, last=step == new_tokens - 1)
        yield deltas, list(reasons), streams
        if all(r is not None for r in reasons):
            return
        pos = pos + 1
        logits, greedy_pick = decoding.step(nxt[:, None], pos)


def _advance(stream: _TextStream, token: int, stop_ids: set[int], last: bool) -> tuple[str, str | None]:
    """Feed one sampled token to a running row: (its text delta, its finish reason or None)."""
    stream.generated += 1
    if token in stop_ids:
        return stream.finish(), "stop"
    delta = stream.push(token)
    if stream.stopped:
        return delta, "stop"
    if last:
        return delta + stream.finish(), "length"
    return delta, None


def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]] | str, params: SamplingParams | None = None,
             **overrides) -> list[Completion]:
    """Complete a batch of prompts (text or token ids) together; returns one Completion per prompt."""
    p = _params(params, overrides)
    encoded = [_encode(tokenizer, x) for x in ([prompts] if isinstance(prompts, str) else prompts)]
    texts, reasons, streams = [""] * len(encoded), [None] * len(encoded), []
    for deltas, rs, streams in _steps(model, tokenizer, encoded, p):
        texts = [t + d for t, d in zip(texts, deltas)]
        reasons = rs
    return [Completion(texts[i], list(streams[i].ids), reasons[i], len(x), streams[i].generated)
            for i, x in enumerate(encoded)]


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None,
           **overrides) -> Iterator[StreamEvent]:
    """Yield text deltas of one prompt as they become final; the last event carries the finish reason and
    the full Completion."""
    p = _params(params, overrides)
    encoded = _encode(tokenizer, prompt)
    text = ""
    for deltas, reasons, streams in _steps(model, tokenizer, [encoded], p):
        text += deltas[0]
        if reasons[0] is not None:
            done = Completion(text, list(streams[0].ids), reasons[0], len(encoded), streams[0].generated)
            yield StreamEvent(deltas[0], reasons[0], done)
            return
        if deltas[0]:
            yield StreamEvent(deltas[0])


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    p = params or SamplingParams()
    if overrides:
        p = SamplingParams(**{**p.__dict__, **overrides})
    return p.validate()
