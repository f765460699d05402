#!/usr/bin/env bash
# GPU check of d4m-export, prepared to run once on a machine with an NVIDIA GPU (it cannot run on the
# CPU-only development machines). From the repository root:
#
#     bash bench/gpu_check.sh [OUT]          (OUT defaults to gpu-check-out; paste OUT/report.md into docs/results.md)
#
# It: installs the GPU extras into the venv if missing (onnxruntime-gpu replaces onnxruntime: they share a module
# name); builds a tiny-preset segmenter run with random weights (no training needed); exports the ONNX bundle with an
# FP16 variant; builds FP32 and FP16 TensorRT engines; runs `d4m-export verify` on cpu, cuda and tensorrt; times one
# segmenter patch in torch-CUDA, ONNX Runtime CUDA (FP32, FP16) and TensorRT (FP32, FP16) in one run; runs the gpu
# tests. Every step's output goes to OUT/, the summary to OUT/report.md. Budget: about 5-8 minutes on an H100.
set -uo pipefail

OUT="${1:-gpu-check-out}"
PY="${PY:-.venv/bin/python}"
BIN="$(dirname "$PY")"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
: > "$REPORT"
log() { echo "$@" | tee -a "$REPORT"; }
step() { log ""; log "### $1"; log '```'; shift; "$@" 2>&1 | tee -a "$REPORT" | tail -n 60; local rc=${PIPESTATUS[0]}; log '```'; log "exit code: $rc"; return 0; }

log "## d4m GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
log '```'
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee -a "$REPORT"
log '```'

# 1. GPU packages (the torch wheel stays the CPU one: torch-CUDA timings need a CUDA torch; see step 6)
if ! "$PY" -c "import tensorrt, cuda" 2>/dev/null; then
  "$PY" -m pip install -q "tensorrt>=10" "cuda-python>=12" >"$OUT/pip-tensorrt.log" 2>&1 || log "pip tensorrt failed (see $OUT/pip-tensorrt.log)"
fi
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  "$PY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1
  "$PY" -m pip install -q "onnxruntime-gpu>=1.17" >"$OUT/pip-ort.log" 2>&1 || log "pip onnxruntime-gpu failed (see $OUT/pip-ort.log)"
fi
step "versions" "$PY" -c "
import importlib.metadata as m, onnxruntime as o
for p in ('d4m','torch','onnx','onnxruntime-gpu','onnxruntime','tensorrt','cuda-python'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, '-')
print('ORT providers', o.get_available_providers())
from d4m.runtime.runners import gpu_environment; print('gpu_environment', gpu_environment())
"

# 2. a run folder (tiny preset, random weights) and its ONNX bundle
step "run folder" "$PY" - "$OUT" <<'EOF'
import math, sys
from pathlib import Path
from d4m.export.parity import randomize_weights
from d4m.runtime.artifacts import write_json
from d4m.training.checkpoints import MetricsLog, save_weights
from d4m.training.segmenter import build_network, segmenter_preset
out = Path(sys.argv[1]) / "run"
out.mkdir(parents=True, exist_ok=True)
config = segmenter_preset("tiny", data=out.parent / "data", out=out, spacing=(2.8, 2.8, 5.0), norm_mean=104.5, norm_std=38.25)
config.save(out / "config.json")
save_weights(randomize_weights(build_network(config), seed=0), out / "model.safetensors")
write_json(out / "metrics.json", {"schema_version": 1, "stage": "segmenter", "best": {}, "last": {}})
print("run folder", out)
EOF
rm -rf "$OUT/bundle"
step "d4m-export onnx (FP32 + FP16)" "$BIN/d4m-export" -v onnx --run "$OUT/run" --out "$OUT/bundle" --fp16 --study-parity

# 3. TensorRT engines
step "d4m-export tensorrt (FP32)" "$BIN/d4m-export" -v tensorrt --bundle "$OUT/bundle" --timing-cache "$OUT/timing.cache"
step "d4m-export tensorrt --fp16" "$BIN/d4m-export" -v tensorrt --bundle "$OUT/bundle" --fp16 --timing-cache "$OUT/timing.cache"
step "d4m-export inspect" "$BIN/d4m-export" inspect "$OUT/bundle"

# 4. verify on every device
for device in cpu cuda tensorrt; do
  step "d4m-export verify --device $device" env COLUMNS=200 "$BIN/d4m-export" verify --bundle "$OUT/bundle" --device "$device" --json "$OUT/verify-$device.json"
done

# 5. timings of one patch (batch 1 and 4) in one process: torch-CUDA, ORT CUDA, TensorRT
step "patch timings" "$PY" - "$OUT" <<'EOF'
import sys, time, numpy as np
from pathlib import Path
from d4m.runtime.bundle import load_bundle
from d4m.runtime.runners import OnnxRuntimeRunner, TensorRTRunner
bundle_dir = Path(sys.argv[1]) / "bundle"
def timed(call, repeat=20):
    call(); call()
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))
results = {}
with load_bundle(bundle_dir) as bundle:
    patch = bundle.manifest.sliding_window.patch_size
    for batch in (1, 4):
        x = np.random.default_rng(0).standard_normal((batch, 4, *patch)).astype(np.float32)
        try:
            import torch
            from d4m.export.bundle_writer import load_segmenter_run
            if torch.cuda.is_available():
                net = load_segmenter_run(Path(sys.argv[1]) / "run").network.cuda().eval()
                xt = torch.from_numpy(x).cuda()
                def run_torch():
                    with torch.inference_mode():
                        net(xt).cpu()
                results[f"torch-CUDA fp32, batch {batch}"] = timed(run_torch)
                def run_amp():
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                        net(xt).float().cpu()
                results[f"torch-CUDA autocast fp16, batch {batch}"] = timed(run_amp)
            else:
                results[f"torch-CUDA, batch {batch}"] = "torch has no CUDA here (CPU wheel)"
        except Exception as exc:  # noqa: BLE001 - a benchmark script reports and goes on
            results[f"torch-CUDA, batch {batch}"] = f"failed: {exc}"
        for entry in bundle.manifest.engines:
            if entry.name != "segmenter":
                continue
            try:
                runner = TensorRTRunner(bundle.path(entry)) if entry.format.value == "tensorrt" else \
                    OnnxRuntimeRunner(bundle.path(entry), device="cuda")
                with runner:
                    name = runner.input_names[0]
                    ms = timed(lambda: runner({name: x}))
                    results[f"{entry.file} on {runner.providers[0]}, batch {batch}"] = ms
            except Exception as exc:  # noqa: BLE001
                results[f"{entry.file}, batch {batch}"] = f"failed: {exc}"
for key, value in results.items():
    print(f"{key:70s} {value if isinstance(value, str) else f'{value:8.2f} ms'}")
EOF

# 6. the gpu tests
step "pytest -m gpu" "$BIN/pytest" -m gpu -rs -q tests/export tests/runtime
log ""
log "Files: $OUT/bundle (manifest.json, parity.json), $OUT/verify-*.json"
echo "report: $REPORT"
