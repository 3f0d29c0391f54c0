#!/usr/bin/env bash
# The GPU path, checked on a CUDA machine: what CPU CI cannot show. Run from the repository root:
#     OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# On a machine without a package index, put the wheels of deepspeed and its missing dependencies in .wheels/
# first (pip download ... -d .wheels). Every log lands in $OUT; the last lines say what held.
# 1. the main job end to end on one GPU (bf16 chosen by the ds_config's "auto", SDPA / flash-attn),
# 2. exact resume in bf16 (20 steps straight vs 10 + --load 10),
# 3. the HF export's logits against ours on the GPU, and compiled + eager generation on CUDA.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check}"
W="${WORK:-/tmp/gpu_check_work}"
mkdir -p "$OUT" "$W"
export PYTHONPATH="$PWD" WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=python3
if ! $PY -c "import deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-build-isolation --find-links .wheels deepspeed 2>&1 | tail -3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__,
'flash_attn', __import__('importlib').util.find_spec('flash_attn') is not None)"; } 2>&1 | grep -v real_accelerator | tee "$OUT/env.txt"

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, record pass/fail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || tail -25 "$OUT/$name.log"
  return $rc
}

step main_job 300 $PY launch/main_job.py --nproc 1 --work-dir "$W/mj"
cp "$W/mj/summary.json" "$OUT/main_job_summary.json" 2>/dev/null
grep -m3 -iE "bf16|bfloat16|dtype" "$OUT/main_job.log" | tee -a "$OUT/summary.txt"

# exact resume in bf16 on the main job's data
ARGS=(--deepspeed ds_configs/zero2.json --model tiny --tokenizer "$W/mj/tokenizer"
      --data-path "$W/mj/data/pretrain_train_text_document" --split 969,30,1 --seq-length 256
      --micro-batch-size 8 --train-iters 20 --seed 1234 --save-interval 10 --log-interval 1 --eval-interval 1000)
DS=(deepspeed --num_gpus 1 --master_port 29611 launch/pretrain.py)
rm -rf "$W/straight" "$W/resumed"
step resume_straight 150 "${DS[@]}" "${ARGS[@]}" --save "$W/straight" &&
  mkdir -p "$W/resumed" && cp -r "$W/straight/global_step10" "$W/straight/model_config.json" \
    "$W/straight/tokenizer" "$W/resumed/" && echo global_step10 > "$W/resumed/latest" &&
  step resume_load 150 "${DS[@]}" "${ARGS[@]}" --save "$W/resumed" --load "$W/resumed" &&
  $PY - "$W" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r and "step" in r}
a, b = losses(sys.argv[1] + "/straight"), losses(sys.argv[1] + "/resumed")
diff = max(abs(a[s] - b[s]) for s in b if s > 10)
print(f"bf16 resume on GPU: steps {sorted(s for s in b if s > 10)[:1]}..{max(b)}, max |loss diff| = {diff:.3g}",
      "EXACT" if diff == 0 else "")
EOF

step hf_parity 120 $PY - "$W/mj" <<'EOF'
import sys, torch
from transformers import AutoModelForCausalLM
from megatron_lite.inference.loading import load_model
w = sys.argv[1]
model, tok = load_model(f"{w}/ckpt_sft", device="cuda", dtype="float32")
hf = AutoModelForCausalLM.from_pretrained(f"{w}/hf", dtype=torch.float32).cuda().eval()
ids = torch.tensor([tok("def add(a, b):\n    return")["input_ids"]], device="cuda")
with torch.no_grad():
    diff = float((model(ids).logits.float() - hf(ids).logits.float()).abs().max())
print(f"HF export vs ours on cuda, fp32: max |logit diff| = {diff:.3g}")
EOF
grep -v real_accelerator "$OUT/hf_parity.log" | tail -1 | tee -a "$OUT/summary.txt"
for c in "" --compile; do
  step "generate${c:+_compiled}" 180 $PY tools/generate.py --load "$W/mj/ckpt_sft" --device cuda --chat --greedy \
    --max-new-tokens 24 --prompt "What is 12 + 30?" $c && tail -2 "$OUT/generate${c:+_compiled}.log" | tee -a "$OUT/summary.txt"
done
echo "=== summary"; cat "$OUT/summary.txt"
