#!/usr/bin/env bash
# `make gpu-check`: the CUDA path on a machine with a GPU, in at most 8 minutes (docs/gpu.md).
#  1. install (make install) and build, unless GPU_CHECK_PYTHON names a Python whose torch already
#     sees CUDA (an image with its own CUDA torch; without network, GPU_CHECK_WHEELS names a folder
#     of wheels for what that Python lacks, installed with --no-index into a scratch folder);
#  2. the CUDA tests, natively: pytest -m "cuda or triton" (the Triton kernels compiled, not interpreted);
#  3. bench/gpu_check.py: a cluster with the store's pool on the GPU, cold == warm == the in-process
#     engine, TTFT cold/warm, pull throughput from the GPU store, decode tok/s at batch 1/8/16,
#     written to bench/results/gpu.json with the device's name.
# Exit status: 0 all passed; 1 a check failed; 2 no CUDA device (nothing was checked); 124 out of time.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() { echo "== gpu-check [$(( $(date +%s) - START ))s]: $*"; }
fail() { echo "gpu-check: $1" >&2; exit "${2:-1}"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  fail "no NVIDIA GPU on this machine (nvidia-smi is missing or lists none); nothing was checked" 2
fi
nvidia-smi -L

PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
if [ -z "${GPU_CHECK_PYTHON:-}" ]; then
  step "make install"
  timeout "$(left)" make install || fail "make install failed or ran out of time"
else
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    step "wheels from $GPU_CHECK_WHEELS into /tmp/kvc-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvc-site "$GPU_CHECK_WHEELS"/*.whl \
      || fail "could not install the wheels in $GPU_CHECK_WHEELS"
    export PYTHONPATH=/tmp/kvc-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  step "using $PY as it is (no install); generating the protos"
  timeout 60 "$PY" scripts/gen_protos.py || fail "could not generate the protobuf code with $PY"
fi
timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || fail "torch in $PY sees no CUDA device (a CPU-only torch?); set GPU_CHECK_PYTHON to a CUDA torch" 2
"$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")'

step "CUDA tests (pytest -m 'cuda or triton')"
tests_s=$(( $(left) - 200 ))  # the cluster part needs about 3 minutes
[ "$tests_s" -gt 30 ] || fail "out of time after the install" 124
env -u TRITON_INTERPRET timeout "$tests_s" "$PY" -m pytest -q -m "cuda or triton" -p no:cacheprovider tests/ \
  || fail "the CUDA tests failed (or ran out of time)"

step "cluster on the GPU (bench/gpu_check.py)"
[ "$(left)" -gt 30 ] || fail "out of time before the cluster check" 124
env -u TRITON_INTERPRET timeout "$(left)" "$PY" -m bench.gpu_check || fail "the cluster check failed (status $?)"
step "done: bench/results/gpu.json"
