"""Command line of launch/pretrain.py, launch/sft.py and launch/dpo.py: flags, validation and wiring.

Both scripts run unchanged as `python launch/X.py ...` (one process) and under
`deepspeed --num_gpus N launch/X.py ...` (N ranks: GPUs, or gloo processes on CPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from megatron_lite.checkpoint.load import (check_checkpoint_dir, check_same_model, resume_plan,
                                           load_training_checkpoint, load_weights_into, resolve_load)
from megatron_lite.checkpoint.save import check_save_space, write_run_files
from megatron_lite.config import PRESETS, ModelConfig, get_preset, pad_vocab_size
from megatron_lite.data.gpt_dataset import build_gpt_datasets, parse_data_path
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.preference_dataset import build_preference_datasets, preference_prefixes
from megatron_lite.data.sft_dataset import build_sft_datasets, sft_prefixes
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.errors import UserError, exit_on_user_error
from megatron_lite.parallel import ParallelDims, init_distributed, shutdown_distributed
from megatron_lite.training.activation_checkpointing import checkpoint_blocks
from megatron_lite.training.ds_config import load_ds_config, resolve_ds_config, wandb_settings
from megatron_lite.training.engine import build_engine, build_model, zero_output_projections
from megatron_lite.training import dpo
from megatron_lite.training.loop import Faults, Progress, StopRequest, TrainSettings, lm_objective, train
from megatron_lite.training.lora import (add_lora_args, apply_lora, prepare_lora, restore_frozen_base,
                                        write_lora_record)
from megatron_lite.training.memory import check_memory_fits
from megatron_lite.training.monitor import Monitor
from megatron_lite.training.rank_agreement import agree_at_start, launched_with_peers
from megatron_lite.training.recipe import DECAY_STYLES, FALLBACK, OPTIMIZERS, RECIPES, recipe_for, recipe_value
from megatron_lite.training.rng import set_rng_state

REPO = Path(__file__).resolve().parents[2]
# Dense bf16 peak per device, for MFU; other GPUs: pass --peak-tflops.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
CPU_PEAK_GFLOPS_PER_THREAD = 80.0  # fp32 GEMM peak of one core of the reference machine (DESIGN §4)


def build_parser(kind: str) -> argparse.ArgumentParser:
    sft = kind in ("sft", "dpo")  # both start from --pretrained
    p = argparse.ArgumentParser(
        prog=f"launch/{kind}.py",
        description=("Supervised fine-tuning (loss on assistant tokens only) from a pretrained checkpoint."
                     if kind == "sft" else "DPO (preference optimization against a frozen reference model) from "
                     "a pretrained or SFT checkpoint." if kind == "dpo"
                     else "Pretrain a GPT (dense or MoE) with DeepSpeed ZeRO.")
        + " Runs as `python launch/%s.py ...` or `deepspeed --num_gpus N launch/%s.py ...`." % (kind, kind),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if sft else "tiny", choices=sorted(PRESETS),
                   help="model preset" + (" (SFT takes the model from --pretrained; if given it must match)" if sft else ""))
    g.add_argument("--num-experts", type=int, default=None, help="override the preset's expert count (0 = dense)")
    g.add_argument("--topk", type=int, default=None, help="experts per token (MoE)")
    for name in ("num-layers", "hidden-size", "ffn-hidden-size", "num-heads", "num-kv-heads"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name.replace('-', '_')}")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm on each head's queries and keys before RoPE (Qwen3; exports as Qwen3 classes); "
                        "default: the preset's (on for tiny), --no-qk-norm for plain Llama/Mixtral attention")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the input embedding with the output head (default: the preset's: off for tiny, "
                        "on for the others); --no-tie-embeddings trains a separate lm_head (exports with "
                        "tie_word_embeddings false)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory; vocab_size is padded from its length"
                   + (" (default: PRETRAINED/tokenizer)" if sft else " (required unless --load)"))
    if sft:
        g.add_argument("--pretrained", required=True,
                       help="pretraining checkpoint folder to start from (weights only; optimizer and step restart)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="dataset prefix, or a Megatron blend 'W1 P1 W2 P2 ...'"
                   + {"sft": " (SFT data from preprocess_data.py --chat)",
                      "dpo": " (pairs from preprocess_data.py --preference: P, or P_chosen_text_document)"}.get(kind, ""))
    g.add_argument("--split", default="969,30,1", help="train,valid,test document proportions")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sample (<= the model's max_seq_len)")
    if kind == "sft":
        g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                       help="pack whole conversations into each sample, each attending only to itself, so little "
                            "compute goes to padding; --no-pack: one conversation per sample, right-padded")

    g = p.add_argument_group(
        "batch, optimizer and schedule",
        "A flag beats an explicit ds_config value, which beats the preset's recipe (ds_config entries left "
        "\"auto\", as in the shipped ones; see megatron_lite/training/recipe.py and README). "
        + (f"{kind.upper()}'s recipe: AdamW, lr 1e-3, 5%% warmup, cosine to 0.1 x lr." if sft else
           "Unset (None) below means: from the ds_config, else the recipe of --model."))
    g.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"), metavar="PATH",
                   help="DeepSpeed JSON config (a path; see ds_configs/README.md)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per rank per micro step")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step over all ranks; grad accumulation = this / (micro x dp)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro steps per optimizer step")
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps to train (total, counting resumed ones)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw: torch AdamW; muon: DeepSpeed's Muon (MuonWithAuxAdam) on the hidden matrices and "
                        "AdamW on embeddings, norms, router and head, always under ZeRO stage >= 1 (ds_config "
                        "optimizer.type AdamW / Muon; recipe: muon for "
                        f"{', '.join(n for n, r in RECIPES.items() if r.optimizer == 'muon')}, adamw otherwise)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of AdamW; with --optimizer muon, of its AdamW side (optimizer.params.lr)")
    g.add_argument("--muon-lr", type=float, default=None,
                   help="peak learning rate of Muon's matrices (optimizer.params.muon_lr; --optimizer muon only; "
                        f"recipe: {RECIPES['tiny'].muon_lr} for tiny, else {FALLBACK.muon_lr})")
    g.add_argument("--embedding-lr", type=float, default=None,
                   help="peak learning rate of the input embedding (AdamW; with a tied head, of the head too); "
                        "it follows the same schedule (optimizer.params.embedding_lr; recipe: "
                        f"{RECIPES['tiny'].embedding_lr} for tiny and tiny-moe, else --lr)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="floor of the decay (recipe: 0.1 x lr); Muon's matrices decay to the same fraction of "
                        "--muon-lr")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (recipe: 5%% of --train-iters)")
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default=None,
                   help="after warmup: cosine to --min-lr over the run, or wsd (warmup-stable-decay: the peak held, "
                        "then linear to --min-lr over the last --lr-wsd-decay-frac of --train-iters)")
    g.add_argument("--lr-wsd-decay-frac", type=float, default=None,
                   help="wsd: fraction of --train-iters the final linear decay takes (recipe: 0.2)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="decoupled weight decay, not on norms, biases, embeddings (recipe: 0.1)")
    g.add_argument("--adam-beta1", type=float, default=None,
                   help="AdamW's first-moment decay (default: the ds_config's betas, or the recipe's 0.9)")
    g.add_argument("--adam-beta2", type=float, default=None,
                   help="AdamW's second-moment decay (default: the ds_config's betas, or the recipe's: 0.99 for "
                        "tiny and tiny-moe, 0.95 otherwise)")
    g.add_argument("--grad-clip", type=float, default=None,
                   help="clip the global gradient norm at this value, 0 = off (ds_config gradient_clipping; recipe: "
                        "1.0, with --optimizer muon 0: DeepSpeed's ZeRO clips after Muon's orthogonalisation, so any "
                        "clip would shrink Muon's steps)")
    if kind == "pretrain":
        g.add_argument("--zero-init-output", action=argparse.BooleanOptionalAction, default=None,
                       help="start every residual-stream output projection (attention o_proj, FFN / expert "
                            "down_proj) at zero instead of N(0, std / sqrt(2 x layers)) (recipe: on for tiny and "
                            "tiny-moe, off for the other presets)")
    g.add_argument("--seed", type=int, default=1234, help="seed for init, data order, dropout and router noise")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE; divides the data-parallel size)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", default=None, help="checkpoint folder (also gets metrics.jsonl, configs, tokenizer)")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (0: only at the end)")
    g.add_argument("--exit-interval", type=int, default=0,
                   help="stop (saving first when --save is set) at the first step divisible by N; resume with --load")
    g.add_argument("--load", default=None,
                   help="resume exactly from this checkpoint folder's 'latest' (or a universal folder from "
                        "tools/convert_checkpoint.py); another dp / --tp / --ep / ZeRO stage than the saving run's "
                        "reshards the weights, fp32 masters and AdamW moments (keep the global batch to continue "
                        "the same data order); the same folder as --save may hold no checkpoint yet (then the run "
                        "starts from scratch), so one command line serves every (re)start of a job")
    g.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or gradients (each is "
                        "skipped, weights untouched); 0: never stop")
    g.add_argument("--log-interval", type=int, default=1, help="steps between log lines (loss averaged over them)")
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate on the valid split every N steps (0: never)")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per evaluation")
    g.add_argument("--wandb-project", default=None,
                   help="log to wandb (offline into SAVE/wandb when no API key is set; `wandb sync` uploads later)")
    g.add_argument("--wandb-name", default=None, help="wandb run name")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one rank for MFU (default: known GPUs' bf16 peak; CPU: 0.08 x threads)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fuses RMSNorm/RoPE/SwiGLU elementwise work; the first steps "
                        "pay for compiling, so it helps long runs: see benchmarks/results.md; checkpoints are "
                        "unchanged)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each transformer block's activations during backward instead of keeping them "
                        "(Megatron's flag): far less activation memory for about one more forward pass per step; "
                        "same losses, works with --tp, --ep and --compile, checkpoints unchanged")
    if kind == "sft":
        add_lora_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if kind == "dpo":
        dpo.add_dpo_args(p)
    return p


def check_args(a) -> None:
    positive = {"--train-iters": a.train_iters, "--seq-length": a.seq_length, "--log-interval": a.log_interval,
                "--tp": a.tp, "--ep": a.ep}
    for flag, v in positive.items():
        if v is None or v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    for flag, v in {"--micro-batch-size": a.micro_batch_size, "--global-batch-size": a.global_batch_size,
                    "--grad-accum": a.grad_accum}.items():
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if min(a.save_interval, a.eval_interval, a.eval_iters, a.exit_interval, a.max_bad_steps) < 0:
        raise UserError("--save-interval, --eval-interval, --eval-iters, --exit-interval and --max-bad-steps "
                        "must be >= 0")
    if any(v is not None and v < 0 for v in (a.lr, a.min_lr, a.muon_lr, a.embedding_lr, a.warmup_iters)):
        raise UserError("--lr, --muon-lr, --embedding-lr, --min-lr and --warmup-iters must be >= 0")
    if a.load and not os.path.isdir(a.load):
        raise UserError(f"--load {a.load}: checkpoint folder does not exist")


def model_overrides(a) -> dict:
    """The model-shape flags given on the command line, as ModelConfig fields."""
    return {k: v for k, v in dict(num_experts=a.num_experts, topk=a.topk, num_layers=a.num_layers,
                                  hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
                                  num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, qk_norm=a.qk_norm,
                                  tie_embeddings=a.tie_embeddings).items() if v is not None}


def model_config(a, tokenizer) -> ModelConfig:
    return get_preset(a.model, vocab_size=pad_vocab_size(len(tokenizer)), **model_overrides(a))


def resolve_model(kind: str, a):
    """(config, tokenizer_dir, tokenizer): SFT and DPO take both from --pretrained, pretraining from the flags."""
    if kind != "pretrain":
        check_checkpoint_dir(a.pretrained)
        config = ModelConfig.load(a.pretrained)
        tok_dir = a.tokenizer or os.path.join(a.pretrained, "tokenizer")
        tokenizer = load_tokenizer(tok_dir)
        if pad_vocab_size(len(tokenizer)) > config.vocab_size:
            raise UserError(f"tokenizer {tok_dir} has {len(tokenizer)} tokens, more than the pretrained "
                            f"model's vocab_size {config.vocab_size}")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"tokenizer {tok_dir} has no chat_template, which SFT data and chat need; use a "
                            f"tokenizer from tools/train_tokenizer.py (ChatML) or add one to its tokenizer_config.json")
        if a.model and get_preset(a.model, vocab_size=config.vocab_size).replace(name=config.name) != config:
            raise UserError(f"--model {a.model} differs from the model in --pretrained {a.pretrained}; drop --model")
        for field, value in model_overrides(a).items():
            if getattr(config, field) != value:
                name = field.replace("_", "-")
                flag = f"--{'' if value else 'no-'}{name}" if isinstance(value, bool) else f"--{name} {value}"
                raise UserError(f"{flag} differs from the model in --pretrained {a.pretrained} "
                                f"({name} {getattr(config, field)}); SFT takes the model from there: drop it")
        return config, tok_dir, tokenizer
    if not a.tokenizer:
        if not a.load:
            raise UserError("--tokenizer DIR is required (or --load a checkpoint, which holds one)")
        a.tokenizer = os.path.join(a.load, "tokenizer")
    tokenizer = load_tokenizer(a.tokenizer)
    return model_config(a, tokenizer), a.tokenizer, tokenizer


def check_model_fits(a, config: ModelConfig) -> None:
    """The flags against the model, and --load against both."""
    if a.ep > 1 and not config.is_moe:
        raise UserError(f"--ep {a.ep} needs an MoE model (--num-experts > 0 or --model tiny-moe)")
    if a.seq_length > config.max_seq_len:
        raise UserError(f"--seq-length {a.seq_length} exceeds the model's max_seq_len {config.max_seq_len}")
    if a.load:
        check_checkpoint_dir(a.load)
        check_same_model(a.load, config)


def plan_parallel(a, config: ModelConfig, raw_ds_config: dict) -> tuple[ParallelDims, dict, TrainSettings]:
    """Parallel dims from WORLD_SIZE (groups not built yet), the effective ds_config and the loop's settings."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    dims = ParallelDims.from_world(world, tp=a.tp, ep=a.ep, num_experts=config.num_experts if config.is_moe else None)
    ds_config = resolve_ds_config(
        raw_ds_config, dims.dp, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum,
        global_batch_size=a.global_batch_size, lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, warmup_iters=a.warmup_iters, train_iters=a.train_iters, optimizer=a.optimizer,
        muon_lr=a.muon_lr, lr_decay_style=a.lr_decay_style, wsd_decay_frac=a.lr_wsd_decay_frac,
        adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, embedding_lr=a.embedding_lr,
        recipe=recipe_for(a.model, sft=bool(getattr(a, "pretrained", None))))
    if a.load:  # a layout other than the saving run's is resharded on load (None: DeepSpeed's exact load)
        a.reshard = resume_plan(a.load, config, dims.dp, dims.tp, dims.ep, ds_config)
    s = TrainSettings(train_iters=a.train_iters, micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                      grad_accum=ds_config["gradient_accumulation_steps"], dp_size=dims.dp, dp_rank=dims.dp_rank,
                      seq_length=a.seq_length, seed=a.seed, log_interval=a.log_interval,
                      eval_interval=a.eval_interval, eval_iters=a.eval_iters, save_interval=a.save_interval,
                      save_dir=a.save, exit_interval=a.exit_interval, max_bad_steps=a.max_bad_steps)
    return dims, ds_config, s


def check_data(kind: str, data_path: list[str], vocab_size: int) -> None:
    """Open every dataset: a missing, truncated or corrupt .bin/.idx, or token ids the tokenizer cannot have
    produced, is one error line before anything is half-started or printed."""
    prefixes, _ = parse_data_path(data_path)
    for prefix in prefixes:
        names = {"sft": sft_prefixes, "dpo": preference_prefixes}.get(kind, lambda p: (p,))(prefix)
        for name in names:
            ds = IndexedDataset(name)
            if not name.endswith("_loss_mask_document") or name == names[0]:
                ds.check_vocab(vocab_size)


def peak_flops(a) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in GPU_PEAK_TFLOPS.items():
            if k in name:
                return v * 1e12
        return None
    return CPU_PEAK_GFLOPS_PER_THREAD * 1e9 * torch.get_num_threads()


def start_distributed(kind: str, a, config: ModelConfig, dims: ParallelDims, ds_config: dict,
                      s: TrainSettings) -> tuple[int, int]:
    """(rank, world): process groups built (the ranks are connected: `connect`), the run described once by
    rank 0."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dims.build()
    s.dp_rank, s.peak_flops = dims.dp_rank, peak_flops(a)
    if rank == 0:
        print(f"{kind}: {config.name} model, {config.num_params() / 1e6:.2f}M params "
              f"({config.num_params(active_only=True) / 1e6:.2f}M active), {dims}, world {world}, "
              f"global batch {s.global_batch} = micro {s.micro_batch_size} x accum {s.grad_accum} x dp {dims.dp}")
        print("effective ds_config: " + json.dumps(ds_config, sort_keys=True))
    return rank, world


def connect(failure: UserError | None, load_flag: str | None) -> None:
    """Join the other ranks and agree with them (rank_agreement.py): a pre-flight `failure` on any rank, or
    ranks that would resume from different checkpoints, stops all of them with one line."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # its per-step INFO lines cost time and bury ours
    init_distributed()
    agree_at_start(failure, load_flag)


def preflight(kind: str, a):
    """Everything a user can get wrong, checked on this rank before DeepSpeed is imported and ranks start
    talking: (config, tokenizer dir, DPO reference config, LoRA record, dims, ds_config, settings, note on a
    fresh start)."""
    a.load, fresh_start = resolve_load(a.load, a.save)  # `--save X --load X` before X holds a checkpoint
    check_args(a)
    raw_ds_config = load_ds_config(a.deepspeed)
    config, tok_dir, tokenizer = resolve_model(kind, a)
    check_model_fits(a, config)
    ref_config = dpo.check_dpo_args(a, config) if kind == "dpo" else None
    lora = prepare_lora(a, config) if kind == "sft" else None  # --lora-*: checked against --pretrained, --load, --save
    dims, ds_config, s = plan_parallel(a, config, raw_ds_config)
    check_memory_fits(config, dims, ds_config, on_gpu=torch.cuda.is_available(), frozen_base=lora is not None)
    check_data(kind, a.data_path, len(tokenizer))
    if a.save:
        check_save_space(a.save, config, ds_config)
    return config, tok_dir, ref_config, lora, dims, ds_config, s, fresh_start


def build_datasets(kind: str, a, s: TrainSettings):
    """(train, valid): enough samples for every step and every evaluation."""
    build = {"sft": build_sft_datasets, "dpo": build_preference_datasets}.get(kind, build_gpt_datasets)
    n_eval = a.eval_iters * s.global_batch if a.eval_interval else 0
    samples = (a.train_iters * s.global_batch, n_eval, 0)
    train_ds, valid_ds, _ = build(a.data_path, a.split, a.seq_length, a.seed, samples,
                                  **({"pack": a.pack} if kind == "sft" else {}))
    if train_ds is None:
        raise UserError(f"--data-path {' '.join(a.data_path)} with --split {a.split} leaves no training data")
    return train_ds, valid_ds


def build_model_and_engine(kind: str, a, config: ModelConfig, dims: ParallelDims, ds_config: dict, lora=None):
    model = build_model(config, dims, a.seed)
    if kind == "pretrain" and not a.load and recipe_value(a.zero_init_output, a.model, "zero_init_output"):
        zero_output_projections(model)
    if kind != "pretrain" and not a.load:
        # Weights only, before DeepSpeed copies them into its optimizer: this reads a checkpoint saved with
        # any tp / ep layout (or converted from HF) and keeps this rank's shard and experts.
        load_weights_into(model, a.pretrained)
    if lora is not None:
        model = apply_lora(model, lora)  # frozen base + adapters, before DeepSpeed builds the optimizer
    if a.checkpoint_activations:
        checkpoint_blocks(model)  # before compile, which then traces the recompute regions
    if a.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    return build_engine(model, ds_config, dims)


def resume(kind: str, a, engine, config: ModelConfig, dims: ParallelDims, is_rank0: bool) -> Progress:
    """The --load checkpoint's progress, its state restored into `engine` and the RNGs; else a fresh start."""
    if not a.load:
        if kind != "pretrain" and is_rank0:
            print(f"initialised from pretrained {a.pretrained}")
        return Progress()
    reshard = getattr(a, "reshard", None)
    if reshard and is_rank0:
        print(reshard)
    client = load_training_checkpoint(engine, a.load, config, reshard=(dims.tp_rank, dims.tp) if reshard else None)
    progress = Progress(iteration=int(client["iteration"]), consumed_samples=int(client["consumed_samples"]),
                        skipped_steps=int(client.get("skipped_steps", 0)))
    set_rng_state(client["rng"])
    if is_rank0:
        print(f"resumed from {a.load} at step {progress.iteration} ({progress.consumed_samples} samples consumed)")
    return progress


def open_monitor(kind: str, a, config: ModelConfig, dims: ParallelDims, ds_config: dict, tok_dir: str,
                 world: int, start_iter: int, is_rank0: bool) -> Monitor:
    """The run files in --save (configs, tokenizer, args) and the monitor that logs into it."""
    run_args = {k: v for k, v in vars(a).items() if k != "local_rank"}
    if a.save:
        write_run_files(a.save, config, tok_dir, ds_config, {"kind": kind, **run_args})
    run_config = {"kind": kind, "model": config.to_dict(), "parallel": {"tp": dims.tp, "ep": dims.ep, "dp": dims.dp,
                  "world": world}, "ds_config": ds_config, "args": run_args}
    wandb_cfg = wandb_settings(ds_config)
    return Monitor(is_rank0, os.path.join(a.save, "metrics.jsonl") if a.save else None, a.train_iters, start_iter,
                   wandb_project=a.wandb_project or wandb_cfg.get("project"), wandb_dir=a.save,
                   run_config=run_config, wandb_name=a.wandb_name)


def main(kind: str, argv=None, faults: Faults | None = None) -> dict:
    """kind: 'pretrain', 'sft' or 'dpo'. Returns the last logged metrics (rank 0) for tests and scripts.
    faults: failures injected by tests (tests/fault_launch.py); None for real runs."""
    a = build_parser(kind).parse_args(argv)
    load_flag = a.load
    try:
        config, tok_dir, ref_config, lora, dims, ds_config, s, fresh_start = preflight(kind, a)
        failure = None
    except UserError as e:
        if not launched_with_peers():
            raise
        failure = e  # the other ranks are waiting for this one: tell them (connect) rather than leave them hanging
    connect(failure, load_flag)

    rank, world = start_distributed(kind, a, config, dims, ds_config, s)
    if fresh_start and rank == 0:
        print(fresh_start)
    train_ds, valid_ds = build_datasets(kind, a, s)
    engine = build_model_and_engine(kind, a, config, dims, ds_config, lora)
    objective = dpo.build_objective(a, ref_config, dims, engine, rank == 0) if kind == "dpo" else lm_objective
    progress = resume(kind, a, engine, config, dims, rank == 0)
    if lora is not None and a.load:
        restore_frozen_base(engine.module, a.pretrained)
    monitor = open_monitor(kind, a, config, dims, ds_config, tok_dir, world, progress.iteration, rank == 0)
    if a.save and rank == 0:
        write_lora_record(a.save, lora)
    try:
        with StopRequest() as stop:  # SIGTERM/SIGINT: save at the current step and exit 0
            return train(engine, config, train_ds, valid_ds, s, monitor, dims.dp_group, progress, stop, faults,
                         objective)
    finally:
        monitor.close()


def run_script(kind: str, argv=None, faults: Faults | None = None) -> None:
    """What launch/{kind}.py runs: main on argv (default sys.argv), a UserError as one
    `launch/{kind}.py: error: ...` line and exit status 2."""
    with exit_on_user_error(f"launch/{kind}.py"):
        main(kind, argv, faults)
    shutdown_distributed()
