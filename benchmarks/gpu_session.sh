#!/usr/bin/env bash
# One device-tool call on the lent H100/H200: install the carried wheels, run the whole test suite
# compiled (hypothesis gpu profile), the first kernel figures, the H100 benchmark baseline and the default
# ablation; everything lands under $OUT. Run from the repo root with `.whl` carried (see ../shared/GPU.md):
#   bash benchmarks/gpu_session.sh
# The LD_LIBRARY_PATH line is the lent machine's workaround for xformers' CUDA 12 runtime; qvl itself
# never needs it.
set -uo pipefail
OUT=${OUT:-/tmp/qvl-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
  python3 -c "import liger_kernel; print('liger-kernel ok')" 2>&1 | tail -1
  python3 -m qvl backends
} > "$OUT/environment.txt" 2>&1
QVL_HYPOTHESIS_PROFILE=gpu timeout 420 python3 -m pytest -q tests -x -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
timeout 300 python3 benchmarks/kernel_figures.py --out "$OUT" > "$OUT/kernel_figures.log" 2>&1
timeout 600 python3 benchmarks/regress.py update --machine h100 --save "$OUT/h100.json" > "$OUT/regress.log" 2>&1
cp benchmarks/baselines/h100.json "$OUT/" 2>/dev/null
timeout 600 python3 -m qvl ablate --results-dir "$OUT/results" > "$OUT/ablate.txt" 2>&1
tail -3 "$OUT/pytest.txt"; cat "$OUT/kernel_figures.md" 2>/dev/null; tail -15 "$OUT/ablate.txt"
