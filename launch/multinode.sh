#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher and a hostfile (one `HOST slots=N` line per node, N = GPUs,
# or CPU processes, on that node):
#
#   bash launch/multinode.sh HOSTFILE launch/pretrain.py FLAGS...        # any script and its flags
#
# Two ways to start it (tests/test_multinode.py runs the second over loopback):
# * NODE_RANK unset: run it once, on the hostfile's first node. DeepSpeed's default launcher starts every node
#   through pdsh + passwordless ssh (pdsh installed here, sshd on every host).
# * NODE_RANK=R set: run it on every node yourself (from srun, a job runner, by hand), R = that node's line in
#   the hostfile counting from 0 (`deepspeed --no_ssh`: no ssh, no pdsh).
# MASTER_ADDR: an address of node 0 every node can reach (default: the hostfile's first host); MASTER_PORT: a
# free TCP port there (default 29500). Every node needs the same repo path and Python env. Global rank 0 writes
# `latest`, metrics.jsonl and the run files into --save, every rank its own shards: to resume with --load, every
# node must see the complete checkpoint (a shared filesystem, or a copy on each node).
#
# Example: 2 nodes x 8 GPUs, MiniMoE with its 8 experts spread over 4 ranks (--ep 4; attention and the router
# replicated over all 16 data-parallel ranks), global batch 256 = micro 8 x dp 16 x grad-accum 2:
#   bash launch/multinode.sh hostfile launch/pretrain.py --deepspeed ds_configs/zero2.json --model mini-moe \
#       --ep 4 --tokenizer TOK --data-path DATA_text_document --seq-length 2048 --micro-batch-size 8 \
#       --global-batch-size 256 --train-iters 20000 --lr 3e-4 --min-lr 3e-5 --warmup-iters 500 \
#       --save CKPT --load CKPT --save-interval 1000 --eval-interval 1000 --eval-iters 10 --log-interval 10
# (`--save CKPT --load CKPT` on every start resumes from the last checkpoint once there is one; dense models
# can use --tp 2, which keeps tensor-parallel pairs inside a node; MoE + tp is refused.)
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
if [ $# -lt 2 ]; then
    echo "usage: [NODE_RANK=R] [MASTER_ADDR=A] [MASTER_PORT=P] bash $0 HOSTFILE SCRIPT [FLAGS...]" >&2
    exit 2
fi
HOSTFILE=$1; shift
# Pre-flight: a hostfile DeepSpeed would misread (no slots, slots=0, a host twice, missing) is one line here.
read -r FIRST_HOST _NODES _WORLD < <(python -m megatron_lite.hostfile "$HOSTFILE") || exit 2
NODE_ARGS=()
if [ -n "${NODE_RANK:-}" ]; then
    NODE_ARGS=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed --hostfile "$HOSTFILE" "${NODE_ARGS[@]}" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" \
    --master_port "${MASTER_PORT:-29500}" "$@"
