"""Chat on top of `generate`: apply the tokenizer's chat template, keep the prompt inside the context window.

The prompt is the rendered conversation plus the assistant header (`add_generation_prompt`). When it does
not leave room for `max_new_tokens` inside `max_seq_len`, the oldest turns are dropped first (a leading
system message is kept), then, if one turn alone is still too long, its oldest tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from megatron_lite.data.chat_format import CHAT_TEMPLATE, MessageError, normalize_messages
from megatron_lite.errors import UserError
from megatron_lite.inference.generate import Completion, SamplingParams, StreamEvent, generate, stream


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation rendered by the tokenizer's template, with the assistant header."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = CHAT_TEMPLATE  # HF folders without a template: fall back to our ChatML
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """Token ids of the chat prompt, at most `max_prompt_tokens` long (oldest turns dropped first)."""
    if max_prompt_tokens < 1:
        raise UserError("no room left for the prompt: lower max_new_tokens or raise the context limit")
    try:
        messages = normalize_messages(messages)
    except MessageError as e:
        raise UserError(str(e)) from None
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = chat_prompt_ids(tokenizer, system + turns)
        if len(ids) <= max_prompt_tokens or len(turns) <= 1:
            break
        turns = turns[1:]
    return ids[-max_prompt_tokens:]


def prompt_budget(model, params: SamplingParams, context_limit: int | None) -> int:
    limit = min(context_limit or model.config.max_seq_len, model.config.max_seq_len)
    # Always keep room to answer: at most half the window goes to a long max_new_tokens request.
    return limit - min(params.max_new_tokens, limit // 2)


def _sampling(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` with keyword overrides applied (as `generate` takes them), checked."""
    return dataclasses.replace(params or SamplingParams(), **overrides).validate()


def chat(model, tokenizer, conversations: Sequence[list[dict]], params: SamplingParams | None = None,
         context_limit: int | None = None, **overrides) -> list[Completion]:
    """Answer a batch of conversations (OpenAI-style message lists) in one batched generation."""
    p = _sampling(params, overrides)
    budget = prompt_budget(model, p, context_limit)
    prompts = [build_prompt(tokenizer, conv, budget) for conv in conversations]
    return generate(model, tokenizer, prompts, p)


def stream_chat(model, tokenizer, messages: list[dict], params: SamplingParams | None = None,
                context_limit: int | None = None, **overrides) -> Iterator[StreamEvent]:
    """Stream the assistant's reply to one conversation."""
    p = _sampling(params, overrides)
    ids = build_prompt(tokenizer, messages, prompt_budget(model, p, context_limit))
    return stream(model, tokenizer, ids, p)
