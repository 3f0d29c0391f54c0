"""Training engine: real runs of launch/pretrain.py, sft.py and eval.py (1 process and 2 gloo ranks).

One tiny corpus, tokenizer and a handful of short runs are shared by the whole module; each run is
checked for several things (losses, files, resume, parallel equivalence) so the module stays fast.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.load import check_checkpoint_dir
from megatron_lite.checkpoint.save import save_training_checkpoint
from megatron_lite.config import ModelConfig, get_preset, pad_vocab_size
from megatron_lite.errors import UserError
from megatron_lite.parallel import bf16_supported
from megatron_lite.training.ds_config import load_ds_config, lr_settings, resolve_ds_config
from megatron_lite.training.engine import param_groups
from megatron_lite.training.schedule import lr_at

import launch_utils
from launch_utils import REPO, SMALL, copy_at, losses, metrics, pretrain_args
from launch_utils import env as _env


def run(script: str, args: list, ranks: int = 1, check: bool = True, launcher: str = "torchrun", **env):
    """Extra 2-rank runs here use torchrun (a few seconds less start-up than the deepspeed launcher)."""
    return launch_utils.run(script, args, ranks, check, launcher, **env)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def dense2(data, tmp_path_factory):
    """2-rank ZeRO-2 dense run of 30 steps (micro 2 x dp 2), saved every 10, with an eval and wandb offline."""
    save = tmp_path_factory.mktemp("dense2") / "ckpt"
    run("launch/pretrain.py", pretrain_args(data, save, 30, "--micro-batch-size", 2, "--save-interval", 10,
                                            "--eval-interval", 30, "--eval-iters", 1, "--wandb-project", "mlite-test"),
        ranks=2, launcher="deepspeed", WANDB_MODE="offline", TORCH_EXTENSIONS_DIR=str(save.parent / "ext"))
    return save


@pytest.fixture(scope="module")
def moe2(data, tmp_path_factory):
    """2-rank MoE run, 4 experts, top-2, ep 2: two experts per rank."""
    save = tmp_path_factory.mktemp("moe2") / "ckpt"
    args = ["--model", "tiny-moe", *SMALL, "--num-experts", 4, "--topk", 2, "--ep", 2, "--tokenizer", data["tok"],
            "--data-path", data["pt"], "--train-iters", 6, "--micro-batch-size", 2, "--save", save,
            "--save-interval", 3]
    run("launch/pretrain.py", args, ranks=2)
    return save, args


# ------------------------------------------------------------------------------------------ unit

def test_training_clock_counts_each_logged_interval_at_its_own_rate():
    from megatron_lite.training.monitor import training_clock

    rows = [{"step": 5, "loss": 1.0, "tokens_per_s": 100.0}, {"step": 7, "eval_loss": 2.0},
            {"step": 10, "loss": 0.5, "tokens_per_s": 50.0}, {"step": 12, "loss": 0.4, "tokens_per_s": 0}]
    # 5 steps x 10 tokens at 100 tok/s, then 5 more at 50 tok/s; the eval row and a rate of 0 add no time.
    assert training_clock(rows, tokens_per_step=10) == {5: 0.5, 10: 1.5}


def test_schedule_warmup_then_cosine_to_floor():
    assert lr_at(0, 1.0, 0.1, 4, 20) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 0.1, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(20, 1.0, 0.1, 4, 20) == lr_at(99, 1.0, 0.1, 4, 20) == pytest.approx(0.1)


def test_loop_decides_log_save_and_stop_steps(tmp_path):
    from megatron_lite.training.loop import (Progress, TrainSettings, check_bad_streak, is_log_step, is_save_step,
                                             should_stop)

    s = TrainSettings(train_iters=10, micro_batch_size=2, grad_accum=1, dp_size=1, dp_rank=0, seq_length=8, seed=0,
                      log_interval=3, save_interval=4, save_dir=str(tmp_path), exit_interval=5, max_bad_steps=2)
    assert [it for it in range(1, 11) if is_log_step(it, s)] == [3, 6, 9, 10]  # and always the last step
    assert [it for it in range(1, 11) if is_save_step(it, s)] == [4, 8, 10]
    assert not any(is_save_step(it, TrainSettings(**{**vars(s), "save_dir": None})) for it in range(1, 11))
    cpu = torch.device("cpu")
    assert [should_stop(it, s, None, cpu) for it in (4, 5, 10)] == [None, "exiting at step 5 (--exit-interval 5)", None]
    p = Progress(iteration=3, consumed_samples=6)
    for skipped in (True, False, True, True):
        p.advance(s.global_batch, skipped)
    assert (p.iteration, p.consumed_samples, p.skipped_steps, p.bad_streak) == (7, 14, 3, 2)
    (tmp_path / "latest").write_text("global_step4")
    with pytest.raises(UserError, match="stopped at step 7: 2 consecutive") as e:
        check_bad_streak(p, s)
    assert f"the last checkpoint is {tmp_path}/global_step4" in str(e.value)


def test_ds_config_flags_override_json_and_batch_checks():
    base = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    cfg = resolve_ds_config(base, dp=2, micro_batch_size=3, global_batch_size=24, lr=5e-4, min_lr=5e-5,
                            warmup_iters=7, train_iters=100)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (3, 4, 24)
    assert cfg["optimizer"]["params"]["lr"] == 5e-4
    assert lr_settings(cfg) == dict(max_lr=5e-4, min_lr=pytest.approx(5e-5), warmup_iters=7, decay_iters=100,
                                   style="cosine", wsd_decay_frac=0.0)
    assert cfg["bf16"]["enabled"] is bf16_supported()  # "auto" resolved: False on CPU
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["contiguous_gradients"]
    # One data-parallel rank: nothing to partition, so ZeRO's copies are skipped (stage 0, same math).
    assert resolve_ds_config(base, dp=1)["zero_optimization"] == {"stage": 0}
    with pytest.raises(UserError, match="not divisible"):
        resolve_ds_config(base, dp=2, micro_batch_size=4, global_batch_size=12)
    with pytest.raises(UserError, match="inconsistent"):
        resolve_ds_config({**base, "train_batch_size": 7, "gradient_accumulation_steps": 1}, dp=1)
    with pytest.raises(UserError, match="!="):
        resolve_ds_config(base, dp=1, micro_batch_size=2, grad_accum=2, global_batch_size=8)


def test_param_groups_no_decay_on_norms_biases_embeddings():
    from megatron_lite.model.gpt import GPT

    cfg = get_preset("tiny", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                     vocab_size=128, ffn_type="mlp")  # mlp FFN has biases
    model = GPT(cfg)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay, embedding = ({names[id(p)] for p in groups[k]["params"]}
                                  for k in ("no_decay", "decay", "embedding"))
    assert groups["no_decay"]["weight_decay"] == groups["embedding"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1
    assert embedding == {"embed_tokens.weight"} and "norm.weight" in no_decay
    assert any(n.endswith("bias") for n in no_decay) and not any(n.endswith("bias") for n in decay)
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert len(no_decay) + len(decay) + len(embedding) == len(list(model.parameters()))


def test_zero_init_output_makes_every_block_the_identity():
    """--zero-init-output zeroes o_proj and down_proj (dense and every expert) and nothing else, so the
    fresh model's logits are the head of the final norm of the embeddings alone."""
    from megatron_lite.model.gpt import GPT
    from megatron_lite.training.engine import zero_output_projections

    for cfg in (get_preset("tiny", vocab_size=128), get_preset("tiny-moe", vocab_size=128, tie_embeddings=False)):
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        zero_output_projections(model)
        zeroed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert zeroed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in zeroed)
        assert len(zeroed) == cfg.num_layers * (1 + max(1, cfg.num_experts))
        ids = torch.randint(0, 128, (2, 16))
        with torch.no_grad():
            head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
            expected = model.norm(model.embed_tokens(ids)) @ head.T
            assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_latest_never_names_a_partial_checkpoint(tmp_path):
    """A save that dies half way leaves `latest` on the previous complete step; the next save of the same
    step replaces the debris."""
    class Engine:
        fail = False
        device = torch.device("cpu")

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            assert not save_latest  # DeepSpeed must not write `latest` itself
            d = Path(save_dir) / tag
            d.mkdir(parents=True)
            if self.fail:
                (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
                raise KeyboardInterrupt  # killed mid-write
            torch.save({"module": {"w": torch.full((2,), float(client_state["it"]))}}, d / "mp_rank_00_model_states.pt")

    e = Engine()
    assert save_training_checkpoint(e, str(tmp_path), 10, {"it": 10}) == "global_step10"
    e.fail = True
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(e, str(tmp_path), 20, {"it": 20})
    assert (tmp_path / "latest").read_text() == "global_step10" and not (tmp_path / "global_step20").exists()
    assert check_checkpoint_dir(str(tmp_path)) == "global_step10"
    e.fail = False
    save_training_checkpoint(e, str(tmp_path), 20, {"it": 20})
    assert (tmp_path / "latest").read_text() == "global_step20"
    saved = torch.load(tmp_path / "global_step20" / "mp_rank_00_model_states.pt")
    assert saved["module"]["w"].tolist() == [20.0, 20.0]
    assert not list(tmp_path.glob("tmp-*"))


# ------------------------------------------------------------------------------------------ dense, 2 ranks

@pytest.mark.multirank
def test_zero2_two_ranks_trains_and_writes_checkpoint(dense2, data):
    m = [x for x in metrics(dense2) if "loss" in x]
    assert [x["step"] for x in m] == list(range(1, 31))
    first, last = sum(x["loss"] for x in m[:5]) / 5, sum(x["loss"] for x in m[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert all(x["grad_norm"] > 0 and x["tokens_per_s"] > 0 for x in m)
    assert m[0]["lr"] == pytest.approx(1.5e-3) and m[1]["lr"] == pytest.approx(3e-3)  # warmup 2
    assert "eval_loss" in metrics(dense2)[-1] and metrics(dense2)[-1]["eval_ppl"] > 1
    # DeepSpeed layout: latest -> global_step30 with one ZeRO shard per data-parallel rank.
    assert (dense2 / "latest").read_text() == "global_step30"
    step = dense2 / "global_step30"
    assert (step / "mp_rank_00_model_states.pt").exists()
    assert sorted(p.name for p in step.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list(dense2.glob("tmp-*"))  # temporary tags were renamed
    # DeepSpeed's JIT-built shm all-reduce op is switched off (megatron_lite/ds_runtime.py): nothing compiled
    assert not (dense2.parent / "ext").exists()
    # Self-describing folder: padded vocab from the tokenizer, the tokenizer itself, configs, args.
    from megatron_lite.data.tokenizer import load_tokenizer
    cfg = ModelConfig.load(dense2)
    assert cfg.vocab_size == pad_vocab_size(len(load_tokenizer(str(data["tok"]))))
    assert len(load_tokenizer(str(dense2 / "tokenizer"))) == len(load_tokenizer(str(data["tok"])))
    ds = json.loads((dense2 / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert json.loads((dense2 / "args.json").read_text())["train_iters"] == 30
    client = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["iteration"] == 30 and client["consumed_samples"] == 120
    assert set(client["rng"]) >= {"python", "numpy", "torch"} and client["model_config"] == cfg.to_dict()


@pytest.mark.multirank
def test_wandb_offline_run_folder(dense2):
    runs = list((dense2 / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("*.wandb")  # the record log `wandb sync` uploads (protobuf: keys are plain bytes)
    raw = log.read_bytes()
    assert raw.count(b"tokens_per_s") >= 30 and raw.count(b"grad_norm") >= 30  # one history row per step
    assert b"eval_ppl" in raw and b"mfu" in raw
    assert all(k in raw for k in (b"ds_config", b"zero_optimization", b"parallel", b"num_layers"))  # run config


@pytest.mark.multirank
def test_resume_dense_two_ranks_is_exact(dense2, data, tmp_path):
    resumed = copy_at(dense2, tmp_path / "resumed", 20)
    run("launch/pretrain.py", pretrain_args(data, resumed, 30, "--micro-batch-size", 2, "--load", resumed,
                                            "--eval-interval", 30, "--eval-iters", 1), ranks=2)
    straight, again = losses(dense2), losses(resumed)
    assert sorted(again) == list(range(21, 31))
    assert all(again[s] == straight[s] for s in again), [(s, again[s], straight[s]) for s in again]
    assert metrics(resumed)[-1]["eval_loss"] == metrics(dense2)[-1]["eval_loss"]


@pytest.mark.multirank
def test_zero2_dp2_matches_one_process_same_global_batch(dense2, data, tmp_path):
    """dp 2 x micro 2 vs 1 process x micro 2 x grad-accum 2: the same 4 samples per step."""
    one = tmp_path / "one"
    run("launch/pretrain.py", pretrain_args(data, one, 30, "--micro-batch-size", 2, "--grad-accum", 2,
                                            "--exit-interval", 10))
    a, b = losses(dense2), losses(one)
    assert sorted(b) == list(range(1, 11))
    assert max(abs(a[s] - b[s]) for s in b) < 1e-5, [(s, a[s], b[s]) for s in b]
    assert (one / "latest").read_text() == "global_step10"  # --exit-interval saved before stopping
    assert all(x["grad_norm"] > 0 for x in metrics(one))  # stage 0 (dp=1) reports the norm too


def test_compile_flag_trains_the_same_model(dense2, data, tmp_path):
    """--compile changes kernels, not math: losses match the eager 2-rank run, checkpoint names unchanged."""
    compiled = tmp_path / "compiled"
    run("launch/pretrain.py", pretrain_args(data, compiled, 30, "--micro-batch-size", 2, "--grad-accum", 2,
                                            "--exit-interval", 3, "--compile"))
    a, b = losses(dense2), losses(compiled)
    assert sorted(b) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in b) < 1e-4, [(s, a[s], b[s]) for s in b]
    from megatron_lite.checkpoint.load import load_full_state_dict

    _, sd = load_full_state_dict(compiled)
    _, ref = load_full_state_dict(dense2, "global_step10")
    assert sorted(sd) == sorted(ref)


@pytest.mark.multirank
def test_eval_matches_training_eval(dense2, data):
    p = run("launch/eval.py", ["--load", dense2, "--data-path", data["pt"], "--seq-length", 32,
                               "--micro-batch-size", 4, "--eval-iters", 1])
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["split"] == "valid" and result["step"] == 30
    assert result["loss"] == pytest.approx(metrics(dense2)[-1]["eval_loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------ MoE, ep 2

@pytest.mark.multirank
def test_moe_ep2_expert_files_and_load_metrics(moe2):
    save, _ = moe2
    step = save / "global_step6"
    experts = sorted(p.name for p in step.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert experts == sorted(f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4))
    m = metrics(save)
    assert [x["step"] for x in m] == list(range(1, 7))
    for x in m:
        assert x["aux_loss"] > 0
        load = torch.tensor(x["expert_load"])
        assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.ones(2))


@pytest.mark.multirank
def test_resume_moe_ep2_is_exact(moe2, tmp_path):
    save, args = moe2
    resumed = copy_at(save, tmp_path / "resumed", 3)
    args = [a if a != save else resumed for a in args] + ["--load", resumed]
    run("launch/pretrain.py", args, ranks=2)
    straight, again = losses(save), losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == straight[s] for s in again), [(s, again[s], straight[s]) for s in again]


# ------------------------------------------------------------------------------------------ SFT

def test_sft_loss_is_cross_entropy_on_assistant_tokens_only(data):
    """The SFT item for a crafted conversation trains exactly on the assistant reply (+ its <|im_end|>):
    the model's loss equals CE over those positions, and the gradient ignores every other label."""
    from megatron_lite.data.sft_dataset import IGNORE_INDEX, build_sft_datasets
    from megatron_lite.data.tokenizer import load_tokenizer
    from megatron_lite.model.gpt import GPT

    d = data["dir"] / "crafted"
    d.mkdir(exist_ok=True)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
            {"role": "assistant", "content": "It is 8."}]
    (d / "c.jsonl").write_text(json.dumps({"conversations": conv}) + "\n")
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(d / "c.jsonl"), "--output-prefix",
                    str(d / "c"), "--tokenizer", str(data["tok"]), "--chat"], cwd=REPO, env=_env(), check=True,
                   capture_output=True)
    tok = load_tokenizer(str(data["tok"]))
    train, _, _ = build_sft_datasets([str(d / "c_text_document")], "1,0,0", 256, 0, (1, 0, 0))
    item = train[0]
    trained = item["labels"][item["labels"] != IGNORE_INDEX]
    assert tok.decode(trained) == "5<|im_end|>It is 8.<|im_end|>"

    torch.manual_seed(0)
    model = GPT(get_preset("tiny", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                           vocab_size=pad_vocab_size(len(tok))))
    ids, labels = item["input_ids"][None], item["labels"][None]
    out = model(ids, labels)
    keep = labels[0] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(out.logits[0][keep], labels[0][keep])
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=0)  # up to the order of the mean's sum
    # Gradient of the SFT loss w.r.t. the logits is zero at every non-assistant position.
    logits = out.logits.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE_INDEX).backward()
    assert logits.grad[0][~keep].abs().max() == 0 and logits.grad[0][keep].abs().max() > 0


@pytest.mark.multirank
def test_sft_from_pretrained_checkpoint(dense2, data, tmp_path):
    save = tmp_path / "sft"
    run("launch/sft.py", ["--pretrained", dense2, "--seq-length", 128, "--data-path", data["sft"], "--micro-batch-size", 4,
                          "--train-iters", 8, "--lr", "2e-3", "--save", save, "--eval-interval", 8, "--eval-iters", 1])
    m = [x for x in metrics(save) if "loss" in x]
    assert [x["step"] for x in m] == list(range(1, 9)) and m[0]["lr"] == pytest.approx(2e-3)
    assert sum(x["loss"] for x in m[-3:]) < sum(x["loss"] for x in m[:3])
    assert ModelConfig.load(save) == ModelConfig.load(dense2) and (save / "tokenizer").is_dir()
    assert (save / "latest").read_text() == "global_step8"
    # Started from the pretrained weights, not a fresh init: a fresh model's first loss is ~ln(vocab).
    cfg = ModelConfig.load(dense2)
    assert m[0]["loss"] < 0.9 * torch.log(torch.tensor(float(cfg.vocab_size))).item()


# ------------------------------------------------------------------------------------------ user errors

def test_user_error_is_one_line_exit_2(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = run("launch/pretrain.py", ["--tokenizer", data["tok"], "--data-path", data["pt"], "--train-iters", 1,
                                   "--deepspeed", bad], check=False)
    assert p.returncode == 2 and "is not valid JSON" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("extra, message", [
    (["--seq-length", "4096"], "exceeds the model's max_seq_len"),
    (["--load", "/nonexistent/ckpt"], "does not exist"),
    (["--micro-batch-size", "4", "--global-batch-size", "6"], "not divisible"),
    (["--tp", "2"], "not divisible by --tp"),
    (["--ep", "2"], "needs an MoE model"),
    (["--train-iters", "0"], "--train-iters must be >= 1"),
])
def test_user_errors_before_any_work(data, extra, message):
    """Raised in the launching process before DeepSpeed starts (checked in-process: no ranks needed)."""
    from megatron_lite.training.cli import main

    with pytest.raises(UserError, match=message):
        main("pretrain", ["--tokenizer", str(data["tok"]), "--data-path", data["pt"], "--train-iters", "1", *extra])


@pytest.mark.multirank
@pytest.mark.parametrize("extra, message", [
    (["--model", "small"], "--model small differs from the model in --pretrained"),
    (["--num-layers", "3"], "--num-layers 3 differs from the model in --pretrained"),
    (["--no-qk-norm"], "--no-qk-norm differs from the model in --pretrained"),
])
def test_sft_refuses_model_flags_that_contradict_pretrained(dense2, data, extra, message):
    """SFT takes its model from --pretrained: a shape flag that disagrees is one error, not silently ignored."""
    from megatron_lite.training.cli import main

    with pytest.raises(UserError, match=message):
        main("sft", ["--pretrained", str(dense2), "--data-path", data["sft"], "--train-iters", "1", *extra])


@pytest.mark.multirank
def test_load_of_a_different_model_is_refused(dense2, data):
    from megatron_lite.training.cli import main

    with pytest.raises(UserError, match="different model"):
        main("pretrain", ["--tokenizer", str(data["tok"]), "--data-path", data["pt"], "--train-iters", "1",
                          "--load", str(dense2)])  # default tiny preset != the small model saved there
