#!/usr/bin/env bash
# One short GPU check (under 8 minutes on one H200): set up, run the Triton
# kernels against their references ON THE GPU (a wrong kernel or a missing
# CUDA device fails, never skips), then measure kernel bandwidth beside a
# device-to-device copy, resnet50's training step under every policy, and
# the torch.compile table (tools/gpu_bench.py).
#
#   bash tools/gpu_check.sh                 # on the GPU machine
#   bash tools/gpu_check.sh --dry           # on a CPU machine: checks this script
#   bash tools/gpu_check.sh --out DIR       # results dir (default results/gpu_check/<UTC time>)
#   bash tools/gpu_check.sh --no-setup      # skip tools/setup.sh (use $PYTHON or .venv)
#
# Results: DIR/log.txt (everything printed), DIR/pytest_gpu.txt,
# DIR/gpu_bench.json (every figure). Exit status: 0 only when every step passed.
# --dry: CPU, Triton interpreter for the kernels, tiny sizes, resnet18: the
# same code paths; its times mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
SETUP=1
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1; SETUP=0 ;;
    --no-setup) SETUP=0 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-results/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)$([ $DRY = 1 ] && echo -dry)}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
FAILED=()

# --- set up -------------------------------------------------------------
if [ $SETUP = 1 ]; then
  say "== setup (tools/setup.sh)"
  if bash tools/setup.sh 2>&1 | tee -a "$LOG"; then
    PYTHON=${PYTHON:-.venv/bin/python}
  else
    # a GPU machine without network cannot pip install: take a python that
    # already has torch and triton, and say so
    say "!! tools/setup.sh failed; falling back to ${PYTHON:-python3}"
    FAILED+=("setup")
  fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
say "python: $PYTHON"
if ! "$PYTHON" -c "import torch, fxcompress; print('torch', torch.__version__)" 2>&1 | tee -a "$LOG"; then
  say "!! $PYTHON cannot import torch and fxcompress: nothing can run"; exit 1
fi

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
  unset FXC_GPU_CHECK
  BENCH_ARGS=(--dry)
else
  export TRITON_INTERPRET=0
  export FXC_GPU_CHECK=1
  BENCH_ARGS=()
  (nvidia-smi -L 2>&1 || echo "nvidia-smi not found") | tee -a "$LOG"
  if ! "$PYTHON" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "!! no CUDA device visible to torch, or triton missing: this is the GPU check; use --dry on a CPU"
    exit 1
  fi
fi
export PYTHONUNBUFFERED=1

# --- kernel tests on the device -------------------------------------------
say "== Triton kernels vs torch reference ($([ $DRY = 1 ] && echo 'interpreter, CPU' || echo 'compiled, CUDA'))"
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/kernels/test_triton_on_device.py)
# dry: a few launches are enough to check the invocation (the whole file runs in CI)
[ $DRY = 1 ] && PYTEST+=(-k "test_masks or test_absmax_int8 or (test_fixed_width and True-stochastic-3)")
"${PYTEST[@]}" 2>&1 | tee "$OUT/pytest_gpu.txt" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || FAILED+=("kernel tests")
# (tests/kernels' interpreter tests force Triton on CPU tensors: CI runs
# them on every commit, so the GPU's minutes go to the compiled kernels)

# --- figures ----------------------------------------------------------------
say "== bandwidth, training steps, torch.compile (tools/gpu_bench.py)"
"$PYTHON" tools/gpu_bench.py "${BENCH_ARGS[@]}" --out "$OUT" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || FAILED+=("gpu_bench")

if [ ${#FAILED[@]} -gt 0 ]; then
  say "== FAILED: ${FAILED[*]} (details in $LOG)"
  exit 1
fi
say "== all passed; results in $OUT"
