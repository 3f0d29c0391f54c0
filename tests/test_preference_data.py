"""Preference (DPO) data: tools/preprocess_data.py --preference (tokens, answer-only loss masks, bad rows as
in --chat) and the pair dataset launch/dpo.py trains on."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from megatron_lite.config import IGNORE_INDEX
from megatron_lite.data.chat_format import encode_chat
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.preference_dataset import build_preference_datasets, preference_prefixes
from megatron_lite.data.preprocess import BAD_KINDS, preprocess
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.errors import UserError

from launch_utils import REPO

_spec = importlib.util.spec_from_file_location("preprocess_data", REPO / "tools" / "preprocess_data.py")
preprocess_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_tool)

MULTI_TURN = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 + 3?"},
              {"from": "gpt", "value": "5"}, {"from": "human", "value": "And 4 + 4?"}]
ROWS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
    # a conversation as prompt (an earlier assistant turn that is not trained on), answers as messages
    {"conversations": MULTI_TURN, "chosen": {"role": "assistant", "content": "It is 8."},
     "rejected": [{"from": "gpt", "value": "It is 9."}]},
]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ data

def test_preference_rows_tokens_and_answer_masks(tiny_data, tmp_path):
    """Both sides are the whole ChatML conversation ending in their answer; the mask covers that answer and
    its <|im_end|> only; the pair dataset turns them into labels on exactly those tokens."""
    tok = load_tokenizer(str(tiny_data["tok"]))
    stats = preprocess(str(_write(tmp_path / "p.jsonl", ROWS)), str(tmp_path / "p"), str(tiny_data["tok"]),
                       preference=True)
    assert stats["documents"] == 2 and stats["skipped"] == {}
    parts = [IndexedDataset(p) for p in preference_prefixes(str(tmp_path / "p"))]
    assert [p.dtype for p in parts[1::2]] == [np.uint8, np.uint8]
    prompts = [[{"role": "user", "content": ROWS[0]["prompt"]}], MULTI_TURN]
    answers = [("5", "6"), ("It is 8.", "It is 9.")]
    for i, (prompt, pair) in enumerate(zip(prompts, answers)):
        for (ids, mask), answer in zip((parts[:2], parts[2:]), pair):
            want_ids, _ = encode_chat(tok, prompt + [{"role": "assistant", "content": answer}])
            assert ids[i].tolist() == want_ids
            assert tok.decode(ids[i][mask[i].astype(bool)]) == answer + "<|im_end|>"  # not the earlier "5"
    train, _, _ = build_preference_datasets([str(tmp_path / "p_chosen_text_document")], "1,0,0", 64, 0, (2, 0, 0))
    for i in range(2):
        item = train[i]
        d = train.pair_index(i)
        assert item["input_ids"].shape == item["labels"].shape == (2, 64)
        for side in range(2):
            labels = item["labels"][side]
            assert tok.decode(labels[labels != IGNORE_INDEX]) == answers[d][side] + "<|im_end|>"
            n = len(parts[2 * side][d])
            assert item["input_ids"][side, :n].tolist() == parts[2 * side][d].tolist()
        assert int(item["num_tokens"]) == len(parts[0][d]) + len(parts[2][d])


BAD_ROWS = [({"prompt": "q", "chosen": "a"}, "missing_answer"),
            ({"prompt": "q", "chosen": "a", "rejected": {"role": "user", "content": "b"}}, "bad_answer"),
            ({"prompt": "q", "chosen": "", "rejected": "b"}, "bad_answer"),
            ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              "chosen": "a", "rejected": "b"}, "bad_prompt"),
            ({"chosen": "a", "rejected": "b"}, "bad_prompt"),
            ('{"prompt": "unterminated', "invalid_json")]


def test_a_bad_preference_row_is_one_error_line_with_nothing_written(tiny_data, tmp_path, capsys):
    """Unlike --chat, --preference never skips: the first row that is not a usable pair is one error line
    naming file and line, with or without --strict, and nothing is written."""
    for k, (row, kind) in enumerate(BAD_ROWS):
        inp = _write(tmp_path / f"bad{k}.jsonl", [ROWS[0], ROWS[1], row, ROWS[0]])
        for strict in ([], ["--strict"]):
            out = tmp_path / f"out{k}{len(strict)}"
            out.mkdir()
            with pytest.raises(SystemExit) as e:
                preprocess_tool.main(["--preference", "--input", str(inp), "--output-prefix", str(out / "p"),
                                      "--tokenizer", str(tiny_data["tok"]), *strict])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("preprocess_data.py: error: ")
            assert f"bad{k}.jsonl:3: line {BAD_KINDS[kind]}" in err[-1]
            assert os.listdir(out) == []

    out = tmp_path / "none"
    out.mkdir()
    with pytest.raises(UserError, match="no usable documents"):
        preprocess(str(_write(tmp_path / "blank.jsonl", ["", " "])), str(out / "p"),
                   str(tiny_data["tok"]), preference=True)
    assert os.listdir(out) == []
    with pytest.raises(UserError, match="--preference"):
        preprocess(str(inp), str(out / "p"), str(tiny_data["tok"]), chat=True, preference=True)
