#!/usr/bin/env bash
# GPU check of the search loop, bits first, then speed:
#   1. the tests that compare the in-place path with the reference formulas, and the compiled (Triton) kernels with
#      eager ones, on the GPU (pytest -k cuda; at most 120 s; the whole output in bit_tests.log);
#   2. ViT-Base at 224, 1000 calibration images (10 batches of 100), one GPU, 32-true and bf16-mixed: per block
#      position the seconds per candidate, per generation, of the FP floor and of the original's naive loop, with
#      the ratios candidate/floor (target <= 1.3) and naive/candidate (target >= 3 averaged over the 12 positions);
#      both for the eager inference path and for the compiled one-pass quantizer kernels (--ops fast fused,
#      evolq_pl.quant.fused), side by side, each position also scoring one shared probe both ways (bitwise alike?);
#      only the eager path where step 1 found the compiled kernels giving other bits (fused=true refuses to run then).
# Step 2 starts no new block position after 120 s per precision (plus the kernels' compiles), so the script should
# end within about 8 minutes on an H100.
#
#   scripts/gpu_check.sh                          # run from anywhere; works from the repo root
#   EVOLQ_GPU_CHECK_SMOKE=1 scripts/gpu_check.sh  # CPU smoke run of the same steps (DeiT-Tiny, 4 images, last block)
#
# Output: bit_tests.log, speed_*.json and gpu_check.log under $OUT when set, else under outputs/gpu_check/.
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

imports_ok() { "$1" -c "import benchmarks.speed, pytest" >/dev/null 2>&1; }  # the project on this torch, timm, lightning

if ! imports_ok "$PY"; then
    # only what the benchmark imports, with the ranges of requirements.txt (torch itself comes from the system)
    mapfile -t REQS < <(grep -E '^(timm|lightning|torchmetrics|numpy|pytest)[<>=! ]' requirements.txt)
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
    imports_ok "$PY" || { "$PY" -c "import benchmarks.speed, pytest" 2>&1 | tail -3 | tee -a "$LOG"; exit 1; }
fi

if [ "${EVOLQ_GPU_CHECK_SMOKE:-0}" = "1" ]; then
    DEVICE=cpu MODEL=deit_tiny N=4 BS=2 REPEATS=1 BLOCKS="-1" BUDGET=0
    BITS_TESTS=(-k "cpu and quantized_vit")
    EXTRA=(--threads 1)
else
    DEVICE=cuda MODEL=vit_base N=1000 BS=100 REPEATS=3 BLOCKS="" BUDGET=120
    BITS_TESTS=(-k cuda)
    EXTRA=()
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: set EVOLQ_GPU_CHECK_SMOKE=1 for a CPU smoke run')"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

START=$(date +%s)
# bits first: eager in-place path against the reference formulas, compiled kernels against eager, on this device
timeout 120 "$PY" -m pytest tests/quant/test_fast_paths.py tests/quant/test_fused.py -p no:cacheprovider -rfE \
    "${BITS_TESTS[@]}" >"$DEST/bit_tests.log" 2>&1; echo "bit tests: exit $? (124: cut at 120 s)" | tee -a "$LOG"
grep -E "passed|failed|^FAILED|^ERROR" "$DEST/bit_tests.log" | tail -12 | tee -a "$LOG"
OPS=(fast fused)
if grep -q "^FAILED tests/quant/test_fused.py" "$DEST/bit_tests.log"; then
    # fused=true checks its kernels at run time and would stop the benchmark: time the eager path alone
    OPS=(fast)
    echo "the compiled kernels differ from eager on this device: timing --ops fast only" | tee -a "$LOG"
fi
BLOCK_ARGS=()
[ -n "$BLOCKS" ] && BLOCK_ARGS=("--blocks=$BLOCKS")
# both precisions and both inference paths in one process (one model, one calibration); --budget-s counts per
# precision; positions are measured farthest-first (0, 11, 5, ...), so a cut-off run still spans the depth
"$PY" -m benchmarks.speed --device "$DEVICE" --models "$MODEL" --calib-sizes "$N" --batch-size "$BS" \
    --repeats "$REPEATS" --precision 32-true bf16-mixed --ops "${OPS[@]}" --budget-s "$BUDGET" "${BLOCK_ARGS[@]}" \
    "${EXTRA[@]}" --out "$DEST/speed_${MODEL}_${N}.json" 2>&1 | tee -a "$LOG"
echo "gpu_check done in $(( $(date +%s) - START )) s; results in $DEST" | tee -a "$LOG"
