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
