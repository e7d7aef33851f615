#!/bin/sh
# The accelerator check for a machine with an NVIDIA GPU (not run yet: no GPU machine has been
# lent to this project's sessions so far; see docs/accelerators.md).
#   sh scripts/gpu_check.sh
# Makes build/venv-gpu with onnxruntime-gpu in place of onnxruntime (scripts/accel_venv.sh),
# prints which providers load (TensorRT needs the TensorRT libraries; CUDA needs CUDA 12 and
# cuDNN 9, which the nvidia-* wheels that onnxruntime-gpu's [cuda,cudnn] extra pulls provide),
# runs benchmarks/accel.py (the table for the README) and the vision and accelerator tests with
# the gateway's workers on the GPU providers.
set -eu
cd "$(dirname "$0")/.."
nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible (nvidia-smi)" >&2; exit 1; }
VENV=${VENV:-build/venv-gpu}
CONSTRAINTS=build/constraints-gpu.txt
mkdir -p build
# onnxruntime-gpu at the plain build's version where the registry has it (1.31.1 when written).
{ echo "-c ../constraints.txt"; echo "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"; } > "$CONSTRAINTS"
sh scripts/accel_venv.sh "$VENV" "onnxruntime-gpu[cuda,cudnn]" "$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt -c constraints.txt
"$VENV/bin/python" -m pip uninstall -q -y onnxruntime 2>/dev/null || true  # a dev tool may pull it
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION:-1.31.1}"
"$VENV/bin/python" scripts/build_examples.py >/dev/null
"$VENV/bin/python" - <<'PY'
import onnxruntime as ort
ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
print("providers:", ort.get_available_providers())
PY
"$VENV/bin/python" benchmarks/accel.py | tee build/gpu_accel.txt
"$VENV/bin/python" benchmarks/accel.py --json > build/gpu_accel.json
# The vision tests run the gateway's workers with this venv's onnxruntime: CUDA (and TensorRT
# where it loads) are decided per model exactly as OpenVINO is.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vision.py tests/test_vision_plate.py \
    tests/test_offload.py -k "onnx or plate or pipeline" || status=$?
echo "gpu_check: table in build/gpu_accel.txt, figures in build/gpu_accel.json"
exit "${status:-0}"
