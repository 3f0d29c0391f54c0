#!/usr/bin/env python
"""Supervised fine-tuning from a pretraining checkpoint (loss on assistant tokens only). See --help and DESIGN §3.

    python launch/sft.py --deepspeed ds_configs/zero2.json --pretrained CKPT ...
    deepspeed --num_gpus 2 launch/sft.py --deepspeed ds_configs/zero2.json --pretrained CKPT ...
"""
from megatron_lite.training.cli import run_script

if __name__ == "__main__":
    run_script("sft")
