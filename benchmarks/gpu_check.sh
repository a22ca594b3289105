#!/usr/bin/env bash
# The one-shot GPU check: on a machine with one NVIDIA GPU, PyTorch installed and no
# network, in one call:
#
#   benchmarks/gpu_check.sh             # install, CUDA tests, exactness, full-size benchmark
#   benchmarks/gpu_check.sh --dry-run   # any machine: check the wheels, print the plan
#   GPU_CHECK_FULL=0 benchmarks/gpu_check.sh   # a short rerun: no full-size benchmark
#
# The wheels PreFast needs beyond the GPU image's own packages (zarr, numcodecs,
# crc32c, donfig, google-crc32c) come from .whl/ (git ignores it; `make gpu-wheels`
# fills it on a machine with network access); torch stays the machine's own.
# Time budget: 7 minutes of wall-clock on one H200 (GPU_CHECK_BUDGET_S=420):
#   1. install the wheels and PreFast into /tmp/prefast-site        ~20 s
#   2. the tests marked `cuda` (pytest -m cuda), capped at           150 s
#   3. gpu_bench.py: exactness on CUDA (~1 min), then the full-size
#      benchmark sized from a first short timing to what is left     the rest, 30 s spare
# Results (at most 8 files, as the device tool brings back) go to $OUT, else runs/gpu:
#   cuda_tests.txt gpu_bench.log gpu_exactness.{json,md} gpu_full.{json,md,png}
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; fi
WHEELS=${PREFAST_WHEELS:-.whl}
OUT=${OUT:-runs/gpu}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
FULL=${GPU_CHECK_FULL:-1}
SPARE_S=30
SITE=/tmp/prefast-site
PY=${PYTHON:-python3}
start=$(date +%s)

echo "gpu_check: budget ${BUDGET_S}s of wall-clock: install ~20s, cuda tests <= ${TESTS_S}s," \
     "exactness + full-size benchmark the rest less ${SPARE_S}s spare"
$PY benchmarks/gpu_wheels.py check "$WHEELS"
if [[ $dry == 1 ]]; then
    cat <<PLAN
gpu_check: dry run, nothing installed or run. On the GPU machine this runs:
  1. $PY -m pip install --no-index --no-deps --target $SITE $WHEELS/*.whl  (and PreFast itself)
  2. timeout ${TESTS_S}s $PY -m pytest -m cuda tests           -> \$OUT/cuda_tests.txt
  3. $PY benchmarks/gpu_bench.py --out \$OUT --budget-s <left>  -> \$OUT/gpu_exactness.{json,md},
     \$OUT/gpu_full.{json,md,png} (synthetic 50,000/10,000, DenseNet-BC k=12 at the largest
     depth and epoch count that fit, t0 0.6, augment none, freezeout/prefast and baseline
     if it fits; the plan with each boundary's tier, saving, cost and the measured
     bandwidths printed first), \$OUT/gpu_bench.log
PLAN
    exit 0
fi

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU is visible'; \
print('gpu_check:', torch.__version__, torch.cuda.get_device_name())"
mkdir -p "$OUT"
rm -rf "$SITE"  # a warm machine's earlier install must not shadow this checkout
$PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
$PY -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$SITE" .
# PYTHONSAFEPATH: the checkout's own prefast/ folder must not shadow the installed package.
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
echo "gpu_check: installed in $(( $(date +%s) - start ))s"

set +e
timeout "$TESTS_S" $PY -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/cuda_tests.txt" 2>&1
tests_rc=$?
set -e
tail -n 5 "$OUT/cuda_tests.txt"
echo "gpu_check: cuda tests exit $tests_rc after $(( $(date +%s) - start ))s"

left=$(( BUDGET_S - ($(date +%s) - start) - SPARE_S ))
only=(); if [[ $FULL == 0 ]]; then only=(--exactness-only); fi
$PY benchmarks/gpu_bench.py --out "$OUT" --budget-s "$left" "${only[@]}" 2>&1 | tee "$OUT/gpu_bench.log"
echo "gpu_check: done in $(( $(date +%s) - start ))s (cuda tests exit $tests_rc)"
exit "$tests_rc"
