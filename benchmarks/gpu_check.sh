#!/usr/bin/env bash
# The one device check of the project, for the GPU machine lent for checks (Python 3.12, its own torch, no
# network, this checkout copied there). Run from the repository root:
#     PYDC_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh "$OUT"      # on the GPU machine
#     bash benchmarks/gpu_check.sh /tmp/gpu_check --dry-run                      # here: the same steps, CUDA skipped
# Budget: 480 s in all (each step's limit is in benchmarks/gpu_check.py, STEPS: 470 s), inside one device call
# of 600 s. Steps: build (FORCE_CUDA=1, CUDA_HOME from the nvcc on PATH when unset), a check that pydc._C holds
# CUDA kernels (else stop), the CUDA tests, compute-sanitizer memcheck + racecheck on a short named list of
# cases, the CUDA benchmarks one file at a time (each writes its JSON when it finishes), then results.json
# and the headline table. Exactly 8 files land in OUT (the device tool brings back 8).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
