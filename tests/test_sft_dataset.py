"""SFT dataset: labels only on assistant tokens, padding/truncation, prefix forms, determinism, packing."""
import json

import numpy as np
import pytest
import torch

from megatron_lite.data.chat_format import encode_chat
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.sft_dataset import IGNORE_INDEX, build_sft_datasets
from megatron_lite.data.tokenizer import load_tokenizer, train_tokenizer
from megatron_lite.errors import UserError

CONVS = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
         for i in range(30)]
CONVS[0] = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"},
            {"role": "assistant", "content": "Tokyo."}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    train_tokenizer(iter([json.dumps(c) for c in CONVS] * 5), 400, str(d / "tok"))
    (d / "chat.jsonl").write_text("\n".join(json.dumps({"conversations": c}) for c in CONVS) + "\n")
    preprocess(str(d / "chat.jsonl"), str(d / "s"), str(d / "tok"), chat=True)
    return d, load_tokenizer(str(d / "tok"))


def test_labels_only_on_assistant_tokens(data):
    d, tok = data
    train, valid, test = build_sft_datasets([str(d / "s_text_document")], "1,0,0", 64, 1, (30, 0, 0), pack=False)
    assert valid is None and test is None
    seen = set()
    for i in range(30):
        item = train[i]
        c = train.conversation_index(i)
        seen.add(c)
        ids, mask = encode_chat(tok, CONVS[c])
        n = len(ids)
        assert item["input_ids"][:n].tolist() == ids
        assert (item["input_ids"][n:] == tok.pad_token_id).all()  # right padding with the pad id
        want = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX] * (64 - n + 1)
        assert item["labels"].tolist() == want
    assert seen == set(range(30))  # one epoch = every conversation once
    # The trained-on text of the two-turn conversation is exactly the two answers.
    j = next(i for i in range(30) if train.conversation_index(i) == 0)
    lab = train[j]["labels"]
    assert tok.decode(lab[lab != IGNORE_INDEX]) == "Paris.<|im_end|>Tokyo.<|im_end|>"


def test_truncation_and_prefix_forms(data):
    d, tok = data
    L = encode_chat(tok, CONVS[1])[1].index(1) + 1  # cuts short chats just inside their answer
    a = build_sft_datasets([str(d / "s")], "1,0,0", L, 3, (60, 0, 0), pack=False)[0]
    b = build_sft_datasets([str(d / "s_text_document")], "1,0,0", L, 3, (60, 0, 0), pack=False)[0]
    for i in range(60):  # two epochs
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        ids, _ = encode_chat(tok, CONVS[a.conversation_index(i)])
        assert x["input_ids"].tolist() == ids[:L]
    order = [a.conversation_index(i) for i in range(2 * a.n)]
    assert sorted(order[:a.n]) == sorted(order[a.n:]) and order[:a.n] != order[a.n:]


def test_split_and_seed(data):
    d, _ = data
    tr, va, te = build_sft_datasets([str(d / "s")], "80,10,10", 32, 1, (24, 3, 3), pack=False)
    assert {tr.conversation_index(i) for i in range(24)} == set(range(24))
    assert {va.conversation_index(i) for i in range(3)} == {24, 25, 26}
    other = build_sft_datasets([str(d / "s")], "80,10,10", 32, 2, (24, 0, 0), pack=False)[0]
    assert [tr.conversation_index(i) for i in range(24)] != [other.conversation_index(i) for i in range(24)]


def test_misaligned_mask_is_user_error(data, tmp_path):
    d, _ = data
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
    import shutil
    for ext in (".bin", ".idx"):
        shutil.copy(str(d / "s_text_document") + ext, str(tmp_path / "x_text_document") + ext)
    with IndexedDatasetBuilder(str(tmp_path / "x_loss_mask_document"), np.uint8) as b:
        b.add_document([1, 0])
    with pytest.raises(UserError, match="not aligned"):
        build_sft_datasets([str(tmp_path / "x")], "1,0,0", 8, 1, (1, 0, 0))


def test_conversations_truncated_before_any_answer_are_left_out(data):
    d, tok = data
    # Conversation 0 (system + two turns) is the longest; its first answer starts later than in others.
    first_answer = encode_chat(tok, CONVS[0])[1].index(1)
    L = first_answer - 1  # the window ends before conversation 0's first assistant token
    ds = build_sft_datasets([str(d / "s")], "1,0,0", L, 1, (60, 0, 0), pack=False)[0]
    assert 0 not in {ds.conversation_index(i) for i in range(60)} and ds.dropped >= 1
    assert all((ds[i]["labels"] != IGNORE_INDEX).any() for i in range(60))
    with pytest.raises(UserError, match="raise --seq-length"):
        build_sft_datasets([str(d / "s")], "1,0,0", 2, 1, (1, 0, 0))


# ------------------------------------------------------------------------------------------ packing

def test_packed_windows_hold_whole_conversations_each_once_per_epoch(data):
    d, tok = data
    L, n = 64, 80
    packed = build_sft_datasets([str(d / "s")], "1,0,0", L, 5, (n, 0, 0))[0]
    unpacked = build_sft_datasets([str(d / "s")], "1,0,0", L, 5, (20 * packed.n, 0, 0), pack=False)[0]
    epoch, seen, filled = 0, [], 0
    for i in range(n):
        item, convs = packed[i], packed.conversation_indices(i)
        at = 0
        for k, c in enumerate(convs, start=1):
            ids, mask = encode_chat(tok, CONVS[c])
            m = min(len(ids), L)
            assert item["input_ids"][at:at + m].tolist() == ids[:m]
            assert item["position_ids"][at:at + m].tolist() == list(range(m))  # restarts per conversation
            assert (item["document_ids"][at:at + m] == k).all()
            want = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(min(len(ids) - 1, L))]
            got = item["labels"][at:at + len(want)].tolist()
            assert got == want and (m == len(want) or item["labels"][at + m - 1] == IGNORE_INDEX)  # none across
            at += m
        assert int(item["num_tokens"]) == at <= L
        assert (item["document_ids"][at:] == 0).all() and (item["labels"][at:] == IGNORE_INDEX).all()
        assert (item["input_ids"][at:] == tok.pad_token_id).all()
        filled += at
        # A window keeps the order of its epoch's shuffled stream (the unpacked dataset's order).
        order = [unpacked.conversation_index(epoch * packed.n + j) for j in range(packed.n)]
        assert [order.index(c) for c in convs] == sorted(order.index(c) for c in convs)
        seen += convs
        assert len(seen) == len(set(seen)) <= packed.n  # no conversation twice within an epoch
        if len(seen) == packed.n:  # the epoch ends with a window: every conversation was in one
            epoch, seen = epoch + 1, []
    assert epoch >= 5 and filled / (n * L) > 0.7  # several conversations per window, little padding
    assert len(packed.conversation_indices(0)) > 2


def test_packed_window_is_a_pure_function_of_its_index(data):
    d, _ = data
    a = build_sft_datasets([str(d / "s")], "1,0,0", 48, 2, (200, 0, 0))[0]
    b = build_sft_datasets([str(d / "s")], "1,0,0", 48, 2, (120, 0, 0))[0]
    for i in (117, 3, 60):  # out of order, fresh dataset: as a resumed run reads them
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = build_sft_datasets([str(d / "s")], "1,0,0", 48, 3, (120, 0, 0))[0]
    assert [other.conversation_indices(i) for i in range(10)] != [b.conversation_indices(i) for i in range(10)]


def test_packed_long_conversation_is_truncated_alone(data):
    d, tok = data
    ids0, mask0 = encode_chat(tok, CONVS[0])
    L = len(ids0) - 3  # only conversation 0 is longer than the window
    ds = build_sft_datasets([str(d / "s")], "1,0,0", L, 1, (40, 0, 0))[0]
    j = next(i for i in range(40) if 0 in ds.conversation_indices(i))
    assert ds.conversation_indices(j) == [0]
    item = ds[j]
    assert item["input_ids"].tolist() == ids0[:L] and int(item["num_tokens"]) == L
    assert item["labels"].tolist() == [ids0[t + 1] if mask0[t + 1] else IGNORE_INDEX for t in range(L)]
    unpacked = build_sft_datasets([str(d / "s")], "1,0,0", L, 1, (40, 0, 0), pack=False)[0]
    k = next(i for i in range(40) if unpacked.conversation_index(i) == 0)
    assert torch.equal(unpacked[k]["input_ids"], item["input_ids"]) and torch.equal(unpacked[k]["labels"], item["labels"])
