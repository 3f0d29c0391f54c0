"""DPO: the loss and rewards against TRL's, the objective on a model, and real runs of launch/dpo.py (one
process, and two gloo ranks against it) from a short pretraining run on the session's tiny corpus."""
from __future__ import annotations

import copy
import json
import importlib.util
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_lite.config import IGNORE_INDEX, get_preset, pad_vocab_size
from megatron_lite.data.preference_dataset import build_preference_datasets
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.errors import UserError
from megatron_lite.model.gpt import GPT
from megatron_lite.training.dpo import DPOObjective, dpo_loss, pair_rows, sequence_logps

import launch_utils
from launch_utils import REPO, metrics, pretrain_args

_spec = importlib.util.spec_from_file_location("convert_to_hf", REPO / "tools" / "convert_to_hf.py")
convert_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_tool)

SEQ = 48  # long enough for every arithmetic pair and most docstring pairs of the tiny corpus


# ------------------------------------------------------------------------------------------ loss

def _trl_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, seq_len=6):
    """TRL's own DPOTrainer._compute_loss (sigmoid loss, reference log-probs precomputed) on the given
    sequence log-probs: a stand-in model returns per-token log-probs that sum to them."""
    from trl import DPOTrainer

    n = 2 * len(policy_chosen)
    completion_mask = torch.zeros(n, seq_len, dtype=torch.long)
    completion_mask[:, 2:] = 1
    per_token = torch.zeros(n, seq_len - 1)
    per_token[:, 1:] = torch.cat([policy_chosen, policy_rejected])[:, None] / (seq_len - 2)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, seq_len - 1),
                              mean_logits=torch.zeros(n, seq_len - 1),
                              is_top1=torch.zeros(n, seq_len - 1, dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                              f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
                              label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, seq_len, dtype=torch.long), "attention_mask": torch.ones(n, seq_len),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_equal_trl(beta):
    g = torch.Generator().manual_seed(0)
    logps = [-30 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4)]
    logps[0][0] = logps[1][0] = logps[2][0] = logps[3][0] = -5.0  # a tie: reward accuracy counts it as wrong
    ours, m = dpo_loss(*logps, beta)
    theirs, tm = _trl_loss(*logps, beta)
    assert abs(ours.item() - theirs.item()) < 1e-6
    for key, trl_key in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        assert abs(m[key].item() - tm[trl_key]) < 1e-6, key
    assert m["reward_accuracy"].item() < 1.0 and tm["logps/chosen"] == pytest.approx(logps[0].mean().item())


class FakeEngine:
    """What the objective uses of DeepSpeed's engine: calling it runs the model, `.module` is the model."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_objective_scores_answers_and_trains_only_the_policy(tiny_data):
    """Sequence log-probs are the log-softmax of the answer's labels summed; with the policy equal to the
    reference the loss is log 2 and every reward 0; gradients reach the policy, never the reference."""
    tok = load_tokenizer(str(tiny_data["tok"]))
    torch.manual_seed(0)
    policy = GPT(get_preset("tiny", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                            vocab_size=pad_vocab_size(len(tok))))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(tok), (3, 2, 20), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[..., 12:19] = ids[..., 13:20]
    mb = SimpleNamespace(input_ids=ids, labels=labels)
    out = DPOObjective(ref, 0.1)(FakeEngine(policy), mb)
    assert out.loss.item() == pytest.approx(np.log(2), abs=1e-6)
    assert all(abs(v.item()) < 1e-6 for k, v in out.metrics.items() if k != "reward_accuracy")
    flat_ids, flat_labels = pair_rows(ids), pair_rows(labels)
    logp = torch.log_softmax(policy(flat_ids).logits.double(), -1)
    keep = flat_labels != IGNORE_INDEX
    manual = torch.stack([logp[i][keep[i]].gather(-1, flat_labels[i][keep[i]][:, None]).sum() for i in range(6)])
    ours = sequence_logps(policy(flat_ids).logits, flat_labels)
    assert torch.allclose(ours.double(), manual, atol=1e-4)
    out.loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0


# ------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def dpo_setup(tiny_data, tmp_path_factory):
    """A short pretraining run (the DPO start and reference) and the corpus' preference pairs, preprocessed."""
    d = tmp_path_factory.mktemp("dpo")
    launch_utils.run("launch/pretrain.py", pretrain_args(tiny_data, d / "pre", 40, "--micro-batch-size", 8))
    for split in ("train", "valid"):
        preprocess(str(tiny_data["dir"] / f"pref_{split}.jsonl"), str(d / f"pref_{split}"), str(tiny_data["tok"]),
                   preference=True)
    return d


def dpo_args(d, save, *extra) -> list:
    return ["--pretrained", d / "pre", "--data-path", d / "pref_train", "--seq-length", SEQ, "--train-iters", 20,
            "--lr", "1e-2", "--beta", "0.1", "--save", save, *extra]


def heldout_pairs(d) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (2N, SEQ): every held-out pair, chosen rows first."""
    ds, _, _ = build_preference_datasets([str(d / "pref_valid")], "1,0,0", SEQ, 0, (1, 0, 0))
    ds.num_samples = len(ds.pairs)  # every pair once: the first epoch of its stream
    items = [ds[i] for i in range(len(ds.pairs))]
    return (pair_rows(torch.stack([x["input_ids"] for x in items])),
            pair_rows(torch.stack([x["labels"] for x in items])))


def heldout_margin(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean chosen-minus-rejected log-prob and the fraction of pairs preferring chosen."""
    chosen, rejected = sequence_logps(logits, labels).chunk(2)
    return (chosen - rejected).mean().item(), (chosen > rejected).float().mean().item()


@pytest.mark.e2e
def test_dpo_run_raises_heldout_margin(dpo_setup):
    d = dpo_setup
    p = launch_utils.run("launch/dpo.py", dpo_args(d, d / "dpo", "--micro-batch-size", 8))
    assert "step 20 | loss " in p.stdout + p.stderr and "| reward_margin " in p.stdout + p.stderr
    rows = metrics(d / "dpo")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for r in rows:
        assert {"loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(r)
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # step 1: the policy is the reference
    # The checkpoints as the inference tools load them, and the DPO one exported to stock transformers.
    from transformers import AutoModelForCausalLM

    from megatron_lite.inference.loading import load_model

    ids, labels = heldout_pairs(d)
    with torch.no_grad():
        before, acc_before = heldout_margin(load_model(d / "pre")[0](ids).logits, labels)
        logits = load_model(d / "dpo")[0](ids).logits
        after, acc_after = heldout_margin(logits, labels)
        convert_tool.main(["--load", str(d / "dpo"), "--output", str(d / "dpo_hf")])
        hf_logits = AutoModelForCausalLM.from_pretrained(d / "dpo_hf").eval()(ids).logits
    assert after > before + 1.0 and acc_after > acc_before + 0.1, (before, after, acc_before, acc_after)
    assert torch.allclose(hf_logits, logits, atol=1e-4)


@pytest.mark.multirank
def test_dpo_two_ranks_match_one(dpo_setup):
    """ZeRO-2 over 2 gloo ranks (micro 4 x dp 2) follows the one-process run (micro 8): same losses and rewards."""
    d = dpo_setup
    if not (d / "dpo" / "metrics.jsonl").exists():
        launch_utils.run("launch/dpo.py", dpo_args(d, d / "dpo", "--micro-batch-size", 8))
    launch_utils.run("launch/dpo.py", dpo_args(d, d / "dpo2", "--micro-batch-size", 4, "--exit-interval", 3),
                     ranks=2, launcher="torchrun")
    one, two = metrics(d / "dpo")[:3], metrics(d / "dpo2")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for k in ("loss", "reward_margin", "reward_accuracy", "reward_chosen"):
            assert b[k] == pytest.approx(a[k], abs=2e-5), (k, a, b)


def test_dpo_flag_errors_before_any_work(tiny_data, tmp_path):
    """Bad --beta, --ref or --data-path: a UserError (one line from the script) before any rank starts."""
    from inference_utils import make_checkpoint
    from megatron_lite.training.cli import main

    make_checkpoint(tmp_path / "ckpt")
    make_checkpoint(tmp_path / "other", vocab_size=448)
    base = ["--pretrained", str(tmp_path / "ckpt"), "--data-path", tiny_data["sft"], "--train-iters", "1",
            "--seq-length", "32"]
    with pytest.raises(UserError, match="--beta must be > 0"):
        main("dpo", base + ["--beta", "0"])
    with pytest.raises(UserError, match="--ref .*missing"):
        main("dpo", base + ["--ref", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="vocab_size 448 differs"):
        main("dpo", base + ["--ref", str(tmp_path / "other")])
    with pytest.raises(UserError, match="sft_text_document_chosen_text_document"):  # SFT data, not pairs
        main("dpo", base)


@pytest.mark.multirank
def test_moe_reference_on_two_expert_parallel_ranks(tiny_data, tmp_path):
    """--ep 2: the reference's experts are split and exchanged like the policy's (DeepSpeed-MoE groups handed
    to it), so before any update the policy and reference agree exactly in eval mode: loss log 2, rewards 0."""
    from inference_utils import make_checkpoint

    make_checkpoint(tmp_path / "moe", moe=True)
    rows = [json.loads(line) for line in open(tiny_data["dir"] / "pref_train.jsonl")][:64]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess(str(tmp_path / "p.jsonl"), str(tmp_path / "p"), str(tmp_path / "moe" / "tokenizer"), preference=True)
    launch_utils.run("launch/dpo.py", ["--pretrained", tmp_path / "moe", "--data-path", tmp_path / "p", "--ep", 2,
                                       "--seq-length", SEQ, "--micro-batch-size", 2, "--train-iters", 1, "--lr", 0,
                                       "--eval-interval", 1, "--eval-iters", 2, "--split", "90,10,0",
                                       "--save", tmp_path / "dpo"], ranks=2, launcher="torchrun")
    (row,) = metrics(tmp_path / "dpo")
    assert row["eval_loss"] == pytest.approx(np.log(2), abs=1e-6) and row["eval_reward_margin"] == 0.0
    assert row["eval_reward_chosen"] == row["eval_reward_rejected"] == 0.0 and "expert_load" in row
