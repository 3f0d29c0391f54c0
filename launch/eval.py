#!/usr/bin/env python
"""Loss and perplexity of a checkpoint on a split of a dataset, or lm-evaluation-harness tasks on an HF export.

    python launch/eval.py --load CKPT --data-path P_text_document [--split 969,30,1] [--splits valid test]
    deepspeed --num_gpus 2 launch/eval.py --load CKPT --data-path P_text_document --ep 2   # MoE, experts sharded
    python launch/eval.py --harness --hf HFDIR --output F.json [--tasks ml_arithmetic ml_docstring_mc ml_heldout_bpb]

Loss mode prints one JSON object per split: {"split", "loss", "ppl", "samples", "step"}; --output appends them
to a file. The model, tokenizer and weights all come from CKPT (model_config.json + DeepSpeed checkpoint,
experts included).

Harness mode runs EleutherAI's lm_eval (`--model hf`) on HFDIR (tools/convert_to_hf.py) with the local tasks
shipped in megatron_lite/eval/tasks, which read the embedded corpus' held-out data (no download); any other
task name (hellaswag, arc_easy, ...) comes from lm_eval's registry. --output gets lm_eval's results JSON
(`results.TASK["METRIC,FILTER"]`, e.g. results.ml_heldout_bpb["bits_per_byte,none"]).
"""
import argparse
import json
import logging

from megatron_lite.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint folder (its 'latest' is evaluated); required "
                   "without --harness")
    p.add_argument("--data-path", nargs="+", default=None, help="dataset prefix or Megatron blend 'W1 P1 W2 P2'; "
                   "required without --harness")
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
    p.add_argument("--output", default=None, help="append the result lines to this JSONL file (with --harness: "
                   "write lm_eval's results JSON to this file)")
    h = p.add_argument_group("lm-evaluation-harness (--harness)")
    h.add_argument("--harness", action="store_true", help="run EleutherAI's lm_eval on the HF export --hf "
                   "instead of the loss evaluation")
    h.add_argument("--hf", default=None, help="HF model folder (tools/convert_to_hf.py --output)")
    h.add_argument("--tasks", nargs="+", default=None, help="lm_eval task names; default: the local tasks "
                   "ml_arithmetic (held-out arithmetic, exact match), ml_docstring_mc (stdlib docstring "
                   "multiple choice, acc) and ml_heldout_bpb (held-out stdlib files, bits per byte); other "
                   "names come from lm_eval's registry and download their data")
    h.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task "
                   "(quick checks; scores on a subset are not comparable)")
    h.add_argument("--batch-size", type=int, default=8, help="lm_eval batch size")
    h.add_argument("--device", default=None, help="torch device for lm_eval (default: cuda if available, else cpu)")
    h.add_argument("--dtype", default=None, help="model dtype for lm_eval (default: float32 on cpu, else the "
                   "folder's own dtype)")
    h.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template: auto = when the tokenizer has one (our "
                   "exports are fine-tuned on ChatML and the local tasks ask its user turns)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_harness(a) -> dict:
    from megatron_lite.eval.harness import run_harness as run

    if a.hf is None:
        raise UserError("--harness needs --hf HFDIR (an HF export: tools/convert_to_hf.py --load CKPT --output HFDIR)")
    results = run(a.hf, a.tasks, a.output, limit=a.limit, batch_size=a.batch_size, device=a.device,
                  dtype=a.dtype, chat_template={"auto": None, "on": True, "off": False}[a.chat_template])
    if results:
        from lm_eval.utils import make_table

        print(make_table(results))
        if a.output:
            print(f"results: {a.output}")
    return results


def main(argv=None) -> list | dict:
    a = build_parser().parse_args(argv)
    if a.harness:
        return run_harness(a)
    if a.hf is not None:
        raise UserError("--hf is for --harness; the loss evaluation reads our checkpoint: --load CKPT")
    for flag, v in (("--load", a.load), ("--data-path", a.data_path)):
        if v is None:
            raise UserError(f"{flag} is required (or evaluate an HF export with --harness --hf HFDIR)")
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
    from megatron_lite.parallel import shutdown_distributed

    shutdown_distributed()
