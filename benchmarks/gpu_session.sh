#!/usr/bin/env bash
# GPU work on the lent H100/H200. Run from the repo root with `.whl` carried (see ../shared/GPU.md):
#   bash benchmarks/gpu_session.sh lease      # several stages in one call (default: tests, baseline), each boxed
#       PLAN="tests:110 ablate:300" TESTS="tests/model" BUDGET_S=400 ...   # a shorter lease: stage:cap seconds
#   bash benchmarks/gpu_session.sh tests      # whole suite compiled (xdist), hypothesis gpu profile
#   bash benchmarks/gpu_session.sh figures    # kernel table vs peers (benchmarks/kernel_figures.py)
#   bash benchmarks/gpu_session.sh decode     # decode attention's launch configuration swept (decode_sweep.py)
#   bash benchmarks/gpu_session.sh peers      # the whole model next to transformers, same weights (model_peers.py)
#   bash benchmarks/gpu_session.sh train      # a 3b training step next to transformers and Liger (train_peers.py)
#   bash benchmarks/gpu_session.sh profile    # where the host time goes: cProfile + device time (host_profile.py)
#   bash benchmarks/gpu_session.sh batches    # decode tok/s at batch 1, 4, 16, 64 vs transformers' static cache
#   bash benchmarks/gpu_session.sh tp         # tensor parallelism's NCCL collectives on one GPU: a group of one
#                                             # next to no group, the decode graph captured with them (tp_collectives.py)
#   bash benchmarks/gpu_session.sh preprocess # image preprocessing on the host vs on the device (preprocess.py)
#   bash benchmarks/gpu_session.sh graphs     # decode, vision and prefill graphs vs the plain path; 3b timings
#   bash benchmarks/gpu_session.sh speed      # issue 23's figures in one call: graphs, peers (TTFT with the kept
#                                             # graphs, capture apart), batches, the kernel table, tp, preprocess
#   bash benchmarks/gpu_session.sh ablate     # the default ablation (3b, every backend mix)
#   bash benchmarks/gpu_session.sh configs    # the shipped ablations/*.toml at the 3b preset (bf16 but dtype.toml)
#   bash benchmarks/gpu_session.sh baseline   # the benchmark suite, written as this GPU's baseline
#       BASELINE_K="rms_norm or silu_mul" ...  # only those rows again, merged into the committed baseline
# Results land under $OUT: a few summaries plus everything in results.tar.gz (the device tool returns at
# most 8 files). The LD_LIBRARY_PATH line is the lent machine's workaround for xformers' CUDA 12 runtime;
# qvl itself never needs it.
set -uo pipefail
OUT=${OUT:-/tmp/qvl-gpu}
BUDGET_S=${BUDGET_S:-570}   # lease: the whole call's deadline, packing included
EXAMPLES=${QVL_HYPOTHESIS_EXAMPLES:-30}
WHEELS=${WHEELS:-.whl}      # carried wheels (../shared/GPU.md), installed when present
START=$(date +%s)
FULL=$OUT/full
mkdir -p "$FULL"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # A warm machine (a second call) has them already: the list of wheels installed is the marker.
  if ! ls "$WHEELS"/*.whl | cmp -s - /tmp/site/.qvl-wheels; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    ls "$WHEELS"/*.whl > /tmp/site/.qvl-wheels
  fi
  export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  # One interpreter for every version and `qvl backends`: each start imports torch (seconds apiece).
  python3 - <<'PY'
import importlib
import qvl  # first: on a machine without a GPU it switches on the Triton interpreter before triton loads
for name in ("torch", "triton", "xformers", "liger_kernel", "transformers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as e:
        print(name, "not usable:", type(e).__name__, e)
from qvl.cli import main
main(["backends"])
PY
} > "$OUT/environment.txt" 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# box CAP SECONDS: at most CAP, and never past the deadline (leaving 15 s to pack)
box() { local l=$(( $(left) - 15 )); (( l < $1 )) && echo $(( l > 0 ? l : 1 )) || echo "$1"; }
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# script_stage NAME CAP: benchmarks/NAME.py --out, boxed; its table NAME.md comes back beside the summary
script_stage() {
  log "$1 (<= $(box "$2") s)"
  timeout "$(box "$2")" python3 "benchmarks/$1.py" --out "$FULL" > "$FULL/$1.log" 2>&1
  log "$1 exit $?"
  cp "$FULL/$1.md" "$OUT/" 2>/dev/null
}
stage_figures() { script_stage kernel_figures "$1"; }
stage_decode() { script_stage decode_sweep "$1"; }
stage_peers() { script_stage model_peers "$1"; }
stage_train() { script_stage train_peers "$1"; }
stage_profile() { script_stage host_profile "$1"; }
stage_batches() { script_stage decode_batches "$1"; }
stage_tp() { script_stage tp_collectives "$1"; }
stage_preprocess() { script_stage preprocess "$1"; }

# issue 23's graphs on the device: decode, vision and prefill captured and replayed against the plain path, the 3b
# timing lines (vision tower, TTFT) printed, the device preprocessing against torchvision's on the GPU, and the
# decode GEMV at the 3b shapes (compiled: the interpreter checked it only at small ones)
stage_graphs() {
  log "graphs (<= $(box "$1") s)"
  timeout "$(box "$1")" python3 -m pytest -q -s -rfEs -p no:cacheprovider tests/model/test_decode_graph.py \
    tests/model/test_vision_graph_pool.py tests/model/test_prefill_graph_pool.py \
    tests/processing/test_image.py tests/ops/test_gemv.py -k "gpu or cuda or graph or 3b" > "$FULL/graphs.txt" 2>&1
  log "graphs exit $?"
  { grep -E "FAILED|ERROR|3b bf16" "$FULL/graphs.txt" | head -20; tail -2 "$FULL/graphs.txt"; } >> "$OUT/summary.txt"
  cp "$FULL/graphs.txt" "$OUT/"
}

stage_tests() {
  log "tests (<= $(box "$1") s, $EXAMPLES hypothesis examples, 12 workers)"
  QVL_HYPOTHESIS_PROFILE=gpu QVL_HYPOTHESIS_EXAMPLES=$EXAMPLES timeout "$(box "$1")" \
    python3 -m pytest ${TESTS:-tests} -n 12 --dist loadgroup -rfEs -v -p no:cacheprovider --durations=20 \
    --tb=short --junitxml="$FULL/junit.xml" > "$FULL/pytest.txt" 2>&1
  log "pytest exit $?"
  { grep -E "FAILED|ERROR" "$FULL/pytest.txt" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' | sort -u | head -40
    tail -3 "$FULL/pytest.txt"; } >> "$OUT/summary.txt"
  cp "$FULL/pytest.txt" "$OUT/"
}

stage_ablate() {
  log "ablate (<= $(box "$1") s)"
  timeout "$(box "$1")" python3 -m qvl ablate --repeats "${ABLATE_REPEATS:-3}" --quiet \
    --results-dir "$FULL/results" > "$FULL/ablate.txt" 2>&1
  log "ablate exit $?"
  cp "$FULL/ablate.txt" "$OUT/"
}

# The CPU-sized shipped configs at the real size: bfloat16 (dtype.toml sweeps dtypes from float32 weights itself);
# long_prompt_prefill.toml is 3b already. The stage's cap is shared out among the configs left by their
# number of variants (each variant costs about the same: warm-up, repeats, the error pass).
stage_configs() {
  local configs=(backend_mix backend_per_operator vision_window_size dtype long_prompt_prefill train) cap=$1 left_n=0
  local -A variants
  for name in "${configs[@]}"; do
    variants[$name]=$(grep -c '^\[\[variants\]\]' "ablations/$name.toml"); left_n=$(( left_n + variants[$name] ))
  done
  for name in "${configs[@]}"; do
    local n=${variants[$name]} share args=(--preset 3b --dtype bfloat16)
    share=$(( cap * n / left_n ))
    [[ $name == dtype ]] && args=(--preset 3b)
    [[ $name == long_prompt_prefill ]] && args=()
    local start=$(date +%s)
    log "config $name (<= $(box "$share") s)"
    timeout "$(box "$share")" python3 -m qvl ablate "ablations/$name.toml" "${args[@]}" \
      --repeats "${ABLATE_REPEATS:-3}" --quiet --results-dir "$FULL/results" > "$FULL/config-$name.txt" 2>&1
    log "config $name exit $?"
    cap=$(( cap - ($(date +%s) - start) )); left_n=$(( left_n - n ))
  done
  cat "$FULL"/config-*.txt > "$OUT/configs.txt"
}

stage_baseline() {
  local machine
  machine=$(python3 -c "from benchmarks.regress import default_machine; print(default_machine())")
  log "baseline $machine (<= $(box "$1") s)"
  # BASELINE_K="rms_norm or silu_mul": measure only those rows again, merged into the committed baseline
  timeout "$(box "$1")" python3 benchmarks/regress.py update --machine "$machine" ${BASELINE_K:+-k "$BASELINE_K"} \
    --save "$FULL/bench-$machine.json" > "$FULL/regress.log" 2>&1
  log "baseline exit $?"
  cp "benchmarks/baselines/$machine.json" "$FULL/" 2>/dev/null &&
    python3 benchmarks/regress.py table "$FULL/$machine.json" > "$OUT/baseline-table.md"
  tail -5 "$FULL/regress.log" >> "$OUT/summary.txt"
}

STAGE=${1:-lease}
case $STAGE in
lease) for step in ${PLAN:-tests:300 baseline:270}; do "stage_${step%%:*}" "${step##*:}"; done ;;
tests) BUDGET_S=580 stage_tests 560 ;;
figures) BUDGET_S=580 stage_figures 560 ;;
ablate) BUDGET_S=580 stage_ablate 560 ;;
baseline) BUDGET_S=580 stage_baseline 560 ;;
configs) BUDGET_S=580 stage_configs 560 ;;
decode) BUDGET_S=580 stage_decode 560 ;;
peers) BUDGET_S=580 stage_peers 560 ;;
train) BUDGET_S=580 stage_train 560 ;;
profile) BUDGET_S=580 stage_profile 560 ;;
batches) BUDGET_S=580 stage_batches 560 ;;
tp) BUDGET_S=580 stage_tp 560 ;;
preprocess) BUDGET_S=580 stage_preprocess 560 ;;
graphs) BUDGET_S=580 stage_graphs 560 ;;
speed) PLAN=${PLAN:-graphs:90 peers:150 batches:140 figures:110 tp:50 preprocess:20} BUDGET_S=580; for step in $PLAN; do "stage_${step%%:*}" "${step##*:}"; done ;;
*) echo "stages: lease speed tests graphs figures decode peers batches tp preprocess train profile ablate configs baseline"; exit 2 ;;
esac
tar -czf "$OUT/results.tar.gz" -C "$FULL" . && rm -rf "$FULL"
cat "$OUT/kernel_figures.md" "$OUT/decode_sweep.md" "$OUT/model_peers.md" "$OUT/decode_batches.md" \
  "$OUT/train_peers.md" 2>/dev/null
cat "$OUT/summary.txt"
