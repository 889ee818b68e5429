#!/usr/bin/env bash
# GPU work on the lent H100/H200, one stage per device-tool call (each fits its 10-minute limit):
#   bash benchmarks/gpu_session.sh tests      # whole suite compiled, hypothesis gpu profile
#   bash benchmarks/gpu_session.sh figures    # kernel table vs peers + the H100 benchmark baseline
#   bash benchmarks/gpu_session.sh ablate     # the default ablation (3b, every backend mix)
# Everything lands under $OUT. Run from the repo root with `.whl` carried (see ../shared/GPU.md).
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
STAGE=${1:-tests}
case $STAGE in
tests)
QVL_HYPOTHESIS_PROFILE=gpu timeout 540 python3 -m pytest -q tests -x -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
tail -5 "$OUT/pytest.txt" ;;
figures)
timeout 240 python3 benchmarks/kernel_figures.py --out "$OUT" > "$OUT/kernel_figures.log" 2>&1
timeout 300 python3 benchmarks/regress.py update --machine h100 --save "$OUT/h100.json" > "$OUT/regress.log" 2>&1
cp benchmarks/baselines/h100.json "$OUT/" 2>/dev/null
cat "$OUT/kernel_figures.md" ;;
ablate)
timeout 540 python3 -m qvl ablate --results-dir "$OUT/results" > "$OUT/ablate.txt" 2>&1
tail -15 "$OUT/ablate.txt" ;;
*) echo "stages: tests figures ablate"; exit 2 ;;
esac
