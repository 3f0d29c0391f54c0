#!/usr/bin/env python
"""Export a megatron_lite checkpoint to a stock transformers folder (no remote code).

    python tools/convert_to_hf.py --load CKPT --output HFDIR [--tag global_step30] [--dtype bfloat16]
    python tools/convert_to_hf.py --load LORA_CKPT --output ADAPTER_DIR --adapter-only

Dense SwiGLU models become LlamaForCausalLM, MoE models MixtralForCausalLM; with QK-norm (the `tiny` preset)
Qwen3ForCausalLM / Qwen3MoeForCausalLM. HFDIR gets config.json,
generation_config.json, model.safetensors and the tokenizer (with its chat template), so
`AutoModelForCausalLM.from_pretrained(HFDIR)` and `AutoTokenizer.from_pretrained(HFDIR)` load it.
Reads every checkpoint layout training writes: any ZeRO stage, expert-parallel `layer_*_expert_*` files.
A LoRA checkpoint (launch/sft.py --lora-rank) exports with its adapters merged into the weights; with
--adapter-only it becomes a peft adapter folder (adapter_config.json + adapter_model.safetensors) for the HF
export of its base: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HFDIR), ADAPTER_DIR).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="megatron_lite checkpoint folder (holds model_config.json)")
    ap.add_argument("--output", required=True, help="HF folder to write (created if missing)")
    ap.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one in CKPT/latest)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dtype of the saved weights (default: as stored in the checkpoint)")
    ap.add_argument("--adapter-only", action="store_true",
                    help="LoRA checkpoints: write only the adapters, as a peft adapter folder for the HF export "
                         "of the --pretrained base (MoE expert adapters go on transformers' fused expert tensors "
                         "through peft's target_parameters)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error("convert_to_hf"):
        from megatron_lite.checkpoint.load import load_full_state_dict
        from megatron_lite.inference.loading import load_tokenizer_for, parse_dtype
        from megatron_lite.convert.hf import check_exportable, hf_arch, save_hf_folder

        if args.adapter_only:
            return export_adapter(args)
        config, sd = load_full_state_dict(args.load, args.tag)
        check_exportable(config)
        tokenizer = load_tokenizer_for(args.load)
        if tokenizer is None:
            print(f"convert_to_hf: warning: no tokenizer in {args.load}/tokenizer; HF folder has weights only",
                  file=sys.stderr)
        save_hf_folder(args.output, config, sd, tokenizer, parse_dtype(args.dtype))
        print(f"wrote {hf_arch(config).architecture} ({config.num_params() / 1e6:.2f}M params) to {args.output}")


def export_adapter(args):
    from megatron_lite.checkpoint.load import load_full_state_dict
    from megatron_lite.checkpoint.lora import lora_record_for
    from megatron_lite.config import ModelConfig
    from megatron_lite.convert.hf import check_exportable
    from megatron_lite.convert.peft_adapter import save_peft_adapter
    from megatron_lite.errors import UserError
    from megatron_lite.inference.loading import parse_dtype

    if not os.path.isdir(args.load):
        raise UserError(f"--load {args.load} is not a checkpoint folder")
    root, record = lora_record_for(args.load)
    if record is None:
        raise UserError(f"--adapter-only: {args.load} holds no LoRA adapters (no lora_config.json); export the "
                        "whole model without --adapter-only")
    check_exportable(ModelConfig.load(root))
    config, sd = load_full_state_dict(args.load, args.tag, merge_lora=False)
    save_peft_adapter(args.output, config, sd, record, parse_dtype(args.dtype))
    print(f"wrote peft LoRA adapter (rank {record.rank}, alpha {record.alpha:g}, {','.join(record.targets)}) "
          f"to {args.output}")


if __name__ == "__main__":
    main()
