#!/usr/bin/env bash
# One GPU session's evidence, in one command of at most ~9.5 minutes on an H100/H200:
#   1. trains the two Fashion-MNIST reference models of the accuracy benchmark (12-block ViT, LeViT-style),
#   2. times the search loop on ViT-Base at 224 with 1000 calibration images, 32-true and bf16-mixed,
#   3. runs the accuracy benchmark on the new references for as long as the time budget allows.
# Fashion-MNIST's IDX files are read from FMNIST_ROOT (default .gpu/fmnist, a git-ignored copy of Debian's files).
# Everything lands in $OUT (or outputs/gpu_run). Each stage has its own time limit, so one slow stage never costs
# the others their results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
DEST=${OUT:-outputs/gpu_run}
DATA=${FMNIST_ROOT:-.gpu/fmnist}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu.txt"
"$PY" -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" | tee -a "$DEST/gpu.txt"

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $DEST/NAME.log
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" >"$DEST/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$DEST/stages.txt"
}

stage train_vit12 100 "$PY" scripts/train_reference.py --arch-kwargs vit12 --epochs 15 --batch-size 256 \
    --lr 2e-3 --device cuda --threads 8 --data-root "$DATA" --out "$DEST/vit12_fmnist.pth"
stage train_levit 100 "$PY" scripts/train_reference.py --arch-kwargs levit --epochs 15 --batch-size 256 \
    --lr 2e-3 --device cuda --threads 8 --data-root "$DATA" --out "$DEST/levit_fmnist.pth"
stage speed 170 "$PY" -m benchmarks.speed --device cuda --models vit_base --calib-sizes 1000 --batch-size 100 \
    --repeats 3 --precision 32-true bf16-mixed --ops fast --budget-s 60 --out "$DEST/speed_vit_base_1000.json"
CKPTS=()
for f in "$DEST/vit12_fmnist.pth" "$DEST/levit_fmnist.pth"; do [ -f "$f" ] && CKPTS+=("$f"); done
if [ ${#CKPTS[@]} -gt 0 ]; then
    # seeds first, so that whatever finishes has all three seeds of the first settings
    stage accuracy 170 "$PY" -m benchmarks.accuracy --checkpoints "${CKPTS[@]}" --bits 3:8 2:8 4:8 8:8 \
        --seeds 0 1 2 --passes 2 --device cuda --data-root "$DATA" --out "$DEST/accuracy.json"
fi
cat "$DEST/stages.txt"
