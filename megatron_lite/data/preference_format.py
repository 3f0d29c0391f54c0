"""Preference rows (DPO data): validation, and the two conversations each row stands for.

A row is one JSON object with a prompt and two answers to it:
- ``{"prompt": str, "chosen": ANSWER, "rejected": ANSWER}``: a single user turn, or
- ``{"conversations": [messages...], "chosen": ANSWER, "rejected": ANSWER}``: a conversation in either
  spelling of chat_format (ShareGPT/Belle or OpenAI) that does not end with an assistant turn,

where ANSWER is a string, an assistant message (``{"role": "assistant", "content": ...}`` or
``{"from": "gpt", "value": ...}``) or a list holding one (TRL's conversational form). Chosen and rejected
each become the whole conversation with the answer as its last (assistant) turn; the tokens trained on are
that answer and its <|im_end|>, so both sequences share their prompt tokens exactly.
"""
from __future__ import annotations

from megatron_lite.data.chat_format import MessageError, encode_chat, normalize_messages

# bad kind -> what the line has (preprocess.py's summary and --strict messages)
BAD_PREFERENCE_KINDS = {
    "missing_answer": "lacks a `chosen` or `rejected` field",
    "bad_answer": "has a `chosen` or `rejected` that is not a non-empty string or one assistant message",
    "bad_prompt": "has no usable prompt (need a `prompt` string or a `conversations` list of messages that "
                  "does not end with an assistant turn)",
}


class PreferenceRowError(ValueError):
    """A row that cannot be used; `kind` is a key of BAD_PREFERENCE_KINDS."""

    def __init__(self, kind: str):
        super().__init__(BAD_PREFERENCE_KINDS[kind])
        self.kind = kind


def _prompt(row: dict) -> list[dict]:
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return [{"role": "user", "content": row["prompt"]}]
    conv = row.get("conversations")
    if conv is None:
        raise PreferenceRowError("bad_prompt")
    try:
        messages = normalize_messages(conv)
    except MessageError:
        raise PreferenceRowError("bad_prompt") from None
    if messages[-1]["role"] == "assistant":
        raise PreferenceRowError("bad_prompt")
    return messages


def _answer(value) -> dict:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        try:
            (message,) = normalize_messages([value])
        except MessageError:
            raise PreferenceRowError("bad_answer") from None
        if message["role"] != "assistant":
            raise PreferenceRowError("bad_answer")
        value = message["content"]
    if not isinstance(value, str) or not value:
        raise PreferenceRowError("bad_answer")
    return {"role": "assistant", "content": value}


def preference_conversations(row: dict) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation) of a row; PreferenceRowError if it is unusable."""
    if "chosen" not in row or "rejected" not in row:
        raise PreferenceRowError("missing_answer")
    prompt = _prompt(row)
    return prompt + [_answer(row["chosen"])], prompt + [_answer(row["rejected"])]


def encode_preference(tokenizer, row: dict):
    """((chosen ids, chosen mask), (rejected ids, rejected mask)): each the ChatML conversation with its
    answer, the mask 1 on the answer's tokens and its <|im_end|> only."""
    chosen, rejected = preference_conversations(row)
    return (encode_chat(tokenizer, chosen, last_turn_only=True),
            encode_chat(tokenizer, rejected, last_turn_only=True))
