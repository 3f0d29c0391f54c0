"""Direct Preference Optimization (Rafailov et al. 2023) on the training loop of pretraining and SFT.

Each micro-batch holds (chosen, rejected) pairs (data/preference_dataset.py). The policy (the model being
trained, started from --pretrained) and a frozen reference model (--ref, default --pretrained) each score
both answers: the log-probability of the answer's tokens given the prompt, summed over the answer. With
log-ratios r_c = policy_c - ref_c and r_r = policy_r - ref_r, the sigmoid loss is

    loss = mean over pairs of -log sigmoid(beta * (r_c - r_r))

and, as TRL's DPOTrainer reports them, rewards are beta * r: `reward_chosen`, `reward_rejected`,
`reward_margin` (mean of chosen - rejected) and `reward_accuracy` (fraction of pairs with chosen > rejected).

The reference is a plain copy of the model outside DeepSpeed's engine (no optimizer state, no gradients),
scored once per micro-batch under torch.no_grad; being frozen, it is rebuilt from its checkpoint on every
start, so `--load` resumes exactly. Log-probs come from the (vocab-parallel) cross entropy, so with --tp
the full logits are never gathered, as in the LM loss.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

DEFAULT_BETA = 0.1  # TRL's DPOConfig default


def add_dpo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=DEFAULT_BETA,
                   help="DPO temperature: how far the policy may move from the reference (larger: stays closer)")
    g.add_argument("--ref", default=None,
                   help="checkpoint of the frozen reference model (default: --pretrained); it must use the same "
                        "tokenizer, so the same vocab_size")


def check_dpo_args(a, config: ModelConfig) -> ModelConfig:
    """The reference model's config, after checking --beta and --ref against the policy's model."""
    from megatron_lite.checkpoint.load import check_checkpoint_dir

    if not a.beta > 0:
        raise UserError(f"--beta must be > 0, got {a.beta}")
    if a.ref is None:
        return config
    try:
        check_checkpoint_dir(a.ref)
    except UserError as e:
        raise UserError(f"--ref {a.ref}: {e}") from None
    ref = ModelConfig.load(a.ref)
    if ref.vocab_size != config.vocab_size:
        raise UserError(f"--ref {a.ref}: vocab_size {ref.vocab_size} differs from --pretrained's {config.vocab_size}; "
                        f"the reference must use the same tokenizer")
    if ref.is_moe and ref.num_experts % a.ep:
        raise UserError(f"--ref {a.ref}: its {ref.num_experts} experts do not divide over --ep {a.ep}")
    if a.seq_length > ref.max_seq_len:
        raise UserError(f"--seq-length {a.seq_length} exceeds --ref {a.ref}'s max_seq_len {ref.max_seq_len}")
    return ref


def build_reference(path: str, config: ModelConfig, dims, seed: int, engine) -> torch.nn.Module:
    """The frozen reference model from checkpoint `path`, in this rank's tp/ep layout, on the device and in
    the dtype of the engine's model, in eval mode (no router noise, no dropout)."""
    from megatron_lite.checkpoint.load import load_weights_into
    from megatron_lite.training.engine import build_model

    ref = build_model(config, dims, seed)
    load_weights_into(ref, path)
    # DeepSpeed-MoE layers learn their expert-parallel group from deepspeed.initialize, which the reference
    # never sees: hand them the engine's groups as the engine does for its own model (without them the
    # reference's all-to-all would run over the wrong group).
    ds_config = getattr(engine, "_config", None)
    for m in ref.modules():
        if hasattr(m, "set_deepspeed_parallelism"):
            m.set_deepspeed_parallelism(getattr(ds_config, "use_data_before_expert_parallel_", False))
    p = next(engine.module.parameters())
    ref.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
    return ref


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """(N,) sum over positions of log p(label) for logits (N, T, V or V/tp) and labels (N, T) (IGNORE_INDEX
    positions add nothing)."""
    return -vocab_parallel_cross_entropy(logits, labels, tp_group, reduction="none").sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """(mean sigmoid DPO loss, metrics) from per-pair sequence log-probs (each (B,))."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {"reward_chosen": chosen_rewards.mean(), "reward_rejected": rejected_rewards.mean(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean()}
    return loss, metrics


@dataclass
class DPOOutput:
    """What the loop reads from a micro-batch's output (see loop.py), with the DPO metrics."""
    logits: torch.Tensor
    loss: torch.Tensor
    aux_loss: torch.Tensor | None
    expert_counts: torch.Tensor | None
    metrics: dict


def pair_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, T) pairs -> (2B, T): the B chosen sequences, then the B rejected ones."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


class DPOObjective:
    """The loop's objective for DPO: `objective(engine, micro_batch)` -> DPOOutput."""

    metric_names = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, ref_model: torch.nn.Module, beta: float):
        self.ref_model, self.beta = ref_model, beta

    def __call__(self, engine, mb) -> DPOOutput:
        input_ids, labels = pair_rows(mb.input_ids), pair_rows(mb.labels)  # (2B, T)
        tp_group = getattr(engine.module, "tp_group", None)
        out = engine(input_ids, None, gather_logits=False)
        policy_chosen, policy_rejected = sequence_logps(out.logits, labels, tp_group).chunk(2)
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids, None, gather_logits=False).logits
            ref_chosen, ref_rejected = sequence_logps(ref_logits, labels, tp_group).chunk(2)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        return DPOOutput(out.logits, loss, out.aux_loss, out.expert_counts, metrics)


def build_objective(a, ref_config: ModelConfig, dims, engine, is_rank0: bool) -> DPOObjective:
    """The objective of a DPO run: the reference from --ref or --pretrained, next to the engine's model."""
    path = a.ref or a.pretrained
    ref = build_reference(path, ref_config, dims, a.seed, engine)
    if is_rank0:
        print(f"DPO reference model: {path} (frozen), beta {a.beta}")
    return DPOObjective(ref, a.beta)
