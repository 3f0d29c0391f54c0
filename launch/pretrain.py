#!/usr/bin/env python
"""Pretrain a GPT (dense or MoE) on DeepSpeed ZeRO. See --help and DESIGN §3.

    python launch/pretrain.py --deepspeed ds_configs/zero2.json ...
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json ...
"""
from megatron_lite.training.cli import run_script

if __name__ == "__main__":
    run_script("pretrain")
