"""The chat format: message validation (one set of rules for SFT data, chat and the server) and ChatML.

Messages come in two spellings, both accepted everywhere:
- OpenAI: ``{"role": "system" | "user" | "assistant" | "developer", "content": str | [{"type": "text", ...}]}``
- ShareGPT/Belle: ``{"from": "system" | "human" | "gpt" | "bot", "value": str}``
and are normalised to ``{"role": "system" | "user" | "assistant", "content": str}``.

ChatML renders them as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the tokens trained on in SFT are
each assistant turn's content and its ``<|im_end|>``.
"""
from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML. The assistant content and its <|im_end|> sit inside {% generation %} so transformers'
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens we train on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Speaker names of both spellings -> the three roles the template knows. OpenAI's newer "developer"
# role plays the part of "system".
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant"}


class MessageError(ValueError):
    """A malformed conversation; `param` names the offending field, e.g. ``messages[2].content``.

    A ValueError, not a UserError: callers decide whether a bad conversation is fatal (the server answers
    400, chat raises a UserError, preprocessing skips the line).
    """

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def normalize_messages(messages) -> list[dict]:
    """Validate a conversation in either spelling and return it as ``[{"role", "content"}, ...]``."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("'messages' must be a non-empty array", "messages")
    return [_normalize_turn(i, m) for i, m in enumerate(messages)]


def _normalize_turn(i: int, turn) -> dict:
    role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise MessageError(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
    content = turn.get("content", turn.get("value"))
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise MessageError(f"messages[{i}].content parts must be text", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise MessageError(f"messages[{i}].content must be a string", f"messages[{i}].content")
    return {"role": ROLE_ALIASES[role], "content": content}


def render_chat(messages: list[dict], add_generation_prompt: bool = False):
    """ChatML text plus the character spans that are trained on (assistant content + <|im_end|>).

    Mirrors CHAT_TEMPLATE exactly (tests check both render the same string).
    """
    parts, spans, pos = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        if m["role"] == "assistant":
            body = m["content"] + IM_END
            spans.append((pos + len(head), pos + len(head) + len(body)))
            piece = head + body + "\n"
        else:
            piece = head + m["content"] + IM_END + "\n"
        parts.append(piece)
        pos += len(piece)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False, last_turn_only: bool = False):
    """Token ids of a conversation (either spelling) and a same-length 0/1 loss mask.

    The mask is 1 exactly on assistant content tokens and their <|im_end|> — the tokens the model must
    learn to produce; with `last_turn_only`, on the last assistant turn's only (a preference answer: the
    earlier turns are part of its prompt). It is derived from character offsets of one tokenisation of the whole rendered
    text, so it is right for any tokenizer, whatever it does at segment boundaries.
    Raises MessageError for a malformed conversation.
    """
    text, spans = render_chat(normalize_messages(messages), add_generation_prompt)
    if last_turn_only:
        spans = spans[-1:]
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF wrapper or bare `tokenizers`
    enc = backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [0] * len(ids)
    si = 0
    for t, (start, _end) in enumerate(enc.offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= start < spans[si][1]:
            mask[t] = 1
    return ids, mask
