#!/bin/sh
# Install the d4m runtime, from the wheel the Dockerfile's builder stage made, into the active Python
# (the image's /opt/d4m virtual environment). The image runs this script; tests/test_dockerfile.py runs
# the same RUN line in a clean virtual environment.
#
# Usage: install-runtime.sh WHEEL_DIR [cpu|gpu]
#   cpu  the runtime only (ONNX Runtime on the CPU), binary wheels only: nothing is compiled.
#   gpu  + the `gpu` extra (onnxruntime-gpu, TensorRT, cuda-python); TensorRT's PyPI metapackage is a
#        pure-Python sdist (no compiler needed), so binaries are preferred rather than required.
set -eu
wheels=$1
variant=${2:-cpu}
wheel=$(ls "$wheels"/d4m-*.whl)
pip_install="python -m pip install --no-cache-dir --disable-pip-version-check"
case "$variant" in
  cpu)
    $pip_install --only-binary=:all: "$wheel"
    ;;
  gpu)
    $pip_install --prefer-binary "${wheel}[gpu]"
    # onnxruntime (a base dependency) and onnxruntime-gpu install the same module: keep the GPU build only.
    ort=$(python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
    python -m pip uninstall --yes --disable-pip-version-check onnxruntime
    $pip_install --only-binary=:all: --force-reinstall --no-deps "onnxruntime-gpu==$ort"
    ;;
  *)
    echo "install-runtime.sh: expected the variant cpu or gpu, found '$variant'" >&2
    exit 2
    ;;
esac
# The runtime holds no PyTorch: d4m.runtime never imports it (the wheel's training/export parts stay unused).
if python -c 'import torch' 2>/dev/null; then
  echo "install-runtime.sh: expected no torch in the runtime, found it installed" >&2
  exit 1
fi
d4m-infer --version
