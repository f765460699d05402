#!/usr/bin/env bash
# GPU check of d4m, prepared to run once on a machine with one NVIDIA GPU (the development machines have none).
#
#     bash bench/gpu_check.sh OUT            (from the repository root; OUT/report.md is the summary)
#
# Python: $PY (default python3, the GPU machine's CUDA build of torch). The packages that python lacks are
# installed offline from .whl/ (monai, SimpleITK) and d4m itself is installed from this checkout into $SITE,
# so the check runs the code as committed. Steps, each bounded by `timeout` and logged to OUT/report.md:
#   1. environment: GPU, driver, torch, ONNX Runtime providers, TensorRT;
#   2. a 6-study phantom cohort (small grid), registered to PVP, median-normalised (in the background);
#   3. bench/gpu_timings.py: segmenter patch inference and training steps in torch-CUDA FP32/TF32/BF16/FP16,
#      a full 4-phase sliding window, peak memory, achieved TFLOP/s against the BF16 matmul peak;
#   4. `d4m-train segmenter --preset paper --device cuda` (autocast + the resume file) and `d4m-train evaluate`
#      on CUDA with every missing-phase subset;
#   5. `d4m-export onnx` with this machine's torch, `verify` on cpu / cuda / tensorrt, `tensorrt`: each engine
#      that cannot run here must stop with exit code 4 and a one-line reason;
#   6. `d4m-train autoencoder` and `d4m-train ldm --mode joint` (paper presets) for a few steps on CUDA.
set -uo pipefail

OUT="${1:-gpu-check-out}"
PY="${PY:-python3}"
SITE="${SITE:-/tmp/d4m-site}"
WORK="${WORK:-/tmp/d4m-gpu}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-200}"
PARTS="${PARTS:-timings segmenter export mcs}"   # a subset reruns only those parts
want() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
REPORT="$OUT/report.md"
: > "$REPORT"
log() { echo "$@" | tee -a "$REPORT"; }
# step TITLE SECONDS COMMAND...: run with a time limit, output into the report, never stop the script
step() {
  local title="$1" limit="$2"; shift 2
  local start=$SECONDS
  log ""; log "### $title"; log '```'
  timeout "$limit" "$@" >"$OUT/step.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/step.log" | tee -a "$REPORT"
  log '```'; log "exit code $rc, $((SECONDS - start)) s"
}

log "## d4m GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
log '```'
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee -a "$REPORT"
log '```'

# d4m and the missing pure-Python / manylinux packages, offline
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || log "wheel install failed: $(tail -n 3 "$OUT/pip.log")"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . \
  >>"$OUT/pip.log" 2>&1 || log "d4m install failed: $(tail -n 3 "$OUT/pip.log")"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 COLUMNS=160

step "versions" 60 "$PY" -c "
import importlib.metadata as m, importlib.util as u
for p in ('d4m', 'torch', 'monai', 'SimpleITK', 'onnx', 'onnxruntime', 'onnxruntime-gpu', 'tensorrt', 'cuda-python'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, '-')
import onnxruntime as o, torch
print('ORT providers', o.get_available_providers())
print('torch CUDA', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
from d4m.runtime.runners import gpu_environment
print('d4m gpu_environment (TensorRT + cuda-python + GPU):', gpu_environment())
"

# the cohort, built on the CPUs while the GPU is timed
(
  d4m-train phantom --out "$WORK/cohort" --cases 6 --seed 0 --size small --no-dicom --overwrite &&
  d4m-train register --data "$WORK/cohort" --out "$WORK/registered" &&
  d4m-train normalize --data "$WORK/registered" --out "$WORK/normal" --inpainter median
) >"$OUT/cohort.log" 2>&1 &
COHORT=$!

want timings && step "segmenter timings (bench/gpu_timings.py)" 150 "$PY" bench/gpu_timings.py --presets paper cpu

wait "$COHORT"
COHORT_RC=$?
log ""; log "cohort: exit $COHORT_RC ($(tail -n 1 "$OUT/cohort.log"))"

if want segmenter; then
  step "d4m-train segmenter --preset paper --device $DEVICE --steps $STEPS" 150 \
    d4m-train segmenter --data "$WORK/registered" --out "$WORK/seg" --preset paper --steps "$STEPS" --device "$DEVICE"
  step "metrics.json of that run" 10 cat "$WORK/seg/metrics.json"
  step "d4m-train evaluate --every-subset --device $DEVICE" 60 \
    d4m-train evaluate --model "$WORK/seg" --out "$WORK/eval" --every-subset --device "$DEVICE"
fi
if want export; then
  step "d4m-export onnx (torch of this machine)" 180 d4m-export onnx --run "$WORK/seg" --out "$WORK/bundle" --fp16
  for device in cpu cuda tensorrt; do
    step "d4m-export verify --device $device" 60 d4m-export verify --bundle "$WORK/bundle" --device "$device"
  done
  step "d4m-export tensorrt" 60 d4m-export tensorrt --bundle "$WORK/bundle"
fi
if want mcs; then
  step "d4m-train autoencoder --preset paper --steps 40" 60 \
    d4m-train autoencoder --data "$WORK/registered" --out "$WORK/ae" --preset paper --steps 40 --device "$DEVICE"
  step "d4m-train ldm --mode joint --preset paper --steps 40" 60 \
    d4m-train ldm --data "$WORK/normal" --autoencoder "$WORK/ae" --out "$WORK/ldm" --mode joint --preset paper \
    --steps 40 --device "$DEVICE"
  step "d4m-train synthesize (ldm, on the GPU when torch sees one)" 120 \
    d4m-train synthesize --data "$WORK/normal" --out "$WORK/synthetic" --autoencoder "$WORK/ae" --ldm "$WORK/ldm"
fi
cp "$WORK"/seg/metrics.csv "$OUT/segmenter-metrics.csv" 2>/dev/null
cp "$WORK"/eval/results.md "$OUT/evaluation.md" 2>/dev/null
log ""; log "report: $REPORT"
