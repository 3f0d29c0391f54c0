"""LoRA fine-tuning (`launch/sft.py --lora-rank R`): peft's LoRA layers injected into the plain model from
outside, the base frozen, so DeepSpeed (ZeRO-2 included) keeps optimizer state for the adapters only.

* Targets: our short names map to module names (checkpoint/lora.py TARGET_MODULES); peft matches them as
  name suffixes, so `gate`/`up`/`down` adapt the dense FFN and every DeepSpeed-MoE expert alike. The MoE
  router (`gate.wg`) and the embeddings are never targets.
* MoE experts: on an MoE model the targets must include an expert projection, since DeepSpeed's ZeRO
  optimizer for a model with MoE layers asserts a group of trainable expert parameters. DeepSpeed marks expert weights `allreduce=False` with their expert group's `group_name`, and
  reduces their gradients over the expert-data-parallel group only (with --ep > 1 ranks hold different
  experts under the same local names). An expert's adapters are part of that expert, so they get the same
  marks; otherwise ZeRO would average the adapters of different experts across ranks.
* Initialisation: peft's (lora_A Kaiming-uniform, lora_B zero, so training starts at the base model), but
  each lora_A drawn from a generator keyed by the seed and the module's *global* name (global expert id),
  so the adapters start the same for any --ep, as the experts themselves do (model/gpt.py).
* Tensor parallelism is refused: our Column/RowParallelLinear are not nn.Linear, and peft's parallel LoRA
  layer is written for megatron-core's classes.
"""
from __future__ import annotations

import argparse
import math
import os
import zlib
from pathlib import Path

import torch

from megatron_lite.checkpoint.layout import EXPERT_KEY, atomic_write_text, expert_key, latest_tag
from megatron_lite.checkpoint.lora import ADAPTER, LORA_CONFIG_FILE, TARGET_MODULES, LoraRecord, base_fingerprint, read_lora_record
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError

_FFN_TARGETS = ("gate", "up", "down")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "LoRA", "Train low-rank adapters (peft's LoRA layers) on a frozen --pretrained model instead of every "
        "weight: the optimizer (and its ZeRO shards) holds the adapters only. Checkpoints keep the whole model "
        "plus SAVE/lora_config.json; every tool reads them with the adapters merged, and "
        "tools/convert_to_hf.py --adapter-only writes a peft adapter folder.")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="rank of each adapter (>= 1); unset: full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="each adapter adds (alpha / rank) * B @ A to its weight. Default: alpha = rank, a scale "
                        "of 1 at any rank: the trained product B @ A is added with no hidden multiplier (merged "
                        "weight W + B @ A). 2 x rank, the other common choice, doubles the adapters' effective "
                        "step size")
    g.add_argument("--lora-targets", default=None, metavar="LIST",
                   help="comma-separated projections to adapt, from " + ",".join(TARGET_MODULES) + " (attention "
                        "q/k/v/o; SwiGLU gate/up/down, in MoE models every expert's, and an MoE model needs at "
                        "least one of those). Default: all of them the model has")
    g.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                   help="dropout on each adapter's input while training (peft's lora_dropout)")


def available_targets(config: ModelConfig) -> tuple[str, ...]:
    """The target names this model has modules for: attention always; gate/up/down only in SwiGLU FFNs
    (dense or experts; the plain MLP's are fc1/fc2)."""
    return ("q", "k", "v", "o") + (_FFN_TARGETS if config.ffn_type == "swiglu" else ())


def lora_from_args(a, config: ModelConfig) -> LoraRecord | None:
    """The run's LoRA settings from the flags (validated against the model), or None without --lora-rank.
    The base's fingerprint is filled in by `prepare_lora`."""
    rank = getattr(a, "lora_rank", None)
    if rank is None:
        if getattr(a, "lora_alpha", None) is not None or getattr(a, "lora_targets", None) is not None:
            raise UserError("--lora-alpha and --lora-targets need --lora-rank R")
        return None
    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {rank}")
    alpha = float(rank) if a.lora_alpha is None else a.lora_alpha
    if not alpha > 0:
        raise UserError(f"--lora-alpha must be > 0, got {a.lora_alpha}")
    if not 0.0 <= a.lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {a.lora_dropout}")
    if a.tp > 1:
        raise UserError(f"--lora-rank with --tp {a.tp}: LoRA adapts nn.Linear layers, and with --tp > 1 the "
                        "projections are tensor-parallel layers; train LoRA with --tp 1 (use data or expert "
                        "parallelism)")
    have = available_targets(config)
    if a.lora_targets is None:
        targets = have
    else:
        targets = tuple(dict.fromkeys(t.strip() for t in a.lora_targets.split(",") if t.strip()))
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown or not targets:
            raise UserError(f"--lora-targets {a.lora_targets!r}: unknown name(s) {unknown}; choose from "
                            + ",".join(TARGET_MODULES))
        absent = [t for t in targets if t not in have]
        if absent:
            raise UserError(f"--lora-targets {a.lora_targets!r}: this model has no {', '.join(absent)} projection "
                            f"(ffn_type {config.ffn_type!r}); it has {','.join(have)}")
    experts = config.is_moe and any(t in _FFN_TARGETS for t in targets)
    if config.is_moe and not experts:
        raise UserError(f"--lora-targets {','.join(targets)}: on an MoE model the adapters must include the experts' "
                        "gate, up or down: DeepSpeed's optimizer for MoE models requires a group of trainable "
                        "expert parameters")
    return LoraRecord(rank=rank, alpha=alpha, targets=targets, dropout=a.lora_dropout, experts=experts)


def pretrained_fingerprint(path: str) -> str:
    from megatron_lite.checkpoint.load import load_full_state_dict

    return base_fingerprint(*load_full_state_dict(path))


def _describe(r: LoraRecord) -> str:
    return f"--lora-rank {r.rank} --lora-alpha {r.alpha:g} --lora-targets {','.join(r.targets)}" + (
        f" --lora-dropout {r.dropout:g}" if r.dropout else "")


def prepare_lora(a, config: ModelConfig) -> LoraRecord | None:
    """Before any rank starts: the run's LoRA record (with its base's fingerprint), checked against the
    --load checkpoint it resumes and the --save folder it writes into. None for a full fine-tune."""
    record = lora_from_args(a, config)
    if record is not None:
        record = LoraRecord(**record.settings(), base={"path": str(Path(a.pretrained).resolve()),
                                                        "fingerprint": pretrained_fingerprint(a.pretrained)})
    if a.load:
        saved = read_lora_record(a.load)
        if saved is not None and record is None:
            raise UserError(f"--load {a.load} holds LoRA adapters: resume with {_describe(saved)}")
        if saved is None and record is not None:
            raise UserError(f"--load {a.load} holds a full fine-tune, not LoRA adapters: resume without --lora-rank")
        if saved is not None and saved.settings() != record.settings():
            raise UserError(f"--load {a.load} was trained with {_describe(saved)}; resume with the same flags")
        if saved is not None and saved.base.get("fingerprint") != record.base["fingerprint"]:
            raise UserError(f"--load {a.load}: its adapters were trained on another base model (fingerprint "
                            f"{saved.base.get('fingerprint', '?')[:19]}..., from {saved.base.get('path')}) than "
                            f"--pretrained {a.pretrained} ({record.base['fingerprint'][:19]}...); pass the "
                            "--pretrained the adapters were trained on")
    elif a.save and latest_tag(Path(a.save)) is not None:
        saved = read_lora_record(a.save)
        if (saved and saved.settings()) != (record and record.settings()):
            what = f"LoRA adapters ({_describe(saved)})" if saved else "a full fine-tune"
            raise UserError(f"--save {a.save} already holds checkpoints of {what}; choose another --save folder "
                            "(or --load it to resume)")
    return record


def write_lora_record(save_dir: str, record: LoraRecord | None) -> None:
    """SAVE/lora_config.json for a LoRA run; a stale one from an earlier run into a folder with no checkpoint
    is removed otherwise (prepare_lora refused a folder whose checkpoints disagree)."""
    path = Path(save_dir) / LORA_CONFIG_FILE
    if record is not None:
        atomic_write_text(path, record.to_json())
    elif path.exists():
        os.remove(path)


def _global_name(model, module_name: str) -> str:
    """A module's name with its expert's global id (local expert j of ep rank r is r * n_local + j)."""
    m = EXPERT_KEY.match(module_name + ".")
    if m is None or model.ep_size == 1:
        return module_name
    n_local = model.config.num_experts // model.ep_size
    return expert_key(m["layer"], model.ep_rank * n_local + int(m["expert"]), m["param"]).rstrip(".")


def apply_lora(model: torch.nn.Module, record: LoraRecord) -> torch.nn.Module:
    """Inject peft's LoRA layers into `model` (in place; returned), freeze everything else, mark expert
    adapters as DeepSpeed expert parameters and draw each lora_A from its own seeded generator (module doc).
    Called after the base weights are loaded and before DeepSpeed sees the model."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    seed = int(torch.randint(0, 2**62, (1,)).item())  # from the run's seeded RNG, the same on every rank
    model = inject_adapter_in_model(record.peft_config(), model)
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for t in record.targets:  # available_targets promised each one exists
        if not any(name.endswith("." + TARGET_MODULES[t]) for name in adapted):
            raise RuntimeError(f"LoRA target {t} ({TARGET_MODULES[t]}) matched no module of the model")
    with torch.no_grad():
        for name, m in adapted.items():
            lora_a, lora_b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            g = torch.Generator().manual_seed(seed ^ zlib.crc32(_global_name(model, name).encode()))
            torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=g)  # peft's init, own stream
            base = m.get_base_layer().weight
            if getattr(base, "allreduce", True) is False:
                for p in (lora_a, lora_b):
                    p.allreduce, p.group_name = False, base.group_name
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def load_adapter_model(path: str | Path, tag: str | None = None) -> torch.nn.Module:
    """A LoRA checkpoint as the model it trained (tp = ep = 1, eval mode): the plain GPT with peft's LoRA
    layers holding the saved adapters, unmerged (the reference the merged and peft exports are held to)."""
    from megatron_lite.checkpoint.load import load_full_state_dict
    from megatron_lite.checkpoint.lora import lora_record_for
    from megatron_lite.model.gpt import GPT

    _, record = lora_record_for(path)
    if record is None:
        raise UserError(f"{path} holds no LoRA adapters (no {LORA_CONFIG_FILE})")
    config, sd = load_full_state_dict(path, tag, merge_lora=False)
    model = apply_lora(GPT(config), record)
    model.load_state_dict(sd)
    return model.eval()


def restore_frozen_base(model: torch.nn.Module, pretrained: str) -> None:
    """After `engine.load_checkpoint` of a LoRA run: copy the frozen weights from --pretrained again (the very
    base the checkpoint recorded; prepare_lora compared fingerprints).

    Under ZeRO-2 DeepSpeed also restores every frozen parameter from rank 0's `frozen_param_fragments`, keyed by
    local name, so with --ep > 1 each rank's local experts would get rank 0's experts' frozen weights."""
    from megatron_lite.checkpoint.load import load_full_state_dict, local_state_dict
    from megatron_lite.checkpoint.lora import BASE_LAYER

    _, full = load_full_state_dict(pretrained)
    local = local_state_dict(full, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                p.copy_(local[name.replace(BASE_LAYER, ".")])
