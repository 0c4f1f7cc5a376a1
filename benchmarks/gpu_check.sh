#!/usr/bin/env bash
# odecore's checks that need a CUDA device, in one run of a few minutes.
#
# On a machine with network access, once (from the repository root):
#     benchmarks/gpu_check.sh --prepare
# downloads into .whl/ (ignored by git) the pure-Python wheels odecore needs that a GPU image
# may lack. Then, on the GPU machine, with .whl/ beside the checkout (carried there):
#     benchmarks/gpu_check.sh
# installs those wheels and odecore (editable, no network), and runs, most telling first:
#   1. bench_gpu.py's ensemble part (the GPU ensemble kernel, N up to 2^23);
#   2. tests/test_cupy.py and tests/test_torch_cuda.py (the device rows; cupy required, so
#      a missing device fails instead of skipping);
#   3. tests/test_cuda_ensemble.py's device rows: the kernel on the device against the CPU
#      kernel (the simulator rows are CI's);
#   4. bench_gpu.py's peers (torchdiffeq on torch CUDA, odecore's generic CuPy solve) and its
#      neural ODE;
#   5. the conformance suite's cupy rows (not slow);
#   6. the unit tests that take the backend fixture, on cupy (ODECORE_TEST_BACKEND=cupy).
# Each part has its own time limit (seconds, overridable: PART_TIMEOUT_TESTS, ...); a part
# that fails or times out does not stop the others. The limits add up to 520 s: give the
# whole run 560 s or more. Logs and summary.txt go to $OUT (default
# gpu_check_out/): eight files at most. PYTHON names the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl
OUT=${OUT:-gpu_check_out}
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--prepare" ]]; then
    # Versions this checkout is tested with; both are pure Python (py3-none-any).
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
        "array-api-compat==1.16.0" "array-api-extra==0.11.5" || exit
    # NumPy for the GPU image's Python 3.12: its NumPy 2.5 lacks np.row_stack, which its
    # Numba 0.68.0 still compiles against, so every Numba kernel there fails to compile.
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "numpy==2.4.6"
fi

mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"

note() { echo "$*" | tee -a "$summary"; }

if ! "$PY" -c "import array_api_compat, array_api_extra" 2>/dev/null; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" array-api-compat array-api-extra \
        >"$OUT/install.log" 2>&1 || { note "install of array-api wheels from $WHEELS failed"; exit 1; }
fi
numpy_wheel=$(ls "$WHEELS"/numpy-*.whl 2>/dev/null | head -n 1)
if [[ -n "$numpy_wheel" ]]; then
    "$PY" -m pip install --no-deps --no-index "$numpy_wheel" >>"$OUT/install.log" 2>&1 \
        || note "install of $numpy_wheel failed (see install.log)"
fi
"$PY" -m pip install --no-deps --no-index --no-build-isolation -e . >>"$OUT/install.log" 2>&1 \
    || { note "editable install of odecore failed (see install.log)"; exit 1; }
note "$(nvidia-smi -L 2>&1 | head -n 2)"
note "$("$PY" -c 'import cupy, torch, numba, numpy; from numba import cuda; print("cupy", cupy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(), "numba", numba.__version__, "numba cuda", cuda.is_available(), "numpy", numpy.__version__)' 2>&1 | tail -n 3)"
# JAX, where a test imports it, must not take most of the device's memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

part() {  # part NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local tail_line
    tail_line=$(grep -E "passed|failed|error|skipped" "$OUT/$name.log" | tail -n 1)
    note "$name: rc=$rc in $((SECONDS - start))s (limit ${seconds}s): ${tail_line}"
}

PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider)
part bench_ensemble "${PART_TIMEOUT_ENSEMBLE:-150}" \
    "$PY" benchmarks/bench_gpu.py --parts ensemble --sizes 10 16 20 23 --repeat 10
part device_tests "${PART_TIMEOUT_TESTS:-70}" \
    env ODECORE_REQUIRED_BACKENDS=cupy "${PYTEST[@]}" tests/test_cupy.py tests/test_torch_cuda.py
part ensemble_tests "${PART_TIMEOUT_ENSEMBLE_TESTS:-120}" \
    "${PYTEST[@]}" tests/test_cuda_ensemble.py -k device
part bench_peers "${PART_TIMEOUT_PEERS:-80}" \
    "$PY" benchmarks/bench_gpu.py --parts peers node --peer-sizes 10 14 20
part conformance "${PART_TIMEOUT_CONFORMANCE:-60}" \
    env ODECORE_CONFORMANCE_BACKENDS=numpy,cupy ODECORE_REQUIRED_BACKENDS=cupy \
    "${PYTEST[@]}" conformance -m "not slow" -k cupy
part fixture_tests "${PART_TIMEOUT_FIXTURE:-40}" \
    env ODECORE_TEST_BACKEND=cupy "${PYTEST[@]}" tests -m "not slow" -k cupy --maxfail=25
for name in bench_ensemble bench_peers; do
    cat "$OUT/$name.log" >>"$summary"
done
