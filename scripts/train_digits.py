"""Train the digits classifier that the ONNX runner's tests, demos and benchmarks use.

Uses scikit-learn's bundled 8x8 digits set (no download), holds out 20 % with a
fixed seed, fits a StandardScaler + small MLPClassifier (64 hidden units)
pipeline and exports it with skl2onnx to ``build/examples/models/digits.onnx``.
The scaler is part of the graph, so callers feed raw pixel values (0..16):

    input          float32 [N, 64]
    label          int64   [N]
    probabilities  float32 [N, 10]

The held-out part is written next to it as ``digits_test_X.npy`` (float32
[N, 64]) and ``digits_test_y.npy`` (int64 [N]). The exported model is checked
with onnxruntime on that set; the script fails if accuracy is below 95 %.

An MLP rather than LogisticRegression because its graph is made of standard
ONNX operators (Sub, Div, MatMul, Add, Relu, Softmax, ArgMax), which accelerator
execution providers implement; LogisticRegression exports to ``ai.onnx.ml``
operators (LinearClassifier, Normalizer) that in practice only the CPU provider
has. Only the small ArrayFeatureExtractor that maps the argmax to a label stays
in ``ai.onnx.ml``.
Normally run by ``scripts/build_examples.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "build" / "examples" / "models"
MODEL_PATH = MODELS_DIR / "digits.onnx"
TEST_X_PATH = MODELS_DIR / "digits_test_X.npy"
TEST_Y_PATH = MODELS_DIR / "digits_test_y.npy"

SEED = 1234
TEST_FRACTION = 0.2
MIN_ACCURACY = 0.95
N_FEATURES = 64  # 8x8 pixels, each 0..16
HIDDEN_UNITS = 64
# Opsets every onnxruntime >= 1.14 runs; the graph needs nothing newer.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def train(x_train: npt.NDArray[np.float32], y_train: npt.NDArray[np.int64]) -> Pipeline:
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "clf",
                MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=500, random_state=SEED),
            ),
        ]
    )
    model.fit(x_train, y_train)
    return model


def export(model: Pipeline) -> bytes:
    scaler = model.named_steps["scale"]
    clf = model.named_steps["clf"]
    onx: Any = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        options={
            # Sub + Div instead of the ai.onnx.ml Scaler operator.
            id(scaler): {"div": "div"},
            # No ZipMap: outputs stay plain tensors instead of a sequence of maps.
            id(clf): {"zipmap": False},
        },
        target_opset=TARGET_OPSET,
    )
    data: bytes = onx.SerializeToString()
    return data


def verify(
    model_bytes: bytes, x_test: npt.NDArray[np.float32], y_test: npt.NDArray[np.int64]
) -> float:
    """Run the exported graph with onnxruntime; return its held-out accuracy."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    if inputs != [("input", "tensor(float)", [None, N_FEATURES])]:
        raise SystemExit(f"train_digits: unexpected model inputs {inputs}")
    if outputs != [("label", "tensor(int64)"), ("probabilities", "tensor(float)")]:
        raise SystemExit(f"train_digits: unexpected model outputs {outputs}")

    label, probabilities = session.run(["label", "probabilities"], {"input": x_test})
    if label.shape != y_test.shape or probabilities.shape != (len(y_test), 10):
        raise SystemExit(
            f"train_digits: unexpected output shapes {label.shape}, {probabilities.shape}"
        )
    return float(np.mean(label == y_test))


def main() -> int:
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )

    model = train(x_train, y_train)
    model_bytes = export(model)
    accuracy = verify(model_bytes, x_test, y_test)
    print(f"train_digits: onnxruntime accuracy on {len(y_test)} held-out digits: {accuracy:.4f}")
    if accuracy < MIN_ACCURACY:
        print(
            f"train_digits: error: accuracy {accuracy:.4f} is below {MIN_ACCURACY}",
            file=sys.stderr,
        )
        return 1

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    # Model last, through a temporary name: a run cut short leaves no model
    # that looks complete.
    np.save(TEST_X_PATH, np.ascontiguousarray(x_test, dtype=np.float32))
    np.save(TEST_Y_PATH, np.ascontiguousarray(y_test, dtype=np.int64))
    partial = MODEL_PATH.with_suffix(".onnx.partial")
    partial.write_bytes(model_bytes)
    partial.replace(MODEL_PATH)
    print(f"train_digits: wrote {MODEL_PATH.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
