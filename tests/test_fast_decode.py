"""The CPU decode swap-ins (inference/fast_decode.py) give the plain model's results."""
import argparse

import pytest
import torch

from inference_utils import make_checkpoint, make_tokenizer, tiny_config, tiny_model
from megatron_lite.inference import fast_decode
from megatron_lite.inference.fast_decode import (CompiledDecoder, DecodeMoE, DecodeStep, FusedQKVAttention,
                                                 FusedSwiGLU, all_experts_moe, compile_decoder,
                                                 single_query_attention, use_decode_layout)
from megatron_lite.inference.generate import generate

TOK = make_tokenizer()
PROMPTS = ["Hello world", "The quick brown fox jumps", "你好", "def add(a, b):\n    return"]


def plain_and_fast(moe: bool, seed: int, **kw):
    plain = tiny_model(tiny_config(moe=moe, **kw), seed=seed)
    fast = tiny_model(tiny_config(moe=moe, **kw), seed=seed)
    return plain, use_decode_layout(fast)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_decode_layout_keeps_names_values_and_logits(moe):
    plain, fast = plain_and_fast(moe, seed=2)
    want_sd, got_sd = plain.state_dict(), fast.state_dict()
    assert list(got_sd) == list(want_sd) and all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    assert all(type(layer.self_attn) is FusedQKVAttention for layer in fast.layers)
    assert moe or all(type(layer.mlp) is FusedSwiGLU for layer in fast.layers)
    assert not moe or all(type(layer.mlp) is DecodeMoE for layer in fast.layers)
    if moe:  # the eval forward's expert mix (its experts' GEMMs on the decode layout), without the balancing loss
        x = torch.randn(2, 5, plain.config.hidden_size)
        with torch.no_grad():
            want, got = plain.layers[0].mlp(x), fast.layers[0].mlp(x)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        assert got[1] is None and want[1] is not None
    assert not fast.embed_tokens.weight.is_contiguous()  # column-major, read as the "NN" GEMM
    for T in (1, 7, 40):  # decode-sized inputs take the fused GEMMs, longer ones the separate projections
        ids = torch.randint(3, 300, (1, T))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=0, atol=1e-5)
    want = generate(plain, TOK, PROMPTS, max_new_tokens=12, greedy=True, stop_at_eos=False)
    got = generate(fast, TOK, PROMPTS, max_new_tokens=12, greedy=True, stop_at_eos=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


@pytest.mark.parametrize("moe,qk_norm", [(False, False), (True, False), (False, True)], ids=["dense", "moe", "qk_norm"])
def test_static_cache_step_equals_the_plain_path(moe, qk_norm):
    # DecodeStep over the whole fixed-size cache (masked) is what compile_decoder compiles; run eagerly here
    # it must give the plain model's tokens, left padding and repetition penalty included.
    plain, fast = plain_and_fast(moe, seed=3, qk_norm=qk_norm)
    want = generate(plain, TOK, PROMPTS, max_new_tokens=12, greedy=True, repetition_penalty=1.3, stop_at_eos=False)
    decoder = CompiledDecoder(fast)
    decoder.step = DecodeStep(fast)  # eager
    fast.compiled_decoder = decoder
    got = generate(fast, TOK, PROMPTS, max_new_tokens=12, greedy=True, repetition_penalty=1.3, stop_at_eos=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_single_query_attention_equals_sdpa_with_gqa_and_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.rand(3, 1, 1, 10) > 0.4
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask), want, rtol=0, atol=1e-6)


def test_all_experts_moe_equals_sparse_dispatch():
    # the compiled step runs every expert on every token with the unchosen ones weighted 0
    model = tiny_model(tiny_config(moe=True), seed=6)
    x = torch.randn(3, 5, model.config.hidden_size)
    for layer in model.layers:
        with torch.no_grad():
            want, got = layer.mlp(x)[0], all_experts_moe(layer.mlp, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_decoder_gives_the_plain_tokens(moe):
    from torch._dynamo.utils import counters
    plain, model = plain_and_fast(moe, seed=5)
    want = generate(plain, TOK, PROMPTS[:2], max_new_tokens=10, greedy=True, stop_at_eos=False)
    compile_decoder(model)
    graphs = counters["stats"]["unique_graphs"]
    got = generate(model, TOK, PROMPTS[:2], max_new_tokens=10, greedy=True, stop_at_eos=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert counters["stats"]["unique_graphs"] == graphs + 1
    # a longer generation (a cache of 2 blocks instead of 1) and another prompt length reuse that graph
    want = generate(plain, TOK, PROMPTS[2:], max_new_tokens=80, greedy=True, stop_at_eos=False)
    got = generate(model, TOK, PROMPTS[2:], max_new_tokens=80, greedy=True, stop_at_eos=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_the_model_files_know_nothing_of_the_fast_path():
    import pathlib

    import megatron_lite.model as model_pkg
    for path in pathlib.Path(model_pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        for word in ("torch.compiler", "static", "decode_layout", "qkv_t", "FUSED"):
            assert word not in text, f"{path.name} mentions {word!r}"


def test_inference_loading_picks_the_fast_path(tmp_path, monkeypatch):
    from megatron_lite.inference.cli import add_model_args, load_for_inference
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt")
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    eager, _ = load_for_inference(ap.parse_args(["--load", str(ckpt)]))
    assert fast_decode.compiled_decoder_of(eager) is None
    assert type(eager.layers[0].self_attn) is FusedQKVAttention
    monkeypatch.setattr(fast_decode.torch, "compile", lambda module, **kw: module)  # the wiring, not inductor
    fast, _ = load_for_inference(ap.parse_args(["--load", str(ckpt), "--compile"]))
    assert fast_decode.compiled_decoder_of(fast).warmed_up == {1}  # compiled at load, not in the first reply
