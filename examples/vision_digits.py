"""An example image classifier: the digits model behind an ONNX image pipeline on a Hearth
gateway. The device sends a PNG and gets labels back; resizing, colour and scaling happen on
the gateway.

The model is ``build/examples/models/digits.onnx`` (``scripts/train_digits.py``: scikit-learn's
bundled 8x8 digits, nothing downloaded; build it with ``python scripts/build_examples.py``). It
reads 64 grey values of 0..16. Each held-out digit it was not trained on is drawn as a 32x32
grey PNG, as a small camera might send it; the pipeline around the model says how to turn that
into the model's input and what to send back::

    Preprocess(width=8, height=8, color="gray", scale=16/255, layout="flat")
    Postprocess(kind="topk", output="probabilities", k=3)

The model is uploaded to the gateway once (by its hash) and kept there.

Run it against a gateway on this machine or your LAN::

    .venv/bin/hearth-gateway run --listen 127.0.0.1:1883 --no-mdns &
    .venv/bin/python examples/vision_digits.py --gateway 127.0.0.1:1883
    HEARTH_GATEWAY=127.0.0.1:1883 .venv/bin/python examples/vision_digits.py --count 50
    .venv/bin/python examples/vision_digits.py          # find the gateway over mDNS
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from _args import gateway_parser
from hearth import Client, HearthError
from hearth.protocol.vision import Postprocess, Preprocess

MODELS = Path(__file__).resolve().parent.parent / "build" / "examples" / "models"
PNG_SIDE = 32  # px


def digit_png(digit: np.ndarray) -> bytes:
    """One 8x8 digit of 0..16 as a PNG of PNG_SIDE x PNG_SIDE grey pixels."""
    pixels = np.round(digit.reshape(8, 8) * 255 / 16).astype(np.uint8)
    big = cv2.resize(pixels, (PNG_SIDE, PNG_SIDE), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", big)
    if not ok:
        raise RuntimeError("could not encode a digit")
    return png.tobytes()


def main(argv: Sequence[str] | None = None) -> int:
    parser = gateway_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS, help=f"default {MODELS}")
    parser.add_argument("--count", type=int, help="held-out digits to send (default: all)")
    parser.add_argument("--show", type=int, default=5, help="digits to print (default 5)")
    args = parser.parse_args(argv)
    model = args.models / "digits.onnx"
    try:
        x = np.load(args.models / "digits_test_X.npy")
        y = np.load(args.models / "digits_test_y.npy")
    except OSError:
        x = y = None
    if x is None or y is None or not model.is_file():
        print(
            f"vision_digits: the model is not in {args.models}; build it first with\n"
            "    .venv/bin/python scripts/build_examples.py",
            file=sys.stderr,
        )
        return 2
    count = len(x) if args.count is None else min(args.count, len(x))

    pre = Preprocess(width=8, height=8, color="gray", scale=16 / 255, layout="flat")
    post = Postprocess(kind="topk", output="probabilities", k=3)
    correct = 0
    latencies = []
    misread = []
    try:
        with Client(args.gateway, interface=args.interface, placement="edge") as client:
            for index in range(count):
                run = client.pipeline(model, digit_png(x[index]), pre, post)
                top = run.result.top
                truth = int(y[index])
                correct += top[0].index == truth
                latencies.append(run.latency_ms)
                if top[0].index != truth:
                    misread.append((index, truth, top[0].index))
                if index < args.show:
                    guesses = ", ".join(f"{c.index} ({c.score:.2f})" for c in top)
                    where = f"{run.provider}, {run.latency_ms:.1f} ms"
                    print(f"digit {index:3d}: truth {truth}, top 3: {guesses}  [{where}]")
    except HearthError as exc:
        print(f"vision_digits: {exc}", file=sys.stderr)
        return 1
    if misread:
        shown = ", ".join(f"#{i} {t} read as {g}" for i, t, g in misread[:10])
        print(f"misread: {shown}{' ...' if len(misread) > 10 else ''}")
    print(
        f"\naccuracy {correct / count:.1%} ({correct} of {count} held-out digits sent as "
        f"{PNG_SIDE}x{PNG_SIDE} PNGs); latency p50 {statistics.median(latencies):.1f} ms "
        "(the first call uploads the model)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
