"""Embedded corpus: formats, held-out split by file/question, correct arithmetic, real docstrings."""
import importlib
import inspect
import json
import re
import subprocess
import sys

import pytest

from megatron_lite.data.corpus import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    counts = write_corpus(str(d), pretrain_mb=0.5, sft_arith=300, seed=0)
    rows = {k: [json.loads(line) for line in open(d / f"{k}.jsonl", encoding="utf-8")]
            for k in ("pretrain_train", "pretrain_valid", "sft_train", "sft_valid", "pref_train", "pref_valid")}
    return d, counts, rows


def test_pretraining_text(corpus):
    d, counts, rows = corpus
    train, valid = rows["pretrain_train"], rows["pretrain_valid"]
    assert train and valid and all(set(r) == {"text"} and r["text"].strip() for r in train + valid)
    size = sum(len(r["text"].encode()) for r in train + valid)
    assert 0.5e6 <= size < 0.5e6 + 400_000  # stops at the budget (+ at most one file)
    assert not {r["text"] for r in train} & {r["text"] for r in valid}
    texts = "\n".join(r["text"] for r in train + valid)
    assert "def " in texts  # stdlib source
    from pydoc_data.topics import topics
    assert topics["assert"].strip() in {r["text"] for r in train + valid}


def _qa(rows):
    return [(c[-2]["content"], c[-1]["content"]) for c in (r["conversations"] for r in rows)]


def test_arithmetic_answers_are_exact(corpus):
    _, _, rows = corpus
    n = 0
    for row in rows["sft_train"] + rows["sft_valid"]:
        conv = row["conversations"]
        assert conv[-1]["role"] == "assistant"
        for q, a in zip(conv, conv[1:]):
            m = re.search(r"(\d+) ([+*-]) (\d+)", q["content"])
            if q["role"] == "user" and m and not q["content"].startswith("What does"):
                x, op, y = int(m[1]), m[2], int(m[3])
                assert a["content"] == str({"+": x + y, "-": x - y, "*": x * y}[op])
                n += 1
    assert n >= 300


def test_no_held_out_equation_is_trained_on(tmp_path):
    """A held-out question's equation, in any wording or operand order (+, *), is in no training row."""
    from megatron_lite.data.corpus import arithmetic_key

    write_corpus(str(tmp_path), pretrain_mb=0.2, sft_arith=3000, pref_arith=1000, pretrain_arith=3000)
    rows = {k: [json.loads(line) for line in open(tmp_path / f"{k}.jsonl")]
            for k in ("pretrain_train", "pretrain_valid", "sft_train", "sft_valid", "pref_train", "pref_valid")}
    eq = re.compile(r"\d+ [-+*] \d+")

    def keys(texts):
        return {arithmetic_key(m) for t in texts for m in eq.findall(t)}

    def equation_lines(split):
        return [line for r in rows[split] for line in r["text"].splitlines() if re.fullmatch(r"\d+ [-+*] \d+ = -?\d+", line)]

    lines = equation_lines("pretrain_train")
    assert len(lines) == 3000 and not equation_lines("pretrain_valid")
    for a, op, b, c in (re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line).groups() for line in lines):
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    held = keys(next(m["content"] for m in r["conversations"] if m["role"] == "user") for r in rows["sft_valid"])
    held |= keys(r["prompt"] for r in rows["pref_valid"] if "prompt" in r)
    trained = keys(lines) | keys(m["content"] for r in rows["sft_train"] for m in r["conversations"] if m["role"] == "user")
    trained |= keys(r["prompt"] for r in rows["pref_train"] if "prompt" in r)
    assert len(held) > 100 and len(trained) > 5000 and not held & trained
    assert arithmetic_key("Compute 12 * 7.") == arithmetic_key("What is 7 * 12?") != arithmetic_key("7 - 12 = ?")


def test_stdlib_qa_uses_real_docstrings(corpus):
    _, _, rows = corpus
    qa = dict(_qa(rows["sft_train"] + rows["sft_valid"]))
    q = "What does the function `json.dumps` do?"
    assert qa[q] == inspect.getdoc(json.dumps).split("\n\n")[0].replace("\n", " ").strip()
    assert sum(k.startswith("What does") for k in qa) > 200
    train_q = {q for q, _ in _qa(rows["sft_train"])}
    assert not train_q & {q for q, _ in _qa(rows["sft_valid"])}
    assert any(k.startswith("What does") for k, _ in _qa(rows["sft_valid"]))


def test_preference_pairs(corpus):
    """Arithmetic: the exact answer over a near miss; stdlib: the real summary over its words shuffled; held
    out by the SFT rows' rule, so no held-out SFT question or function is trained on as a preference."""
    _, counts, rows = corpus
    n_arith = n_doc = 0
    for row in rows["pref_train"] + rows["pref_valid"]:
        if "prompt" in row:
            m = re.fullmatch(r"\D*?(\d+) ([+*-]) (\d+)\D*", row["prompt"])
            x, op, y = int(m[1]), m[2], int(m[3])
            assert row["chosen"] == str({"+": x + y, "-": x - y, "*": x * y}[op])
            assert row["rejected"] != row["chosen"] and 1 <= abs(int(row["rejected"]) - int(row["chosen"])) <= 100
            n_arith += 1
        else:
            (q,) = row["conversations"]
            chosen, rejected = row["chosen"]["content"], row["rejected"]["content"]
            name = re.search(r"`(.+)`", q["content"])[1]
            mod, _, attr = name.rpartition(".")
            assert chosen == inspect.getdoc(getattr(importlib.import_module(mod), attr)).split("\n\n")[0].replace(
                "\n", " ").strip()
            assert rejected != chosen and sorted(rejected.split()) == sorted(chosen.split())
            n_doc += 1
    assert n_arith == 2000 and n_doc > 200
    sft_valid_q = {c[0]["content"] if c[0]["role"] == "user" else c[1]["content"]
                   for c in (r["conversations"] for r in rows["sft_valid"])}
    sft_train_q = {q for q, _ in _qa(rows["sft_train"])}

    def question(row):
        return row["prompt"] if "prompt" in row else row["conversations"][0]["content"]

    valid_q = {question(r) for r in rows["pref_valid"]}
    train_q = {question(r) for r in rows["pref_train"]}
    assert valid_q and not valid_q & train_q
    assert not valid_q & sft_train_q and not train_q & sft_valid_q


def test_deterministic_and_cli(corpus, tmp_path):
    d, _, _ = corpus
    r = subprocess.run([sys.executable, "-m", "megatron_lite.data.corpus", "--output-dir", str(tmp_path),
                        "--pretrain-mb", "0.5", "--sft-arith", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for k in ("pretrain_train", "sft_train", "sft_valid", "pref_train", "pref_valid"):
        assert (tmp_path / f"{k}.jsonl").read_bytes() == (d / f"{k}.jsonl").read_bytes()
    r = subprocess.run([sys.executable, "-m", "megatron_lite.data.corpus", "--help"], capture_output=True, text=True)
    assert "--output-dir" in r.stdout and "--pretrain-mb" in r.stdout and "sft_train.jsonl" in r.stdout
    r = subprocess.run([sys.executable, "-m", "megatron_lite.data.corpus", "--output-dir", str(tmp_path),
                        "--pretrain-mb", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
