"""HF conversion both ways: our checkpoint -> stock Llama/Mixtral (logits and greedy tokens match), HF -> ours -> HF
identical, ffn_type mlp refused with a one-line error."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from inference_utils import make_checkpoint, make_tokenizer
from megatron_lite.checkpoint.load import load_full_state_dict
from megatron_lite.inference.loading import load_model
from megatron_lite.errors import UserError
from megatron_lite.inference.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402


@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
def test_export_matches_stock_transformers(tmp_path, moe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, model, tok = make_checkpoint(tmp_path / "ckpt", moe=moe, tie_embeddings=not moe)
    convert_to_hf.main(["--load", str(ckpt), "--output", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("MixtralForCausalLM" if moe else "LlamaForCausalLM")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == tok.chat_template

    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.std() > 1.0  # logits far from uniform: the comparison below is meaningful
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = tok("The quick brown", add_special_tokens=False)["input_ids"]
    mine = generate(model, tok, [prompt], max_new_tokens=20, greedy=True, stop_at_eos=False)[0].token_ids
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      min_new_tokens=20, pad_token_id=tok.pad_token_id)
    assert out[0, len(prompt):].tolist() == mine
    assert len(set(mine)) > 3  # not a degenerate repeat-one-token path


def _tiny_hf(kind, path, tie):
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    torch.manual_seed(1)
    if kind == "mixtral":
        m = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    elif kind == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    elif kind == "qwen3_moe":
        m = Qwen3MoeForCausalLM(Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                               moe_intermediate_size=96, **common))
    else:
        m = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(path)
    make_tokenizer(path)


@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("mixtral", False), ("qwen3", True),
                                      ("qwen3_moe", False)])
def test_round_trip_hf_ours_hf_identical(tmp_path, kind, tie):
    _tiny_hf(kind, tmp_path / "hf", tie)
    convert_from_hf.main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    # The imported folder is a regular checkpoint: config, latest tag, DeepSpeed-layout files, tokenizer.
    config, sd = load_full_state_dict(tmp_path / "ckpt")
    assert config.is_moe == (kind in ("mixtral", "qwen3_moe")) and config.tie_embeddings == tie
    assert config.qk_norm == kind.startswith("qwen3")
    if config.is_moe:
        assert (tmp_path / "ckpt" / "hf_import" / "layer_1_expert_3_mp_rank_00_model_states.pt").is_file()
    convert_to_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf2")])

    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "hf", tmp_path / "hf2"))
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "num_local_experts", "num_experts_per_tok"):
        assert ca.get(key) == cb.get(key), key
    assert ca["rope_parameters"]["rope_theta"] == cb["rope_parameters"]["rope_theta"]


def test_load_model_reads_hf_folder_directly(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_hf("mixtral", tmp_path / "hf", tie=False)
    model, tok = load_model(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    assert tok.eos_token == "<|im_end|>"


def test_mlp_ffn_is_refused_with_one_line_error(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", ffn_type="mlp")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), "--load", str(ckpt),
                        "--output", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "ffn_type 'mlp'" in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_unsupported_hf_shape_refused(tmp_path):
    from megatron_lite.convert.hf import config_from_hf

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(UserError, match="mlp_bias"):
        config_from_hf({**base, "mlp_bias": True})
    with pytest.raises(UserError, match="not supported"):
        config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(UserError, match="rope scaling"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
