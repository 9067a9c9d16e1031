#!/usr/bin/env bash
# Everything a GPU session runs, in one call (the device's time is short): build the CUDA
# extension against the machine's own torch, run the GPU tests, then the benchmark suite, and
# leave the results under $OUT (default benchmarks/results/gpu). Usage:
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--quick]
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYADVK_FORCE_CUDA=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -m pyadvk info > "$OUT/info.txt" 2>&1
timeout 900 python -m pytest -q -m gpu tests -x --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests exit code $?" >> "$OUT/gpu-tests.txt"
tail -5 "$OUT/gpu-tests.txt"
python -m pyadvk bench --device cuda --out "$OUT" "$@" > "$OUT/bench.txt" 2>&1
echo "bench exit code $?" >> "$OUT/bench.txt"
tail -40 "$OUT/bench.txt"
