#!/usr/bin/env python
"""Loss and perplexity of a checkpoint on a split of a dataset.

    python launch/eval.py --load CKPT --data-path P_text_document [--split 969,30,1] [--splits valid test]
    deepspeed --num_gpus 2 launch/eval.py --load CKPT --data-path P_text_document --ep 2   # MoE, experts sharded

Prints one JSON object per split: {"split", "loss", "ppl", "samples", "step"}; --output appends them to a file.
The model, tokenizer and weights all come from CKPT (model_config.json + DeepSpeed checkpoint, experts included).
"""
import argparse
import json
import logging

from megatron_lite.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (its 'latest' is evaluated)")
    p.add_argument("--data-path", nargs="+", required=True, help="dataset prefix or Megatron blend 'W1 P1 W2 P2'")
    p.add_argument("--sft", action="store_true", help="the data is SFT data (preprocess_data.py --chat): "
                   "loss on assistant tokens only")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="with --sft: whole conversations packed into each sample, as launch/sft.py trains by default; "
                        "--no-pack: one conversation per sample, as `launch/sft.py --no-pack` trains")
    p.add_argument("--split", default="969,30,1", help="train,valid,test document proportions (as in training)")
    p.add_argument("--splits", nargs="+", default=["valid"], choices=["train", "valid", "test"],
                   help="which splits to evaluate")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per rank per forward")
    p.add_argument("--eval-iters", type=int, default=10, help="batches of micro x ranks samples per split")
    p.add_argument("--seed", type=int, default=1234, help="data shuffle seed (use the training seed)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
    p.add_argument("--output", default=None, help="append the result lines to this JSONL file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> list:
    a = build_parser().parse_args(argv)
    for flag, v in (("--seq-length", a.seq_length), ("--micro-batch-size", a.micro_batch_size),
                    ("--eval-iters", a.eval_iters), ("--ep", a.ep)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    from deepspeed.utils import logger as ds_logger

    from megatron_lite.checkpoint.load import check_checkpoint_dir, load_weights_into
    from megatron_lite.config import ModelConfig
    from megatron_lite.parallel import ParallelDims, bf16_supported, init_distributed
    from megatron_lite.training.engine import build_engine, build_model
    from megatron_lite.training.loop import TrainSettings, evaluate

    tag = check_checkpoint_dir(a.load)
    config = ModelConfig.load(a.load)
    if a.seq_length > config.max_seq_len:
        raise UserError(f"--seq-length {a.seq_length} exceeds the model's max_seq_len {config.max_seq_len}")
    ds_logger.setLevel(logging.WARNING)
    rank, world = init_distributed()
    dims = ParallelDims.from_world(world, tp=1, ep=a.ep, num_experts=config.num_experts if config.is_moe else None).build()
    ds_config = {"train_micro_batch_size_per_gpu": a.micro_batch_size, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": bf16_supported()}, "zero_optimization": {"stage": 0},
                 "steps_per_print": 10**9}
    model = build_model(config, dims, a.seed)
    load_weights_into(model, a.load)  # any tp / ep layout the checkpoint was saved with
    engine = build_engine(model, ds_config, dims, train=False)

    n = a.eval_iters * a.micro_batch_size * dims.dp
    if a.sft:
        from megatron_lite.data.sft_dataset import build_sft_datasets
        splits = build_sft_datasets(a.data_path, a.split, a.seq_length, a.seed, (n, n, n), pack=a.pack)
    else:
        from megatron_lite.data.gpt_dataset import build_gpt_datasets
        splits = build_gpt_datasets(a.data_path, a.split, a.seq_length, a.seed, (n, n, n))
    datasets = dict(zip(("train", "valid", "test"), splits))
    s = TrainSettings(train_iters=0, micro_batch_size=a.micro_batch_size, grad_accum=1, dp_size=dims.dp,
                      dp_rank=dims.dp_rank, seq_length=a.seq_length, seed=a.seed, eval_iters=a.eval_iters)
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else None
    results = []
    for split in a.splits:
        ds = datasets[split]
        if ds is None:
            raise UserError(f"split {split!r} is empty for --split {a.split}")
        loss, ppl = evaluate(engine, ds, s, dims.dp_group)
        results.append({"split": split, "loss": loss, "ppl": ppl, "samples": min(n, len(ds)), "step": step,
                        "checkpoint": a.load})
    if rank == 0:
        for r in results:
            print(json.dumps(r))
        if a.output:
            with open(a.output, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    with exit_on_user_error("launch/eval.py"):
        main()
