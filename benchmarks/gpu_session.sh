#!/usr/bin/env bash
# Everything a GPU session runs, in one device call of at most ~9.5 minutes (the device's time is
# short): build, GPU tests, headline benchmarks, the rest of the GPU tests, in stages that each
# write their own file under $OUT as they end (benchmarks/gpu_session.py says which). Usage:
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # on the GPU machine
#   bash benchmarks/gpu_session.sh --cpu --out /tmp/session  # the same stages on a CPU, tiny sizes
# On the device tool: run(command="bash benchmarks/gpu_session.sh", timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
# The build: one compile job per core, machine code for this machine's chip only.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]] && command -v nvidia-smi > /dev/null; then
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | sort -u | paste -sd ';')
  export TORCH_CUDA_ARCH_LIST
fi
exec "$PYTHON" -m benchmarks.gpu_session "$@"
