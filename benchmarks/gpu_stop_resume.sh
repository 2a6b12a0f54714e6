#!/usr/bin/env bash
# Stop and resume on a GPU through the real launcher: the demo recipe in bf16 gets SIGTERM at step 30 (sent to
# `accelerate launch` by tests/helpers/train_instrumented.py), saves a checkpoint and stops; the resume takes
# only the folder and finishes. Run from the repository root after gpu_session.sh's setup, or alone:
#   bash benchmarks/gpu_stop_resume.sh          (logs under $OUT, figures on stdout)
set -uo pipefail
OUT=${OUT:-/tmp/vocseg-gpu-session}
mkdir -p "$OUT"
if [ -z "${PYTHONPATH:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 \
  PYTHONUNBUFFERED=1 TQDM_DISABLE=1 VOCSEG_CACHE=${VOCSEG_CACHE:-/tmp/vocseg-cache}
LAUNCH="python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no"
RUN="$OUT/stop_resume"
ARGS=(--max_train_steps 60 --eval_steps 60 --checkpointing_steps 20 --logging_steps 10 --tracker none
      --num_workers 4 --lr_warmup_steps 5 --output_dir "$RUN")

echo "== 3a. demo, bf16, SIGTERM to the launcher at step 30"
VOCSEG_TEST_SIGNAL_AT_STEP=30 timeout 150 $LAUNCH --mixed_precision bf16 tests/helpers/train_instrumented.py \
  train.py "${ARGS[@]}" > "$OUT/stop.log" 2>&1
echo "exit $? (143: the launcher itself died of the SIGTERM; the trainer saw it and stopped)"
grep -E "step [0-9]+/|checkpoint saved|error" "$OUT/stop.log" | tail -n 3; grep -E "stopped by" "$OUT/stop.log"
echo "== 3b. resume with only the folder"
timeout 150 $LAUNCH --mixed_precision bf16 train.py --output_dir "$RUN" --resume_from_checkpoint latest \
  > "$OUT/resume.log" 2>&1
echo "exit $?"; grep -E "resumed from" "$OUT/resume.log"; grep -E "step [0-9]+/|mIoU|error" "$OUT/resume.log" | tail -n 3
ls "$RUN/checkpoints"
