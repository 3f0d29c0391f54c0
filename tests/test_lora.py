"""LoRA SFT (launch/sft.py --lora-rank): only the adapters train (base bit-identical, ZeRO-2 optimizer state of
the adapters only, MoE expert adapters kept per expert under --ep 2), every reader sees the merged model, the HF
export equals the adapter model, the peft adapter folder loads in the real peft, and bad input is one line."""
import os
import sys
from pathlib import Path

import pytest
import torch

from inference_utils import make_checkpoint
from launch_utils import SMALL, metrics, run
from megatron_lite.checkpoint.layout import ZERO_SHARD_FILE, latest_tag, load_weights_only
from megatron_lite.checkpoint.load import load_full_state_dict
from megatron_lite.checkpoint.lora import LORA_KEY, read_lora_record, split_adapters
from megatron_lite.errors import UserError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert_to_hf  # noqa: E402

SEQ = SMALL[SMALL.index("--seq-length"):]  # the base checkpoints below carry the model; only the length is a flag


@pytest.fixture(scope="module")
def bases(tiny_data, tmp_path_factory):
    """Random tiny base checkpoints (dense, MoE, and a second dense one) sized for the tiny corpus' tokenizer."""
    d = tmp_path_factory.mktemp("lora_bases")
    return {"dense": make_checkpoint(d / "dense", vocab_size=448)[0],
            "moe": make_checkpoint(d / "moe", moe=True, vocab_size=448)[0],
            "other": make_checkpoint(d / "other", seed=1, vocab_size=448)[0]}


def sft_args(data, base, save, *extra) -> list:
    return ["--pretrained", base, "--tokenizer", data["tok"], "--data-path", data["sft"], *SEQ,
            "--micro-batch-size", 2, "--train-iters", 3, "--lr", "1e-2", "--save", save, *extra]


@pytest.fixture(scope="module")
def lora_dense(tiny_data, bases, tmp_path_factory):
    """One process (ZeRO falls back to stage 0 with one data-parallel rank), rank 4, alpha 8."""
    save = tmp_path_factory.mktemp("lora_dense") / "ckpt"
    run("launch/sft.py", sft_args(tiny_data, bases["dense"], save, "--lora-rank", 4, "--lora-alpha", 8))
    return save


@pytest.fixture(scope="module")
def lora_moe(tiny_data, bases, tmp_path_factory):
    """2 ranks, ZeRO-2, expert parallelism 2 (two experts per rank), default targets and alpha; stopped after
    step 2 and resumed with --load for step 3, so the checks below also cover the resumed state (DeepSpeed
    alone would restore every rank's frozen experts from rank 0's: see training/lora.restore_frozen_base)."""
    save = tmp_path_factory.mktemp("lora_moe") / "ckpt"
    args = sft_args(tiny_data, bases["moe"], save, "--lora-rank", 4, "--ep", 2, "--exit-interval", 2)
    run("launch/sft.py", args, ranks=2, launcher="torchrun")
    run("launch/sft.py", args + ["--load", save], ranks=2, launcher="torchrun")
    return save


KINDS = [pytest.param("dense"), pytest.param("moe", marks=pytest.mark.multirank)]  # the MoE run takes 2 ranks


def adapter_numel(sd: dict) -> int:
    return sum(v.numel() for k, v in sd.items() if LORA_KEY.match(k))


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_train(request, bases, kind):
    save = request.getfixturevalue(f"lora_{kind}")
    assert [m["step"] for m in metrics(save) if "loss" in m] == [1, 2, 3]
    record = read_lora_record(save)
    assert (record.rank, record.alpha, record.targets) == (4, 8.0 if kind == "dense" else 4.0,
                                                           ("q", "k", "v", "o", "gate", "up", "down"))
    assert record.experts == (kind == "moe")
    _, raw = load_full_state_dict(save, merge_lora=False)
    _, base = load_full_state_dict(bases[kind])
    frozen, adapters = split_adapters(raw)
    # The base, router and norms included, is bit-identical to --pretrained after 3 steps at lr 1e-2.
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    n_projections = 2 * (4 + (3 * 4 if kind == "moe" else 3))  # layers x (attention + FFN or 4 experts' FFN)
    assert len(adapters) == n_projections and all(b.abs().max() > 0 for _, b in adapters.values())

    tag_dir = save / latest_tag(save)
    if kind == "dense":  # one rank: torch AdamW's own state, in the model-states file
        state = load_weights_only(tag_dir / "mp_rank_00_model_states.pt")["optimizer"]["state"]
        assert sum(v["exp_avg"].numel() + v["exp_avg_sq"].numel() for v in state.values()) == 2 * adapter_numel(raw)
        return
    # ZeRO-2 optimizer state: the fp32 partitions of both ranks hold exactly the adapter elements (experts'
    # adapters unpartitioned, on the rank that owns the expert), Adam moments the same sizes.
    shards = [load_weights_only(f)["optimizer_state_dict"] for f in sorted(tag_dir.iterdir())
              if ZERO_SHARD_FILE.match(f.name)]
    assert len(shards) == 2 and all(s["zero_stage"] == 2 for s in shards)
    held = sum(t.numel() for s in shards for t in s["single_partition_of_fp32_groups"])
    padding = sum(sum(s["group_paddings"]) for s in shards)
    assert held - padding == adapter_numel(raw)
    for s in shards:
        sizes = sorted(t.numel() for t in s["single_partition_of_fp32_groups"])
        assert sorted(v["exp_avg"].numel() for v in s["base_optimizer_state"]["state"].values()) == sizes
    if kind == "moe":  # always here
        # Global experts 0 and 2 are local expert 0 of ranks 0 and 1: were their adapters reduced over the
        # data-parallel group like dense weights, the zero-initialised lora_B of both would be equal.
        b = {e: adapters[f"layers.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.up_proj"][1] for e in (0, 2)}
        assert not torch.equal(b[0], b[2])


def _double(model):
    return model.double().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_and_readers_equal_adapter_model(request, bases, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_lite.inference.loading import load_model
    from megatron_lite.training.lora import load_adapter_model

    lora_run = request.getfixturevalue(f"lora_{kind}")
    convert_to_hf.main(["--load", str(lora_run), "--output", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager")  # eager: float64
    assert type(hf).__name__ == ("MixtralForCausalLM" if kind == "moe" else "LlamaForCausalLM")
    ours = load_adapter_model(lora_run)  # peft's LoRA layers, unmerged
    merged = load_model(lora_run)[0]  # what generate, chat, serve, eval and the app load
    base = load_model(bases[kind])[0]
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float64: the merge is checked, not fp32's summation order
        ref = _double(ours)(ids).logits
        assert (_double(hf)(ids).logits - ref).abs().max() < 1e-5
        assert (_double(merged)(ids).logits - ref).abs().max() < 1e-5
        assert (_double(base)(ids).logits - ref).abs().max() > 1e-2  # the adapters do change the model


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_adapter_folder(request, bases, kind, tmp_path):
    """The real peft loads our folder on the HF export of the base and gives the adapter model's logits; for
    MoE its expert adapters sit on transformers' fused expert tensors (peft's target_parameters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_lite.training.lora import load_adapter_model

    lora_run = request.getfixturevalue(f"lora_{kind}")
    convert_to_hf.main(["--load", str(bases[kind]), "--output", str(tmp_path / "base_hf")])
    convert_to_hf.main(["--load", str(lora_run), "--output", str(tmp_path / "adapter"), "--adapter-only"])
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", experts_implementation="eager")
    peft_model = _double(PeftModel.from_pretrained(base, tmp_path / "adapter"))
    if kind == "moe":  # the experts are adapted through peft's ParamWrapper, not per-expert Linear modules
        assert sorted(peft_model.peft_config["default"].target_parameters) == ["experts.down_proj",
                                                                               "experts.gate_up_proj"]
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _double(load_adapter_model(lora_run))(ids).logits
        assert (peft_model(ids).logits - ref).abs().max() < 1e-5
        with peft_model.disable_adapter():  # the base alone is far from it: peft really applied the adapters
            assert (peft_model(ids).logits - ref).abs().max() > 1e-2


def test_fused_expert_adapter_with_gate_not_targeted():
    """With `up` adapted and `gate` not, the fused gate_up adapter's delta (computed the way peft's
    ParamWrapper reshapes A and B) is 0 on every expert's gate rows and scale-free B_up @ A_up on its up rows,
    padded to the folder's rank without changing it."""
    from megatron_lite.convert.peft_adapter import _fused_expert_adapter

    g = torch.Generator().manual_seed(0)
    num_experts, hidden, ffn, r, rank = 3, 8, 5, 2, 4
    ups = {(0, e, "up_proj"): (torch.randn(r, hidden, generator=g), torch.randn(ffn, r, generator=g))
           for e in range(num_experts)}
    a, b = _fused_expert_adapter(ups, 0, "gate_up_proj", num_experts, rank)
    assert a.shape == (num_experts * rank, hidden) and b.shape == (2 * ffn, rank * num_experts)
    delta = torch.einsum("ore,eri->eoi", b.reshape(2 * ffn, rank, num_experts), a.reshape(num_experts, rank, hidden))
    for e in range(num_experts):
        a_up, b_up = ups[(0, e, "up_proj")]
        assert torch.equal(delta[e, :ffn], torch.zeros(ffn, hidden))
        assert torch.allclose(delta[e, ffn:], b_up @ a_up, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    (["--lora-rank", "-2"], "--lora-rank must be >= 1, got -2"),
    (["--lora-rank", "4", "--lora-targets", "q,attn"], "unknown name"),
    (["--lora-rank", "4", "--lora-targets", ","], "unknown name"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-alpha", "8"], "need --lora-rank"),
    (["--lora-rank", "4", "--tp", "2"], "--lora-rank with --tp 2"),
])
def test_bad_lora_flags_one_line_before_any_work(tiny_data, bases, tmp_path, flags, message):
    from megatron_lite.training.cli import main

    with pytest.raises(UserError, match=message):
        main("sft", [str(a) for a in sft_args(tiny_data, bases["dense"], tmp_path / "out", *flags)])
    assert not (tmp_path / "out").exists()


def test_lora_target_the_model_lacks(tiny_data, bases, tmp_path):
    from megatron_lite.training.cli import main

    mlp = make_checkpoint(tmp_path / "mlp", vocab_size=448, ffn_type="mlp")[0]  # fc1/fc2, no gate/up/down
    with pytest.raises(UserError, match="this model has no gate projection"):
        main("sft", [str(a) for a in sft_args(tiny_data, mlp, tmp_path / "out", "--lora-rank", "4",
                                              "--lora-targets", "q,gate")])
    with pytest.raises(UserError, match="on an MoE model the adapters must include the experts'"):
        main("sft", [str(a) for a in sft_args(tiny_data, bases["moe"], tmp_path / "out", "--lora-rank", "4",
                                              "--lora-targets", "q,k,v,o")])
    assert not (tmp_path / "out").exists()


def _lora_checkpoint(base: Path, out: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    """A LoRA checkpoint folder as training writes it (peft names, lora_config.json), without training."""
    from megatron_lite.checkpoint.save import save_checkpoint_folder
    from megatron_lite.model.gpt import GPT
    from megatron_lite.training.lora import apply_lora, lora_from_args, write_lora_record, prepare_lora

    config, sd = load_full_state_dict(base)
    ns = type("Args", (), dict(lora_rank=rank, lora_alpha=alpha, lora_targets=None, lora_dropout=0.0, tp=1,
                               pretrained=str(base), load=None, save=None))()
    record = prepare_lora(ns, config)
    assert record.settings() == lora_from_args(ns, config).settings()
    model = GPT(config)
    model.load_state_dict(sd)
    model = apply_lora(model, record)
    save_checkpoint_folder(out, config, model.state_dict())
    write_lora_record(str(out), record)
    return out


def test_adapter_on_another_base_or_other_flags_is_refused(tiny_data, bases, tmp_path):
    from megatron_lite.training.cli import main

    lora = _lora_checkpoint(bases["dense"], tmp_path / "lora")
    resume = lambda base, *flags: main("sft", [str(a) for a in sft_args(tiny_data, base, lora, "--load", lora, *flags)])  # noqa: E731
    with pytest.raises(UserError, match="trained on another base model"):
        resume(bases["other"], "--lora-rank", "4", "--lora-alpha", "8")
    with pytest.raises(UserError, match="resume with --lora-rank 4 --lora-alpha 8 --lora-targets q,k,v,o,gate,up,down"):
        resume(bases["dense"])
    with pytest.raises(UserError, match="trained with --lora-rank 4"):
        resume(bases["dense"], "--lora-rank", "8")
    with pytest.raises(UserError, match="already holds checkpoints of LoRA adapters"):
        main("sft", [str(a) for a in sft_args(tiny_data, bases["dense"], lora)])  # a full fine-tune into it
    assert sorted(p.name for p in lora.iterdir()) == ["global_step0", "latest", "lora_config.json",
                                                      "model_config.json"]


def test_adapter_only_of_a_plain_checkpoint_is_one_line(bases, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(["--load", str(bases["dense"]), "--output", str(tmp_path / "a"), "--adapter-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds no LoRA adapters" in err[0]
    assert not (tmp_path / "a").exists()
