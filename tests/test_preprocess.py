"""tools/preprocess_data.py and megatron_lite.data.preprocess: exact round trips, bad-line accounting,
--strict atomicity, --chat, inputs."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_lite.data.chat_format import encode_chat
from megatron_lite.data.indexed_dataset import IndexedDataset, read_meta
from megatron_lite.data.preprocess import BAD_KINDS, TextEncoder
from megatron_lite.data.tokenizer import load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools/preprocess_data.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

GOOD = ["hello world", "中文文本，还有标点。", "emoji 😀🦄 mixed 你好", "x" * 3000, "  leading\nand\ttabs  "]
# (raw line bytes, kind it must be counted as)
BAD = [(b'{"text": ""}', "empty_text"), (b'{"other": "x"}', "missing_key"), (b'{"text": 3}', "not_string"),
       (b'["text"]', "not_object"), (b'{"text": "unterminated', "invalid_json"),
       (b'{"text": "\xff\xfe bad"}', "invalid_utf8"), (b'{"text": "lone \\ud800"}', "invalid_utf8")]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(GOOD * 20 + ["def f(x): return x"] * 20), 400, str(d))
    return str(d)


def make_input(path, with_bad=True):
    """Interleave good and bad lines; return the line numbers expected per bad kind."""
    lines, expected = [], {}
    for i, text in enumerate(GOOD):
        lines.append(json.dumps({"text": text}, ensure_ascii=False).encode())
        if with_bad and i < len(BAD):
            lines.append(BAD[i][0])
            expected.setdefault(BAD[i][1], []).append(len(lines))
    if with_bad:
        for raw, kind in BAD[len(GOOD):]:
            lines.append(raw)
            expected.setdefault(kind, []).append(len(lines))
        lines.append(b"   ")  # blank lines are ignored, not errors
    data = b"\n".join(lines) + b"\n"
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    open(path, "wb").write(data)
    return expected


def run(args):
    return tool.main([str(a) for a in args])


def test_ascii_texts_skip_nfkc_with_the_same_ids(tok_dir):
    from tokenizers import Tokenizer
    backend = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    encoder = TextEncoder(backend)
    twin = encoder.ascii_backend
    assert type(backend.normalizer).__name__ == "NFKC" and twin is not None and twin.normalizer is None
    texts = GOOD + ["ﬁne ligature, ＦＵＬＬ width"]  # NFKC changes the last one: it must keep the normalizer
    ids, rejected = encoder.encode(texts + ["lone \ud800"])
    assert ids[:-1] == [backend.encode(t, add_special_tokens=False).ids for t in texts] and rejected == [len(texts)]
    assert twin.encode("ﬁne", add_special_tokens=False).ids != backend.encode("ﬁne", add_special_tokens=False).ids


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_and_bad_line_counts(tmp_path, tok_dir, workers):
    inp = tmp_path / "in.jsonl"
    expected = make_input(inp)
    out = tmp_path / "out" / "p"
    stats = run(["--input", inp, "--output-prefix", out, "--tokenizer", tok_dir, "--append-eod",
                 "--workers", workers, "--batch-size", 2])
    tok = load_tokenizer(tok_dir)
    ds = IndexedDataset(f"{out}_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eos_token_id] for t in GOOD]
    assert stats["skipped"] == {k: len(v) for k, v in expected.items()}
    assert stats["blank_lines"] == 1
    meta = read_meta(f"{out}_text_document")
    assert meta["max_token_id"] == max(int(ds[i].max()) for i in range(len(ds)))
    assert meta["vocab_size"] == len(tok) and meta["eod_id"] == 2


def test_megatron_core_reads_preprocessed(tmp_path, tok_dir):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MCore
    inp = tmp_path / "in.jsonl.gz"
    make_input(inp, with_bad=False)
    run(["--input", inp, "--output-prefix", tmp_path / "p", "--tokenizer", tok_dir])
    ours, theirs = IndexedDataset(f"{tmp_path}/p_text_document"), MCore(f"{tmp_path}/p_text_document")
    assert len(theirs) == len(GOOD)
    tok = load_tokenizer(tok_dir)
    for i, t in enumerate(GOOD):
        assert theirs[i].tolist() == ours[i].tolist() == tok.encode(t)


@pytest.mark.parametrize("raw,kind", BAD)
def test_strict_one_line_error_and_no_files(tmp_path, tok_dir, raw, kind, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"text": "fine"}\n' * 3 + raw + b"\n" + b'{"text": "after"}\n')
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        run(["--input", inp, "--output-prefix", out / "p", "--tokenizer", tok_dir, "--strict",
             "--batch-size", 2])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preprocess_data.py: error: ") and f"in.jsonl:4: line {BAD_KINDS[kind]}" in err[-1]
    assert os.listdir(out) == []  # no partial or temporary files


def test_all_lines_bad_is_an_error(tmp_path, tok_dir):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"body": "x"}\n')
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(inp), "--output-prefix",
                        str(tmp_path / "p"), "--tokenizer", tok_dir], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "no usable documents" in r.stderr and "missing_key=1 (line 1)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("preprocess_data.py: error:")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("p_")]


def test_parquet_input_and_multiple_keys(tmp_path, tok_dir):
    import datasets
    rows = {"text": GOOD, "title": [t[:5] + "!" for t in GOOD]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "in.parquet"))
    run(["--input", tmp_path / "in.parquet", "--output-prefix", tmp_path / "p", "--tokenizer", tok_dir,
         "--json-keys", "text", "title"])
    tok = load_tokenizer(tok_dir)
    for key in ("text", "title"):
        ds = IndexedDataset(f"{tmp_path}/p_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in rows[key]]


def test_chat_mode_aligned_mask(tmp_path, tok_dir):
    convs = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"from": "system", "value": "be nice"}, {"from": "human", "value": "你好"},
         {"from": "gpt", "value": "你好!😀"}],
    ]
    lines = [json.dumps({"conversations": c}, ensure_ascii=False) for c in convs]
    lines.insert(1, json.dumps({"conversations": [{"role": "user", "content": "no answer"}]}))
    lines.insert(1, json.dumps({"conversations": [{"role": "alien", "content": "x"}]}))
    inp = tmp_path / "chat.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = run(["--input", inp, "--output-prefix", tmp_path / "s", "--tokenizer", tok_dir, "--chat"])
    assert stats["skipped"] == {"bad_conversation": 1, "no_assistant": 1}
    tok = load_tokenizer(tok_dir)
    ids = IndexedDataset(f"{tmp_path}/s_text_document")
    mask = IndexedDataset(f"{tmp_path}/s_loss_mask_document")
    assert mask.dtype == np.uint8 and len(ids) == len(mask) == 2
    for i, c in enumerate(convs):
        want_ids, want_mask = encode_chat(tok, c)
        assert ids[i].tolist() == want_ids and mask[i].tolist() == want_mask
    assert tok.decode(ids[1][mask[1].astype(bool)]) == "你好!😀<|im_end|>"


def test_strict_with_workers_stops_and_cleans_up(tmp_path, tok_dir, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"text": "fine"}\n' * 50 + b'{"text": 7}\n' + b'{"text": "more"}\n' * 50)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit):
        run(["--input", inp, "--output-prefix", out / "p", "--tokenizer", tok_dir, "--strict",
             "--workers", 2, "--batch-size", 8])
    assert "in.jsonl:51: line has a non-string value" in capsys.readouterr().err
    assert os.listdir(out) == []
