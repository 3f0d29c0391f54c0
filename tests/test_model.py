"""Model unit tests: presets, causality, GQA, RoPE, KV cache, and equality with HF Llama on copied weights."""
import math

import pytest
import torch

from megatron_lite.config import PRESETS, ModelConfig, get_preset
from megatron_lite.errors import UserError
from megatron_lite.model.attention import apply_rope, flash_attn_eligible, rope_cos_sin
from megatron_lite.model.gpt import GPT

TINY = dict(vocab_size=97, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            max_seq_len=64)


def make(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("name,target", [("tiny", 3.64e6), ("small", 25e6), ("mini-llm", 171e6), ("mini-moe", 876e6)])
def test_preset_parameter_counts(name, target):
    assert abs(get_preset(name).num_params() - target) / target < 0.03


def test_num_params_matches_built_model():
    for name in ("tiny", "tiny-moe"):
        cfg = get_preset(name)
        assert sum(p.numel() for p in GPT(cfg).parameters()) == cfg.num_params()
    cfg = ModelConfig(**TINY, ffn_type="mlp", attention_bias=True, tie_embeddings=False)
    assert sum(p.numel() for p in GPT(cfg).parameters()) == cfg.num_params()


def test_config_json_round_trip(tmp_path):
    cfg = get_preset("tiny-moe", aux_loss_type="kl_uniform")
    cfg.save(tmp_path / "model_config.json")
    assert ModelConfig.load(tmp_path) == cfg
    with pytest.raises(UserError, match="unknown model preset"):
        get_preset("huge")
    with pytest.raises(UserError, match="num_kv_heads"):
        ModelConfig(**{**TINY, "num_kv_heads": 3})


@pytest.mark.parametrize("kw", [{}, {"ffn_type": "mlp"}, {"num_experts": 4, "topk": 2}])
def test_forward_backward_shapes(kw):
    model = make(**kw).train()
    x = torch.randint(0, 97, (3, 10))
    out = model(x, labels=x)
    assert out.logits.shape == (3, 10, 97) and out.logits.dtype == torch.float32
    total = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "w_noise" not in n)
    if kw.get("num_experts"):
        assert out.expert_counts.shape == (2, 4)
        assert out.expert_counts.sum().item() == 2 * 3 * 10 * 2  # layers * tokens * topk


def test_loss_ignores_minus_100():
    model = make()
    x = torch.randint(0, 97, (2, 8))
    labels = x.clone()
    labels[:, :5] = -100
    out = model(x, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, 5:].reshape(-1, 97), x[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("kw", [{}, {"num_experts": 4, "topk": 2}])
def test_causality(kw):
    model = make(**kw)
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 97
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(num_heads=4, num_kv_heads=2)
    mha = GPT(ModelConfig(**{**TINY, "num_kv_heads": 4})).eval()
    sd = gqa.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # (n_kv*D, C) -> each kv head serves 2 query heads
            sd[k] = v.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=0, atol=1e-5)


def test_rope_matches_complex_rotation():
    """HF rotate_half convention: dims (i, i + D/2) form the pair rotated by pos * theta^(-2i/D)."""
    B, H, T, D, theta = 1, 2, 5, 8, 10000.0
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, D, theta, torch.float64)
    got = apply_rope(x, cos, sin)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    angles = torch.tensor([[p * theta ** (-2 * i / D) for i in range(D // 2)] for p in range(T)], dtype=torch.float64)
    rz = z * torch.polar(torch.ones_like(angles), angles)
    want = torch.cat([rz.real, rz.imag], dim=-1)
    torch.testing.assert_close(got, want)
    # relative-position property: <R(p)q, R(p+k)k> depends only on the offset k
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    def dot(p1, p2):
        c1, s1 = rope_cos_sin(torch.tensor([[p1]]), D, theta, torch.float64)
        c2, s2 = rope_cos_sin(torch.tensor([[p2]]), D, theta, torch.float64)
        return (apply_rope(q.view(1, 1, 1, D), c1, s1) * apply_rope(k.view(1, 1, 1, D), c2, s2)).sum()
    torch.testing.assert_close(dot(3, 7), dot(10, 14))


@pytest.mark.parametrize("kw", [{}, {"num_experts": 4, "topk": 2}])
def test_kv_cache_decode_equals_full_forward(kw):
    model = make(**kw)
    x = torch.randint(0, 97, (2, 11))
    full = model(x).logits
    cache = model.new_kv_cache(2, 16)
    steps = [model(x[:, :6], kv_cache=cache).logits]  # prefill
    for t in range(6, 11):
        steps.append(model(x[:, t:t + 1], kv_cache=cache).logits)  # one token per step
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 11


def test_left_padded_batch_equals_unpadded():
    model = make()
    short = torch.randint(1, 97, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[:, 3:], model(short).logits, rtol=0, atol=1e-5)


def test_output_projection_init_is_depth_scaled():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = GPT(cfg)
    std = lambda t: t.float().std().item()
    assert std(model.layers[0].self_attn.q_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].self_attn.o_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * cfg.num_layers), rel=0.05)
    assert std(model.layers[0].mlp.down_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * cfg.num_layers), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama-mixtral", "qwen3"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_matches_its_stock_transformers_class(name, qk_norm, tmp_path):
    # each preset's attention/FFN/expert shapes, 2 layers deep, exported by the real converter
    from transformers import AutoModelForCausalLM

    from megatron_lite.convert.hf import hf_config_dict, save_hf_folder
    base = get_preset(name)
    cfg = get_preset(name, num_layers=2, vocab_size=512, ffn_hidden_size=min(base.ffn_hidden_size, 256), init_std=0.1,
                     qk_norm=qk_norm)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # norm weights away from 1, so a misplaced norm would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    save_hf_folder(tmp_path, cfg, model.state_dict())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == hf_config_dict(cfg)["architectures"][0]
    x = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert ours.std() > 0.5  # far from uniform: the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_presets_are_valid_configs():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.name == name and cfg.head_dim * cfg.num_heads == cfg.hidden_size


def test_flash_attn_selected_only_on_cuda_half_precision_without_mask():
    assert flash_attn_eligible(True, torch.bfloat16, False, installed=True)
    assert flash_attn_eligible(True, torch.float16, False, installed=True)
    assert not flash_attn_eligible(True, torch.float32, False, installed=True)  # fp32 -> SDPA
    assert not flash_attn_eligible(False, torch.bfloat16, False, installed=True)  # CPU -> SDPA
    assert not flash_attn_eligible(True, torch.bfloat16, True, installed=True)  # padding mask -> SDPA
    assert not flash_attn_eligible(True, torch.bfloat16, False, installed=False)  # not installed -> SDPA
