#!/usr/bin/env bash
# GPU speed check of the search loop: ViT-Base at 224, 1000 calibration images (10 batches of 100), one GPU,
# 32-true and bf16-mixed. Prints per block position the seconds per candidate, per generation, of the FP floor
# and of the original's naive loop, with the ratios candidate/floor (target <= 1.3) and naive/candidate
# (target >= 3 averaged over the 12 positions); then the eager inference path next to the compiled one-pass
# quantizer kernels (--ops fast fused, evolq_pl.quant.fused) on up to three positions. Each precision starts no new
# block position after 130 s (the fast/fused comparison after 45 s, plus its compiles), so the script should end
# within about 9 minutes on an H100.
#
#   scripts/gpu_check.sh                          # run from anywhere; works from the repo root
#   EVOLQ_GPU_CHECK_SMOKE=1 scripts/gpu_check.sh  # CPU smoke run of the same steps (DeiT-Tiny, 4 images, last block)
#
# Output: speed_*.json and gpu_check.log under $OUT when set, else under outputs/gpu_check/.
# Needs a python with torch (PYTHON, default python3). When timm, lightning or torchmetrics do not import, they
# are installed into a venv (EVOLQ_GPU_VENV, default evolq-gpu-venv in $TMPDIR) that sees that python's torch: from the
# wheels in .whl/ when that folder exists (pip install --no-index --find-links .whl), else from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEST=${OUT:-outputs/gpu_check}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: >"$LOG"

imports_ok() { "$1" -c "import benchmarks.speed" >/dev/null 2>&1; }  # the project on this torch, timm, lightning

if ! imports_ok "$PY"; then
    # only what the benchmark imports, with the ranges of requirements.txt (torch itself comes from the system)
    mapfile -t REQS < <(grep -E '^(timm|lightning|torchmetrics|numpy)[<>=! ]' requirements.txt)
    FROM=()
    [ -d .whl ] && FROM=(--no-index --find-links .whl)
    VENV=${EVOLQ_GPU_VENV:-${TMPDIR:-/tmp}/evolq-gpu-venv}
    case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
    echo "installing ${REQS[*]} into $VENV ${FROM[*]}" | tee -a "$LOG"
    if [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1; then
        # the parent python may itself be a venv, whose packages (torch) --system-site-packages does not show
        "$PY" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" \
            >"$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_parent.pth"
        # with their dependencies; if pip cannot square those with the given torch, without them
        "$VENV/bin/python" -m pip install -q "${FROM[@]}" "${REQS[@]}" >>"$LOG" 2>&1 ||
            if [ -d .whl ]; then "$VENV/bin/python" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$LOG"
            else "$VENV/bin/python" -m pip install -q --no-deps "${REQS[@]}" 2>&1 | tee -a "$LOG"; fi
        PY="$VENV/bin/python"
    else  # no venv module or no ensurepip: install next to the system packages, without their dependencies
        if [ -d .whl ]; then
            "$PY" -m pip install -q --no-deps --target "$VENV/site" .whl/*.whl 2>&1 | tee -a "$LOG"
        else
            "$PY" -m pip install -q --no-deps --target "$VENV/site" "${REQS[@]}" 2>&1 | tee -a "$LOG"
        fi
        export PYTHONPATH="$VENV/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    imports_ok "$PY" || { "$PY" -c "import benchmarks.speed" 2>&1 | tail -3 | tee -a "$LOG"; exit 1; }
fi

if [ "${EVOLQ_GPU_CHECK_SMOKE:-0}" = "1" ]; then
    DEVICE=cpu MODEL=deit_tiny N=4 BS=2 REPEATS=1 BLOCKS="-1" BUDGET=0 AB_BLOCKS="-1" AB_BUDGET=0
    EXTRA=(--threads 1)
else
    DEVICE=cuda MODEL=vit_base N=1000 BS=100 REPEATS=3 BLOCKS="" BUDGET=130 AB_BLOCKS="0,6,11" AB_BUDGET=45
    EXTRA=()
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: set EVOLQ_GPU_CHECK_SMOKE=1 for a CPU smoke run')"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

START=$(date +%s)
BLOCK_ARGS=()
[ -n "$BLOCKS" ] && BLOCK_ARGS=(--blocks "$BLOCKS")
# both precisions in one process (one model, one calibration); --budget-s counts per precision
"$PY" -m benchmarks.speed --device "$DEVICE" --models "$MODEL" --calib-sizes "$N" --batch-size "$BS" \
    --repeats "$REPEATS" --precision 32-true bf16-mixed --ops fast --budget-s "$BUDGET" "${BLOCK_ARGS[@]}" \
    "${EXTRA[@]}" --out "$DEST/speed_${MODEL}_${N}.json" 2>&1 | tee -a "$LOG"
# eager next to fused kernels, side by side in one run, three positions, fp32
"$PY" -m benchmarks.speed --device "$DEVICE" --models "$MODEL" --calib-sizes "$N" --batch-size "$BS" \
    --repeats 2 --precision 32-true --ops fast fused --blocks "$AB_BLOCKS" --budget-s "$AB_BUDGET" \
    "${EXTRA[@]}" --out "$DEST/speed_${MODEL}_${N}_ops_ab.json" 2>&1 | tee -a "$LOG"
echo "gpu_check done in $(( $(date +%s) - START )) s; results in $DEST" | tee -a "$LOG"
