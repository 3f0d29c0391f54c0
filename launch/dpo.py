#!/usr/bin/env python
"""DPO (Direct Preference Optimization) from a pretrained or SFT checkpoint. See --help and DESIGN §3.

    python launch/dpo.py --deepspeed ds_configs/zero2.json --pretrained CKPT --data-path P --beta 0.1 ...
    deepspeed --num_gpus 2 launch/dpo.py --deepspeed ds_configs/zero2.json --pretrained CKPT --data-path P ...

P comes from `tools/preprocess_data.py --preference`. The policy starts from --pretrained; the frozen
reference model is --ref (default: --pretrained). Checkpoints are those of SFT: every tool reads them.
"""
from megatron_lite.training.cli import run_script

if __name__ == "__main__":
    run_script("dpo")
