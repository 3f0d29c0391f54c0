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
from megatron_lite.model.attention import rope_cos_sin


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or output
    greedy: bool = False
    stop: Sequence[str] = ()  # generation ends before the first occurrence of any of these strings
    seed: int | None = None
    stop_at_eos: bool = True

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


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


# ---------------------------------------------------------------- sampling

def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits -> logits after repetition penalty, temperature, top-k and top-p (-inf = banned)."""
    if seen is not None and p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.is_greedy:
        return logits
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always survives.
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids."""
    if p.is_greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


@torch.inference_mode()
def _steps(model, tokenizer, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[list, list, list]]:
    """Yields, per decoding step, (text delta of every row, finish reason of every row (None while running),
    the rows' _TextStreams). A finished row keeps decoding padding until the whole batch is done; its
    output is ignored."""
    p.validate()
    if not prompts or any(len(x) == 0 for x in prompts):
        raise UserError("every prompt needs at least one token")
    max_len = model.config.max_seq_len
    B, P = len(prompts), max(len(x) for x in prompts)
    if P >= max_len:
        raise UserError(f"prompt of {P} tokens does not fit the model's context of {max_len} tokens")
    new_tokens = min(p.max_new_tokens, max_len - P)
    device = model.embed_tokens.weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = None
    if p.repetition_penalty != 1.0:
        vocab = model.config.vocab_size
        seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
        for i, x in enumerate(prompts):  # prompt tokens only, never the padding
            seen[i, torch.tensor(x, device=device)] = True
    gen = None
    if not p.is_greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    streams = [_TextStream(tokenizer, p.stop) for _ in range(B)]
    reasons: list[str | None] = [None] * B
    stop_ids = eos_ids(tokenizer) if p.stop_at_eos else set()
    if new_tokens == 0:
        yield [""] * B, ["length"] * B, streams
        return
    compiled = getattr(model, "compiled_decode", None)
    cache_len = P + new_tokens
    if compiled:  # static shapes: a power-of-two cache length, so a few graphs serve every prompt length
        cache_len = min(max_len, max(64, 1 << (cache_len - 1).bit_length()))
    # the compiled step reads keys position-major: its score loop then runs contiguous over the cache
    cache = model.new_kv_cache(B, cache_len, keys_transposed=compiled is not None)
    attn = mask if padded else None
    logits = model(ids, position_ids=positions, attention_mask=attn, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    pos = positions[:, -1:]
    greedy_pick = None  # the compiled step's in-graph argmax, when that is the whole sampling rule
    graph_argmax_suffices = p.is_greedy and seen is None
    if compiled:
        allowed = torch.ones((B, cache_len), dtype=torch.bool, device=device)  # prompt padding stays hidden
        allowed[:, :P] = mask.bool()
    for step in range(new_tokens):
        if greedy_pick is not None:
            nxt = greedy_pick
        else:
            nxt = pick_next(process_logits(logits.float(), seen, p), p, gen)  # (B,)
        deltas = [""] * B
        host = nxt.tolist()
        for i in range(B):
            if reasons[i] is not None:
                continue
            streams[i].generated += 1
            if host[i] in stop_ids:
                reasons[i] = "stop"
                deltas[i] = streams[i].finish()
                continue
            deltas[i] = streams[i].push(host[i])
            if streams[i].stopped:
                reasons[i] = "stop"
            elif step == new_tokens - 1:
                reasons[i] = "length"
                deltas[i] += streams[i].finish()
        if all(r is not None for r in reasons):
            yield deltas, reasons, streams
            return
        yield deltas, list(reasons), streams
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        pos = pos + 1
        if compiled:
            cache.write_at = torch.tensor([cache.length], device=device)
            logits, argmax = compiled(nxt[:, None], pos, allowed, cache)
            greedy_pick = argmax if graph_argmax_suffices else None
            cache.length += 1
            continue
        if attn is not None:
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        logits = model(nxt[:, None], position_ids=pos, attention_mask=attn, kv_cache=cache,
                       logits_to_keep=1).logits[:, -1]


def use_cpu_decode_layout(model):
    """Lay the weights out for decoding on CPU; values, shapes and parameter names stay as they are.

    Decoding a few rows at a time is a chain of matrix-vector products that read each weight once from
    memory. `x @ W.T` with W (out, in) stored column-major runs as the plain "NN" GEMM, which streams the
    weights about 1.6x faster than the "NT" GEMM that nn.Linear's row-major default gets, and the q/k/v
    (and SwiGLU gate/up) weights become column blocks of one matrix, so each is one larger GEMM instead of
    three (two) (`tiny`, batch 1: the step's GEMVs 2.3 -> ~1.2 ms). For inference only: training,
    optimizers and ZeRO expect contiguous parameters. GPU models are left alone.
    """
    from megatron_lite.model.attention import Attention
    from megatron_lite.model.ffn import SwiGLU

    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        if isinstance(module, Attention):
            module.qkv_t = _fuse_columns(module.q_proj, module.k_proj, module.v_proj)
        elif isinstance(module, SwiGLU):
            module.gate_up_t = _fuse_columns(module.gate_proj, module.up_proj)
    for param in model.parameters():
        if param.dim() == 2 and param.is_contiguous():
            param.data = param.data.t().contiguous().t()
    return model


def _fuse_columns(*linears) -> torch.Tensor | None:
    """(in, sum of outs) contiguous matrix whose column blocks become the linears' weights (as views, so
    the parameters and this matrix share memory and a later load_state_dict updates both)."""
    if not all(type(m) is torch.nn.Linear and m.bias is None for m in linears):
        return None  # biases or tensor-parallel shards: keep the separate projections
    fused = torch.cat([m.weight.detach().t() for m in linears], dim=1).contiguous()
    start = 0
    for m in linears:
        m.weight.data = fused[:, start:start + m.out_features].t()
        start += m.out_features
    return fused


def compile_decoder(model, **compile_kwargs):
    """Make generation run each decode step as one `torch.compile`d graph of `GPT.decode_step`.

    The step's shapes depend only on the batch size and the KV cache length, which is rounded up to a power
    of two (>= 64, masked past the current position), so a server compiles a few graphs per batch size,
    never one per prompt length. Inductor fuses the norm/RoPE/SwiGLU/attention elementwise ops into a
    handful of kernels, removing most of the per-op dispatch that dominates small-model decoding; on CPU it
    also freezes the weights (a second copy of the weights; later weight changes are not seen: compile
    after loading). MoE layers route with static shapes inside the graph (`MoEFeedForward._static_forward`).
    Each new shape pays a compile (tens of seconds on 2 cores). Prefill stays eager. Greedy tokens equal
    the eager path's.
    """
    compile_kwargs.setdefault("dynamic", False)
    p = next(model.parameters())
    if p.device.type == "cpu":
        compile_kwargs.setdefault("options", {"freezing": True})
    # RoPE for every position, computed once: looked up in the graph instead of cos/sin per layer and step
    cos, sin = rope_cos_sin(torch.arange(model.config.max_seq_len, device=p.device)[None], model.config.head_dim,
                            model.config.rope_theta, p.dtype)  # (1, 1, max_seq_len, head_dim) each
    model.register_buffer("rope_table", torch.stack([cos[0, 0], sin[0, 0]]), persistent=False)
    model.compiled_decode = torch.compile(model.decode_step, **compile_kwargs)
    return model


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
