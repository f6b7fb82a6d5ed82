#!/usr/bin/env bash
# One GPU session's evidence, in one command of at most ~9.5 minutes on an H100/H200:
#   1. times the search loop on ViT-Base at 224 with 1000 calibration images, 32-true and bf16-mixed, eager next to
#      the compiled one-pass quantizer kernels (--ops fast fused),
#   2. runs the accuracy benchmark on the shipped references (checkpoints/vit12s_fmnist.pth, levit_fmnist.pth) at
#      10 passes, W3A8 then W2A8, with eps 1e-3 (the paper's), 3e-3 and 1e-2 measured on 5000 held-out train
#      images, so that eps is chosen without the test set (python -m benchmarks.accuracy --report prints the pick).
# Fashion-MNIST's IDX files are read from FMNIST_ROOT (default .gpu/fmnist, a git-ignored copy of Debian's files).
# Everything lands in $OUT (or outputs/gpu_run). Each stage has its own time limit, so one slow stage never costs
# the others their results; the accuracy JSON keeps every finished row.
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

stage speed 200 "$PY" -m benchmarks.speed --device cuda --models vit_base --calib-sizes 1000 --batch-size 100 \
    --repeats 3 --precision 32-true bf16-mixed --ops fast fused --budget-s 60 --out "$DEST/speed_vit_base_1000.json"
for bits in 3:8 2:8; do
    for eps in 0.001 0.003 0.01; do  # seeds innermost: whatever finishes has all three seeds of its setting
        stage "accuracy_${bits/:/_}_$eps" 60 "$PY" -m benchmarks.accuracy --checkpoints checkpoints/vit12s_fmnist.pth \
            checkpoints/levit_fmnist.pth --bits "$bits" --seeds 0 1 2 --passes 10 --heldout-size 5000 \
            --set eps=$eps --device cuda --data-root "$DATA" --out "$DEST/accuracy.json"
    done
done
cat "$DEST/stages.txt"
