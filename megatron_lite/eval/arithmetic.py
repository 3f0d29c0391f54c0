"""Exact match of a chat model's greedy answers to held-out arithmetic questions, in total and per operation.

The questions are the first turns of the arithmetic conversations in an SFT validation file (the embedded
corpus's `sft_valid.jsonl`); the score is the fraction whose reply is exactly the integer answer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

OPS = ("+", "-", "x", "other")


def question_op(messages: list[dict]) -> str:
    """The operation ("+", "-" or "x") of the last user question, "other" if it is not `a op b`."""
    m = re.search(r"\d+ ([-+*]) \d+", next(m["content"] for m in reversed(messages) if m["role"] == "user"))
    return {"+": "+", "-": "-", "*": "x"}[m.group(1)] if m else "other"


def heldout_questions(sft_valid: str | Path, limit: int) -> list[tuple[list[dict], str]]:
    """(messages up to the first assistant turn, expected answer) of the first `limit` arithmetic conversations."""
    items = []
    with open(sft_valid, encoding="utf-8") as f:
        for line in f:
            conv = json.loads(line)["conversations"]
            i = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
            if re.fullmatch(r"-?\d+", conv[i]["content"]):
                items.append((conv[:i], conv[i]["content"]))
    return items[:limit]


def exact_match_by_op(items: list[tuple[list[dict], str]], answers: list[str]) -> dict:
    """{"correct", "total", "by_op": {op: {"correct", "total"}}} for (messages, expected) items and replies."""
    by_op: dict[str, dict[str, int]] = {}
    for (messages, expected), answer in zip(items, answers, strict=True):
        row = by_op.setdefault(question_op(messages), {"correct": 0, "total": 0})
        row["correct"] += answer.strip() == expected
        row["total"] += 1
    by_op = dict(sorted(by_op.items(), key=lambda kv: OPS.index(kv[0])))
    return {"correct": sum(r["correct"] for r in by_op.values()), "total": len(items), "by_op": by_op}


def format_by_op(scores: dict) -> str:
    return "  ".join(f"{op} {r['correct']}/{r['total']}" for op, r in scores["by_op"].items())


def score_arithmetic(model, tokenizer, items: list[tuple[list[dict], str]], batch_size: int = 16) -> dict:
    """Greedy replies (8 new tokens at most) to every item, scored by exact_match_by_op."""
    from megatron_lite.inference.chat import chat

    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        answers += [o.text for o in chat(model, tokenizer, [m for m, _ in batch], greedy=True, max_new_tokens=8)]
    return exact_match_by_op(items, answers)
