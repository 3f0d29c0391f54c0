#!/usr/bin/env bash
# Multi-node pretraining with the `deepspeed` launcher (pdsh/ssh to every host in the hostfile).
# Requirements: the same repo path and Python env on every node, passwordless ssh from this node,
# a shared filesystem for --save (rank 0 writes `latest` and renames checkpoint folders).
#
# hostfile (one line per node, slots = GPUs, or CPU processes, on that node):
#     node1 slots=8
#     node2 slots=8
#
#   bash launch/multinode.sh hostfile DATA_PREFIX TOKENIZER_DIR CKPT
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:?hostfile}; DATA=${2:?data prefix}; TOK=${3:?tokenizer dir}; CKPT=${4:?checkpoint dir}
MASTER=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")

# 16 ranks: --ep 4 spreads the 8 experts of every layer over 4 ranks (2 each); attention and the router are
# replicated over all 16 data-parallel ranks. Global batch 256 = micro 8 x dp 16 x grad-accum 2.
# (Dense models can use --tp 2 instead, which keeps tensor-parallel pairs inside a node; MoE + tp is refused.)
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER" --master_port 29500 \
    launch/pretrain.py --deepspeed ds_configs/zero2.json --model mini-moe --ep 4 \
    --tokenizer "$TOK" --data-path "$DATA" --seq-length 2048 --micro-batch-size 8 --global-batch-size 256 \
    --train-iters 20000 --lr 3e-4 --min-lr 3e-5 --warmup-iters 500 --save "$CKPT" --save-interval 1000 \
    --eval-interval 1000 --eval-iters 10 --log-interval 10 --wandb-project megatron_lite
# To resume after a failure or to extend --train-iters: the same command plus --load "$CKPT".
