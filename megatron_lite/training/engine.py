"""The model, optimizer and DeepSpeed engine of a training run (`deepspeed.initialize` with our pieces)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from megatron_lite.config import ModelConfig
from megatron_lite.parallel import ParallelDims
from megatron_lite.training.ds_config import EMBEDDING_LR, lr_settings, uses_optimizer_offload
from megatron_lite.training.schedule import build_scheduler


def build_model(config: ModelConfig, dims: ParallelDims, seed: int) -> torch.nn.Module:
    """The GPT for this rank. Every rank seeds identically first so replicated weights agree before
    DeepSpeed's broadcast, and each expert gets the weights it would have with any ep (see GPT init)."""
    from megatron_lite.model.gpt import GPT

    torch.manual_seed(seed)
    ep_rank = dims.dp_rank % dims.ep  # rank inside DeepSpeed's expert-parallel group (consecutive dp ranks)
    kwargs = dict(ep_size=dims.ep, ep_rank=ep_rank)
    if dims.tp > 1:
        kwargs["tp_group"] = dims.tp_group
    return GPT(config, **kwargs)


@torch.no_grad()
def zero_output_projections(model: torch.nn.Module) -> None:
    """Zero every projection that writes into the residual stream (attention o_proj, FFN and expert
    down_proj, tensor-parallel shards included): each block starts as the identity, as in modded-nanogpt."""
    for m in model.modules():
        if getattr(m, "is_output_projection", False):
            m.weight.zero_()


def tag_muon_params(model: torch.nn.Module) -> None:
    """Set `use_muon` on every parameter, which DeepSpeed's Muon reads: True on the hidden matrices
    (attention q/k/v/o, FFN and expert weights, tensor-parallel shards included), False on embeddings, norms,
    biases, the MoE router and the output head, which its AdamW side trains (Muon is defined for hidden
    linear maps; the router and the vocabulary maps are not, as in the Muon write-ups)."""
    from deepspeed.moe.sharded_moe import TopKGate

    router = {id(p) for m in model.modules() if isinstance(m, TopKGate) for p in m.parameters()}
    hidden = {id(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2 and id(p) not in router}
    for p in model.parameters():
        p.use_muon = id(p) in hidden


def param_groups(model: torch.nn.Module, weight_decay: float, split_moe: bool = True,
                 embedding_lr: float | None = None) -> list[dict]:
    """AdamW groups: decay matrices only — norms, biases and the input embedding (with a tied head, the head
    too) keep their scale (as in Megatron/nanoGPT). The input embedding is a group of its own, at
    `embedding_lr` when given (else the optimizer's lr): a token's row gets a gradient only when the token
    occurs, so an untied input embedding takes a much higher rate than the matrices (as in the speedrun
    recipes). Expert
    parameters then go to DeepSpeed-MoE's own groups, which ZeRO reduces over the expert-data-parallel group
    instead of the whole data-parallel group (split_moe=False leaves that to the caller: Muon splits its
    halves first)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, embedding = [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (embedding if id(p) in embeddings else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
              {"name": "embedding", "params": embedding, "weight_decay": 0.0,
               **({"lr": embedding_lr} if embedding_lr is not None else {})}]
    groups = [g for g in groups if g["params"]]
    if split_moe and any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


class NonFiniteSkipping:
    """Mixin for an optimizer: drop an update whose gradients are not finite (NaN/inf), on every rank together.

    One bad batch (a loss spike overflowing, a corrupt sample) must not turn every weight into NaN. The
    check sits here, in the optimizer DeepSpeed calls at the accumulation boundary, because only here are the
    final (reduced, clipped, ZeRO-partitioned) gradients in one place for every ZeRO stage. Ranks hold
    different ZeRO shards, so the verdict is all-reduced: all ranks skip or none does (otherwise replicas
    diverge). A skipped update leaves weights and Adam moments untouched; the learning-rate schedule still
    advances. The loop also sets `bad_loss` (a device flag) when a loss on this rank was not finite.

    `clip_grad` (max norm, the model's parameters, DeepSpeed mpu) is for runs where DeepSpeed puts no
    wrapper around the optimizer (ZeRO stage 0 in fp32): there DeepSpeed clips but drops the norm, so this
    optimizer clips instead, first thing in `step` (where DeepSpeed would, with its function), and keeps the
    norm in `_global_grad_norm`, which DeepSpeed's engine reads from its optimizer after every step
    (`get_global_grad_norm`, as from its ZeRO and bf16 wrappers).
    """

    bad_loss: torch.Tensor | None = None
    last_skipped = False
    _global_grad_norm = None

    def __init__(self, *args, clip_grad: tuple | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_grad = clip_grad

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        if self.clip_grad is not None:
            from deepspeed.runtime.utils import clip_grad_norm_

            max_norm, parameters, mpu = self.clip_grad
            self._global_grad_norm = clip_grad_norm_(parameters, max_norm, mpu=mpu)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        dev = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=dev)
        if grads:
            bad += (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()
        if self.bad_loss is not None:
            bad += self.bad_loss.to(dev)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.bad_loss = None
        self.last_skipped = bool(bad.item() > 0)
        if self.last_skipped:
            return None
        return super().step(closure, **kwargs)


class NonFiniteSkippingAdamW(NonFiniteSkipping, torch.optim.AdamW):
    """torch's AdamW with the non-finite guard."""


def build_muon(params: list[dict], opt: dict) -> torch.optim.Optimizer:
    """DeepSpeed's MuonWithAuxAdam with the non-finite guard, on DeepSpeed's own split of `params` (our decay
    groups) into Muon and AdamW halves by `use_muon` (see `tag_muon_params`), then into DeepSpeed-MoE's
    expert groups, in the order DeepSpeed's engine splits them. The AdamW side is torch's fused AdamW, as in
    our AdamW runs; `muon_lr` is the matrices' lr, `lr` the AdamW side's."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    class NonFiniteSkippingMuon(NonFiniteSkipping, MuonWithAuxAdam):
        pass

    settings = {k: (tuple(v) if k == "betas" else v) for k, v in opt.items()}
    groups = DeepSpeedEngine._muon_param_groups(params, settings)
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return NonFiniteSkippingMuon(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"fused": True})


def nonfinite_guard(engine) -> NonFiniteSkipping | None:
    """Our optimizer inside `engine` (DeepSpeed keeps the unwrapped one as `basic_optimizer`), whose
    `bad_loss` / `last_skipped` the loop uses; None with optimizer offload (DeepSpeed's CPU Adam, whose
    non-finite steps DeepSpeed's own overflow check skips when gradient clipping computes the norm)."""
    opt = getattr(engine, "basic_optimizer", None)
    return opt if isinstance(opt, NonFiniteSkipping) else None


def _deepspeed_wraps_optimizer(cfg: dict) -> bool:
    """Under ZeRO and in bf16/fp16 DeepSpeed wraps the optimizer, and the wrapper clips and keeps the norm."""
    zero_stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    return bool(zero_stage) or any((cfg.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))


def build_engine(model: torch.nn.Module, ds_config: dict, dims: ParallelDims, train: bool = True):
    """deepspeed.initialize with our optimizer and schedule.

    The optimizer is torch's AdamW (fused kernel on CPU and GPU): DeepSpeed's CPU FusedAdam path costs more
    than it saves here. With optimizer offload DeepSpeed needs its own CPU Adam, so it builds it from the
    JSON instead. `"type": "Muon"` is DeepSpeed's MuonWithAuxAdam (`build_muon`), passed as our optimizer
    because DeepSpeed's own build would re-tag `use_muon` by parameter name, putting the router on Muon.
    The `scheduler` and `wandb` sections are ours and are not passed on.
    """
    import deepspeed
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    cfg = copy.deepcopy(ds_config)
    sched = lr_settings(cfg) if train else None
    for key in ("scheduler", "wandb", "zero_note"):
        cfg.pop(key, None)
    kwargs = {}
    if train:
        opt = cfg["optimizer"]["params"]
        muon = cfg["optimizer"]["type"] == "Muon"
        embedding_lr = opt.pop(EMBEDDING_LR, None)  # ours: DeepSpeed's optimizers take no such key
        kwargs["model_parameters"] = param_groups(model, float(opt.get("weight_decay", 0.0)), split_moe=not muon,
                                                  embedding_lr=embedding_lr)
        if muon:  # always under ZeRO (ds_config._settle_zero), whose wrapper clips and keeps the norm
            tag_muon_params(model)
            cfg.pop("optimizer")
            cfg["zero_allow_untested_optimizer"] = True
            kwargs["optimizer"] = lambda params: build_muon(params, opt)
        elif not uses_optimizer_offload(cfg):
            cfg.pop("optimizer")
            cfg["zero_allow_untested_optimizer"] = True
            clip_grad = None
            max_norm = float(cfg.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))
            if not _deepspeed_wraps_optimizer(cfg) and max_norm > 0:
                cfg["gradient_clipping"] = 0.0  # the optimizer clips (see NonFiniteSkippingAdamW)
                clip_grad = (max_norm, list(model.parameters()), dims.mpu)
            kwargs["optimizer"] = lambda params: NonFiniteSkippingAdamW(
                params, clip_grad=clip_grad, lr=float(opt["lr"]), betas=tuple(opt.get("betas", (0.9, 0.999))),
                eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 0.0)), fused=True)
        kwargs["lr_scheduler"] = lambda optimizer: build_scheduler(optimizer, **sched)
    else:
        cfg.pop("optimizer", None)
        cfg["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, mpu=dims.mpu, **kwargs)
    if dims.dp == 1 and engine.zero_optimization_stage() == 0:
        # A data-parallel "all-reduce" over one rank still flattens and unflattens every gradient.
        engine.enable_backward_allreduce = False
    return engine
