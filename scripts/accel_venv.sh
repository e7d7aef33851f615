#!/bin/sh
# A virtualenv with an accelerated onnxruntime build in place of the plain one:
#   sh scripts/accel_venv.sh VENV PACKAGE CONSTRAINTS
# e.g. `.venv-openvino onnxruntime-openvino constraints-openvino.txt` (make openvino) or
# `build/venv-gpu onnxruntime-gpu constraints-gpu.txt` (scripts/gpu_check.sh).
# The accelerated builds install the same `import onnxruntime` as the plain one, so the plain
# build that the SDK's `local` extra pulls in is removed first, as onnxruntime's own install
# notes say. Everything else is pinned by constraints.txt, as in `make test`.
set -eu
VENV=$1
PACKAGE=$2
CONSTRAINTS=$3
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip -c constraints.txt
pip install -q -e ./device-sdk -e ./gateway -c constraints.txt
# vision.plate's PP-OCRv4 models (see scripts/bootstrap.sh for why --no-deps).
pip install -q --no-deps "rapidocr-onnxruntime==1.4.4" -c constraints.txt
pip uninstall -q -y onnxruntime
pip install -q "$PACKAGE" -c "$CONSTRAINTS"
"$VENV/bin/python" -c 'import onnxruntime as ort; print("accel_venv: onnxruntime", ort.__version__, ort.get_available_providers())'
