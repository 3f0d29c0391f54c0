#!/usr/bin/env python
"""Supervised fine-tuning from a pretraining checkpoint (loss on assistant tokens only). See --help and DESIGN §3.

    python launch/sft.py --deepspeed ds_configs/zero2.json ...
    deepspeed --num_gpus 2 launch/sft.py --deepspeed ds_configs/zero2.json ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import exit_on_user_error  # noqa: E402
from megatron_lite.training.run import main  # noqa: E402

if __name__ == "__main__":
    with exit_on_user_error("launch/sft.py"):
        main("sft")
