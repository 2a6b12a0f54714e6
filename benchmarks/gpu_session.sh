#!/usr/bin/env bash
# The GPU checks of a session lent one GPU (an H200 through the workplace's device tool), in one call:
#   1. benchmarks/gpu_recipe.py: the DeepLabV3-R101 recipe's model step, bf16 + channels_last, crop 512, batch 4;
#   2. the real training loop (train.py under accelerate launch) on the GPU: the demo in bf16, then in fp16
#      (GradScaler path), and the DeepLabV3-R101 recipe at crop 512 on full-size synthetic VOC data.
# Run from the repository root:  bash benchmarks/gpu_session.sh      (logs under $OUT, figures on stdout)
# Packages the GPU image lacks (datasets, albumentations and their needs) travel as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/vocseg-gpu-session}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 \
  PYTHONUNBUFFERED=1 TQDM_DISABLE=1 VOCSEG_CACHE=/tmp/vocseg-cache
LAUNCH="python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__)"

echo "== 1. gpu_recipe.py (model step of the R101 recipe)"
timeout 240 python3 benchmarks/gpu_recipe.py --max-seconds 90 > "$OUT/gpu_recipe.log" 2>&1
tail -n 1 "$OUT/gpu_recipe.log"

echo "== 2a. demo through train.py, bf16"
timeout 150 $LAUNCH --mixed_precision bf16 train.py --max_train_steps 100 --eval_steps 100 \
  --checkpointing_steps 100 --logging_steps 25 --tracker tensorboard --num_workers 4 --channels_last \
  --output_dir "$OUT/demo_bf16" > "$OUT/demo_bf16.log" 2>&1
echo "exit $?"; grep -E "step [0-9]+/|mIoU|error" "$OUT/demo_bf16.log" | tail -n 6

echo "== 2b. demo through train.py, fp16 (GradScaler)"
timeout 120 $LAUNCH --mixed_precision fp16 train.py --max_train_steps 40 --eval_steps 40 \
  --checkpointing_steps 40 --logging_steps 20 --tracker none --num_workers 4 --lr_warmup_steps 5 \
  --output_dir "$OUT/demo_fp16" > "$OUT/demo_fp16.log" 2>&1
echo "exit $?"; grep -E "step [0-9]+/|mIoU|error|scaler" "$OUT/demo_fp16.log" | tail -n 4

echo "== 2c. DeepLabV3-R101 recipe through train.py, bf16, crop 512, batch 4"
python3 -m vocseg.data.synthetic /tmp/voc-full --num-train 96 --num-val 16 --seed 0 > /dev/null
timeout 200 $LAUNCH --mixed_precision bf16 train.py --config deeplabv3_r101_voc_aug --data_root /tmp/voc-full \
  --train_split train --max_train_steps 60 --eval_steps 60 --checkpointing_steps 0 --logging_steps 20 \
  --channels_last --tracker none --num_workers 8 --lr_warmup_steps 0 \
  --output_dir "$OUT/r101" > "$OUT/r101.log" 2>&1
echo "exit $?"; grep -E "step [0-9]+/|mIoU|error|global batch" "$OUT/r101.log" | tail -n 5

bash benchmarks/gpu_stop_resume.sh
