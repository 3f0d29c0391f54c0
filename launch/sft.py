#!/usr/bin/env python
"""Supervised fine-tuning from a pretraining checkpoint (loss on assistant tokens only). See --help and DESIGN §3.

    python launch/sft.py --deepspeed ds_configs/zero2.json --pretrained CKPT ...
    deepspeed --num_gpus 2 launch/sft.py --deepspeed ds_configs/zero2.json --pretrained CKPT ...

Whole conversations are packed into each --seq-length sample (each attends only to itself, positions
restart), so little compute goes to padding; --no-pack trains one right-padded conversation per sample.
"""
from megatron_lite.training.cli import run_script

if __name__ == "__main__":
    run_script("sft")
