"""Generation: KV cache == no cache, batched left padding == one by one, streaming, stop strings, seeds, chat."""
import pytest
import torch
import torch.nn as nn

from inference_utils import make_checkpoint, make_tokenizer, tiny_config, tiny_model
from megatron_lite.inference.loading import load_model
from megatron_lite.inference.chat import build_prompt, chat, stream_chat
from megatron_lite.inference.generate import generate, stream
from megatron_lite.inference.sampling import SamplingParams, process_logits

TOK = make_tokenizer()
PROMPTS = ["Hello world", "The quick brown fox jumps", "你好", "def add(a, b):\n    return"]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request):
    return tiny_model(tiny_config(moe=request.param), seed=3)


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_full_recompute(model):
    for text in PROMPTS[:2]:
        prompt = TOK(text, add_special_tokens=False)["input_ids"]
        got = generate(model, TOK, [prompt], max_new_tokens=16, greedy=True, stop_at_eos=False)[0]
        assert got.token_ids == greedy_without_cache(model, prompt, 16)
        assert got.finish_reason == "length" and got.completion_tokens == 16


def test_batched_left_padded_equals_one_by_one(model):
    batched = generate(model, TOK, PROMPTS, max_new_tokens=16, greedy=True, stop_at_eos=False)
    lengths = {c.prompt_tokens for c in batched}
    assert len(lengths) > 1  # really padded
    for text, c in zip(PROMPTS, batched):
        alone = generate(model, TOK, [text], max_new_tokens=16, greedy=True, stop_at_eos=False)[0]
        assert c.token_ids == alone.token_ids and c.text == alone.text
    # The repetition penalty only counts a row's own prompt and output, never the padding.
    pen = generate(model, TOK, PROMPTS, max_new_tokens=8, greedy=True, repetition_penalty=1.5, stop_at_eos=False)
    for text, c in zip(PROMPTS, pen):
        alone = generate(model, TOK, [text], max_new_tokens=8, greedy=True, repetition_penalty=1.5, stop_at_eos=False)
        assert c.token_ids == alone[0].token_ids


def test_seeded_sampling_is_reproducible(model):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=1234, stop_at_eos=False)
    a, b = generate(model, TOK, PROMPTS[:2], p), generate(model, TOK, PROMPTS[:2], p)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    c = generate(model, TOK, PROMPTS[:2], SamplingParams(**{**p.__dict__, "seed": 99}))
    assert [x.token_ids for x in c] != [x.token_ids for x in a]
    # top_k = 1 is greedy whatever the seed
    k1 = generate(model, TOK, PROMPTS[:1], max_new_tokens=12, top_k=1, seed=5, stop_at_eos=False)[0].token_ids
    assert k1 == generate(model, TOK, PROMPTS[:1], max_new_tokens=12, greedy=True, stop_at_eos=False)[0].token_ids


def test_process_logits_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k2 = process_logits(logits, None, SamplingParams(top_k=2))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    p = process_logits(logits, None, SamplingParams(top_p=float(probs[0] + probs[1]) - 1e-3))
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    tiny_p = process_logits(logits, None, SamplingParams(top_p=0.01))
    assert torch.isfinite(tiny_p[0, 0]) and torch.isinf(tiny_p[0, 1:]).all()  # the best token always survives
    seen = torch.tensor([[True, False, False, True, False]])
    rp = process_logits(torch.tensor([[4.0, 3.0, 2.0, -1.0, 0.0]]), seen, SamplingParams(repetition_penalty=2.0, greedy=True))
    assert rp.tolist() == [[2.0, 3.0, 2.0, -2.0, 0.0]]


class ScriptedLM(nn.Module):
    """Emits a fixed token script whatever the input, with the GPT inference interface."""

    def __init__(self, script, vocab):
        super().__init__()
        from megatron_lite.model.gpt import GPTOutput
        self.out = GPTOutput
        self.script, self.vocab = script, vocab
        self.config = tiny_config(vocab_size=vocab, max_seq_len=256)
        self.embed_tokens = nn.Embedding(1, 1)

    def new_kv_cache(self, batch, max_len):
        class Cache:
            length = 0
        return Cache()

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None, logits_to_keep=0):
        B, T = input_ids.shape
        step = self.steps = 0 if kv_cache.length == 0 else self.steps + 1
        kv_cache.length += T
        logits = torch.full((B, T, self.vocab), -1e9)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 0.0
        return self.out(logits)


def byte_tokens(text):
    """One token per UTF-8 byte: the worst case for streaming multi-byte characters. Byte-level BPE names
    byte b by a printable character: itself when printable, else chr(256 + n) in order (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], n = chr(256 + n), n + 1
    ids = [TOK.convert_tokens_to_ids(table[b]) for b in text.encode("utf-8")]
    assert TOK.unk_token_id not in ids
    return ids


def test_streaming_never_splits_a_character():
    text = "你好🙂 café ✨!"
    script = byte_tokens(text) + [TOK.eos_token_id]
    lm = ScriptedLM(script, len(TOK))
    events = list(stream(lm, TOK, "Hi", max_new_tokens=100, greedy=True))
    deltas = [e.text for e in events]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) >= 6  # streamed piece by piece, not all at the end
    assert events[-1].finish_reason == "stop" and events[-1].completion.text == text


def test_stop_string_cuts_and_is_never_streamed():
    script = byte_tokens("Answer: 42\nUser: more") + [TOK.eos_token_id]
    lm = ScriptedLM(script, len(TOK))
    events = list(stream(lm, TOK, "Q", max_new_tokens=100, greedy=True, stop=["\nUser:"]))
    assert "".join(e.text for e in events) == "Answer: 42"
    assert events[-1].finish_reason == "stop"
    lm2 = ScriptedLM(script, len(TOK))
    c = generate(lm2, TOK, ["Q"], max_new_tokens=5, greedy=True)[0]
    assert c.text == "Answe" and c.finish_reason == "length"


def test_chat_template_and_context_truncation(model):
    conv = [{"role": "system", "content": "Be brief."}]
    for i in range(30):
        conv += [{"role": "user", "content": f"Hello world {i}"}, {"role": "assistant", "content": "I am fine."}]
    conv.append({"role": "user", "content": "The quick brown fox"})
    ids = build_prompt(TOK, conv, 60)
    text = TOK.decode(ids)
    assert len(ids) <= 60 and text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\n")
    out = chat(model, TOK, [conv, conv[:2]], max_new_tokens=8, greedy=True)
    assert len(out) == 2 and all(c.prompt_tokens + 8 <= model.config.max_seq_len for c in out)
    streamed = "".join(e.text for e in stream_chat(model, TOK, conv[:2], max_new_tokens=8, greedy=True))
    assert streamed == out[1].text


def test_load_model_from_checkpoint_and_cli(tmp_path, capsys):
    import os
    import sys
    ckpt, ref, _ = make_checkpoint(tmp_path / "ckpt", moe=True)
    model, tok = load_model(ckpt)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())  # the same weights exactly
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import generate as gen_tool
    gen_tool.main(["--load", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "6", "--greedy"])
    printed = capsys.readouterr().out
    expected = generate(model, tok, ["Hello"], max_new_tokens=6, greedy=True)[0].text
    assert printed == expected + "\n"
