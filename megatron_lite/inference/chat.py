"""Chat on top of `generate`: apply the tokenizer's chat template, keep the prompt inside the context window.

The prompt is the rendered conversation plus the assistant header (`add_generation_prompt`). When it does
not leave room for `max_new_tokens` inside `max_seq_len`, the oldest turns are dropped first (a leading
system message is kept), then, if one turn alone is still too long, its oldest tokens.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from megatron_lite.errors import UserError
from megatron_lite.inference.generate import Completion, SamplingParams, StreamEvent, _params, generate, stream

ROLES = ("system", "user", "assistant")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        from megatron_lite.data.tokenizer import CHAT_TEMPLATE
        tokenizer.chat_template = CHAT_TEMPLATE  # HF folders without a template: fall back to our ChatML
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"each message needs a role in {ROLES} and a string content, got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def build_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """Token ids of the chat prompt, at most `max_prompt_tokens` long (oldest turns dropped first)."""
    if max_prompt_tokens < 1:
        raise UserError("no room left for the prompt: lower max_new_tokens or raise the context limit")
    messages = check_messages(messages)
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


def chat(conversations: Sequence[list[dict]], tokenizer, model, params: SamplingParams | None = None,
         context_limit: int | None = None, **overrides) -> list[Completion]:
    """Answer a batch of conversations (OpenAI-style message lists) in one batched generation."""
    p = _params(params, overrides)
    budget = prompt_budget(model, p, context_limit)
    prompts = [build_prompt(tokenizer, conv, budget) for conv in conversations]
    return generate(model, tokenizer, prompts, p)


def stream_chat(messages: list[dict], tokenizer, model, params: SamplingParams | None = None,
                context_limit: int | None = None, **overrides) -> Iterator[StreamEvent]:
    """Stream the assistant's reply to one conversation."""
    p = _params(params, overrides)
    ids = build_prompt(tokenizer, messages, prompt_budget(model, p, context_limit))
    return stream(model, tokenizer, ids, p)
