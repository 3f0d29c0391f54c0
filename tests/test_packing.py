"""Packed rows (several documents per row): each document's logits and loss equal running it alone,
nothing attends across a boundary, and the backend (flash-attn varlen or the SDPA mask) is chosen right."""
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import IGNORE_INDEX, ModelConfig
from megatron_lite.model.attention import Documents, document_mask, documents, packed_attention_inputs
from megatron_lite.model.gpt import GPT

TINY = dict(vocab_size=97, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            max_seq_len=64)
T = 16
LENGTHS = [[5, 7], [16], [3, 3, 3, 2]]  # per row; row 0 and row 2 end in padding


def make(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw})).eval()


def packed_batch(seed=0):
    """(input_ids, labels, position_ids, document_ids) of LENGTHS packed into rows of T, and the documents
    as (row, start, tokens, labels): labels are a random half of the next tokens, none across a boundary."""
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    ids = torch.full((B, T), 0, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos, doc = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    docs = []
    for r, lens in enumerate(LENGTHS):
        at = 0
        for d, n in enumerate(lens, start=1):
            toks = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
            lab = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
            keep = torch.rand(n - 1, generator=g) < 0.5
            lab[:-1] = torch.where(keep, toks[1:], IGNORE_INDEX)
            ids[r, at:at + n], labels[r, at:at + n] = toks, lab
            pos[r, at:at + n], doc[r, at:at + n] = torch.arange(n), d
            docs.append((r, at, toks, lab))
            at += n
        pos[r, at:] = torch.arange(T - at)
    return ids, labels, pos, doc, docs


@pytest.mark.parametrize("kw", [{}, {"num_experts": 4, "topk": 2, "capacity_factor": 8.0}], ids=["dense", "moe"])
def test_packed_logits_and_loss_equal_each_document_alone(kw):
    model = make(**kw)
    ids, labels, pos, doc, docs = packed_batch()
    with torch.no_grad():
        out = model(ids, labels, position_ids=pos, document_ids=doc)
        n_labels = int((labels != IGNORE_INDEX).sum())
        loss_sum, worst = 0.0, 0.0
        for r, at, toks, lab in docs:
            alone = model(toks[None], lab[None])
            worst = max(worst, (out.logits[r, at:at + len(toks)] - alone.logits[0]).abs().max().item())
            k = int((lab != IGNORE_INDEX).sum())
            loss_sum += alone.loss.item() * k if k else 0.0
    assert worst < 1e-5
    assert out.loss.item() * n_labels == pytest.approx(loss_sum, rel=1e-5)


def test_packed_gradients_equal_the_sum_over_documents():
    model = make()
    ids, labels, pos, doc, docs = packed_batch(1)
    n = int((labels != IGNORE_INDEX).sum())
    packed = model(ids, labels, position_ids=pos, document_ids=doc).loss * n
    g_packed = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    total = 0
    for _, _, toks, lab in docs:
        k = int((lab != IGNORE_INDEX).sum())
        if k:
            total = total + model(toks[None], lab[None]).loss * k
    g_alone = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_packed, g_alone):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_no_token_attends_across_a_document_boundary():
    model = make()
    ids, labels, pos, doc, docs = packed_batch()
    changed = ids.clone()
    changed[0, :5] = (changed[0, :5] + 1) % TINY["vocab_size"]  # row 0's first document only
    with torch.no_grad():
        a = model(ids, position_ids=pos, document_ids=doc).logits
        b = model(changed, position_ids=pos, document_ids=doc).logits
    assert not torch.equal(a[0, :5], b[0, :5])
    assert torch.equal(a[0, 5:], b[0, 5:])  # the second document and the padding never saw the first
    assert torch.equal(a[1:], b[1:])


def test_document_mask_is_block_diagonal_causal():
    doc = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    m = document_mask(doc)
    assert m.shape == (2, 1, 7, 7)
    for b in range(2):
        for i in range(7):
            for j in range(7):
                assert m[b, 0, i, j] == (j <= i and doc[b, i] == doc[b, j])


def test_varlen_runs_from_document_ids():
    doc = torch.tensor([[1, 1, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 3, 3, 4, 4]])
    d = documents(doc)
    assert d.cu_seqlens.dtype == torch.int32 and d.max_seqlen == 8
    assert d.cu_seqlens.tolist() == [0, 2, 5, 8, 16, 17, 18, 22, 24]
    # Row boundaries cut a run even when the ids on both sides agree.
    assert documents(torch.ones(2, 4, dtype=torch.long)).cu_seqlens.tolist() == [0, 4, 8]


def test_varlen_runs_attend_like_the_sdpa_mask():
    """Attention computed run by run over cu_seqlens (what flash_attn_varlen_func does) equals the masked SDPA."""
    torch.manual_seed(0)
    ids, _, _, doc, _ = packed_batch()
    B, H, D = doc.shape[0], 4, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc))
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
    cu = documents(doc).cu_seqlens.tolist()
    runs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in flat), is_causal=True).transpose(0, 1)
            for a, b in zip(cu[:-1], cu[1:])]
    by_runs = torch.cat(runs).reshape(B, T, H, D).transpose(1, 2)
    assert (by_runs - masked).abs().max() < 1e-6


def test_packed_backend_selection():
    doc = torch.tensor([[1, 1, 2, 0]])
    assert isinstance(packed_attention_inputs(doc, True, torch.bfloat16, installed=True), Documents)
    assert isinstance(packed_attention_inputs(doc, True, torch.float16, installed=True), Documents)
    for args in ((True, torch.float32, True), (False, torch.bfloat16, True), (True, torch.bfloat16, False)):
        m = packed_attention_inputs(doc, *args[:2], installed=args[2])
        assert torch.equal(m, document_mask(doc))  # SDPA with the boolean mask
    with pytest.raises(ValueError, match="KV cache"):
        m = make()
        m(torch.ones(1, 4, dtype=torch.long), document_ids=doc, kv_cache=m.new_kv_cache(1, 8))


# ------------------------------------------------------------------------------------------ training loop

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from launch_utils import build_data

    return build_data(tmp_path_factory.mktemp("packing_data"), sft=True)


def test_loop_passes_packed_fields_and_counts_real_tokens(data, monkeypatch):
    """micro_batch hands position_ids/document_ids to the model and counts non-padding tokens; tokens/s is
    those tokens over the interval's time."""
    from megatron_lite.data.sft_dataset import build_sft_datasets
    from megatron_lite.training import loop

    ds = build_sft_datasets([data["sft"]], "1,0,0", 100, 1, (8, 0, 0))[0]
    s = loop.TrainSettings(train_iters=1, micro_batch_size=4, grad_accum=1, dp_size=2, dp_rank=1, seq_length=100, seed=1)
    mb = loop.micro_batch(ds, s, 0, 0, torch.device("cpu"))
    items = [ds[i] for i in range(4, 8)]  # dp rank 1's half of the first global batch
    assert torch.equal(mb.extra["document_ids"], torch.stack([x["document_ids"] for x in items]))
    assert torch.equal(mb.extra["position_ids"], torch.stack([x["position_ids"] for x in items]))
    real = int((mb.extra["document_ids"] > 0).sum())
    assert mb.num_tokens == real < 4 * 100 and mb.has_targets

    class Engine:  # records what the model was called with
        def __call__(self, *args, **kw):
            self.args, self.kw = args, kw
            return "out"
    e = Engine()
    assert mb.forward(e) == "out" and set(e.kw) == {"position_ids", "document_ids"}
    assert torch.equal(e.args[0], mb.input_ids) and torch.equal(e.args[1], mb.labels)

    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    interval = loop.LogInterval(s, ModelConfig(**TINY), torch.device("cpu"), None)
    out = type("Out", (), {"aux_loss": None})()
    for _ in range(2):
        interval.add_micro_batch(out, torch.tensor(1.0), torch.tensor(0.0), True, mb.num_tokens)
    interval.steps = 2
    metrics, _ = interval.row(loop.Progress(iteration=2, consumed_samples=16), {"lr": 1e-3}, None)
    assert metrics["tokens_per_s"] == pytest.approx(2 * real / 2.0)


@pytest.mark.multirank
def test_packed_sft_resume_and_eval_are_exact(data, tmp_path):
    """2-rank packed SFT: 5 steps + resume 5 == 10 straight; launch/eval.py --sft reproduces the run's eval."""
    import json
    import shutil

    from launch_utils import SMALL, losses, metrics, run

    pre = tmp_path / "pre"
    run("launch/pretrain.py", ["--model", "tiny", *SMALL, "--tokenizer", data["tok"], "--data-path", data["pt"],
                               "--train-iters", 1, "--save", pre])
    args = lambda save, *extra: ["--pretrained", pre, "--data-path", data["sft"], "--seq-length", 64,  # noqa: E731
                                 "--split", "90,10,0", "--micro-batch-size", 2, "--train-iters", 10, "--lr", "2e-3",
                                 "--save", save, "--save-interval", 5, "--eval-interval", 10, "--eval-iters", 1, *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("launch/sft.py", args(straight), ranks=2, launcher="torchrun")
    resumed.mkdir()
    for name in ("model_config.json", "tokenizer", "global_step5"):
        (shutil.copytree if (straight / name).is_dir() else shutil.copy)(straight / name, resumed / name)
    (resumed / "latest").write_text("global_step5")
    run("launch/sft.py", args(resumed, "--load", resumed), ranks=2, launcher="torchrun")
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == list(range(6, 11))
    assert all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]
    assert metrics(resumed)[-1]["eval_loss"] == metrics(straight)[-1]["eval_loss"]

    p = run("launch/eval.py", ["--load", straight, "--data-path", data["sft"], "--sft", "--split", "90,10,0",
                               "--seq-length", 64, "--micro-batch-size", 2, "--eval-iters", 1], ranks=2,
            launcher="torchrun")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(metrics(straight)[-1]["eval_loss"], abs=1e-5)
