#!/usr/bin/env bash
# Single node, end to end on the embedded corpus: tokenizer -> data -> pretrain (2 ranks, ZeRO-2) -> SFT -> eval.
# CPU: each rank is a gloo process (about 1 core each); GPUs: one rank per GPU, bf16 picked automatically.
#   bash launch/single_node.sh [WORKDIR] [NUM_RANKS]   (after installing; see README)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/quickstart}
N=${2:-2}
ITERS=${ITERS:-200}
PORT=${MASTER_PORT:-29500}  # another run on this machine holds 29500? set MASTER_PORT
mkdir -p "$W"

python -m megatron_lite.data.corpus --output-dir "$W/corpus"
python tools/train_tokenizer.py --input "$W/corpus/pretrain_train.jsonl" --vocab-size 6400 --output-dir "$W/tokenizer"
python tools/preprocess_data.py --input "$W/corpus/pretrain_train.jsonl" --output-prefix "$W/pretrain" \
    --tokenizer "$W/tokenizer" --append-eod --workers 2
python tools/preprocess_data.py --input "$W/corpus/sft_train.jsonl" --output-prefix "$W/sft" \
    --tokenizer "$W/tokenizer" --chat

# Pretrain: global batch 16 = micro 4 x N ranks x grad-accum; a checkpoint every 100 steps. No optimizer,
# lr or schedule flags: `--model tiny` brings its tuned recipe (megatron_lite/training/recipe.py).
deepspeed --num_gpus "$N" --master_port "$PORT" launch/pretrain.py --deepspeed ds_configs/zero2.json --model tiny \
    --tokenizer "$W/tokenizer" --data-path "$W/pretrain_text_document" --split 969,30,1 \
    --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" --save "$W/ckpt" \
    --save-interval 100 --eval-interval 50 --eval-iters 2 --log-interval 10
# Resuming is the same command plus --load (after raising --train-iters, or after a crash):
#   deepspeed ... launch/pretrain.py ... --load "$W/ckpt"

deepspeed --num_gpus "$N" --master_port "$PORT" launch/sft.py --deepspeed ds_configs/zero2.json --pretrained "$W/ckpt" \
    --data-path "$W/sft_text_document" --seq-length 256 --micro-batch-size 4 --global-batch-size 16 \
    --train-iters $((ITERS / 2)) --save "$W/sft_ckpt" --log-interval 10

python launch/eval.py --load "$W/ckpt" --data-path "$W/pretrain_text_document" --seq-length 256 --splits valid
python tools/generate.py --load "$W/sft_ckpt" --prompt "What is 12 + 30?" --max-new-tokens 16 --greedy || true
