#!/usr/bin/env bash
# The one device check of the project, for the H100 machine lent for GPU checks (Python 3.12, its own
# torch, no network, this checkout copied there). Run from the repository root:
#     bash benchmarks/gpu_check.sh "$OUT"
# It builds pydc._C in place with the machine's torch, runs the CUDA tests, runs compute-sanitizer
# (memcheck) over the CUDA op tests, and runs the benchmarks, writing logs and JSON into the folder given
# (at most 8 files: what the device tool brings back). Budget: about 6 minutes in all.
set -uo pipefail
OUT_DIR=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Op test files that run under memcheck (CUDA cases only); later op families add theirs here.
SANITIZE_TESTS=${SANITIZE_TESTS:-$(ls tests/test_sobel.py tests/test_pca_ops.py tests/test_kmeans_ops.py tests/test_odc_ops.py 2>/dev/null)}

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs to NAME.log, records the status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local status=$?
  echo "{\"step\": \"$name\", \"status\": $status, \"seconds\": $((SECONDS - start))}" >>"$OUT_DIR/steps.jsonl"
  echo "== $name: exit $status after $((SECONDS - start)) s"
  return $status
}

{ nvidia-smi; "$PY" -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  >"$OUT_DIR/env.log" 2>&1
step build 240 "$PY" setup.py build_ext --inplace || { tail -40 "$OUT_DIR/build.log"; exit 1; }
step pytest_cuda 120 "$PY" -m pytest -m cuda tests -q -p no:cacheprovider
PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 "$SANITIZER" --tool memcheck --error-exitcode 99 \
  "$PY" -m pytest -m cuda -q -p no:cacheprovider -k "not compiled and not gradgrad" $SANITIZE_TESTS
step bench 150 "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench.json"
tail -5 "$OUT_DIR/pytest_cuda.log" "$OUT_DIR/memcheck.log"
grep -A40 "pydc vs reference" "$OUT_DIR/bench.log" | head -40
