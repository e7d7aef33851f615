"""An example plate reader: sends pictures to a Hearth gateway's ``vision.plate`` and prints the
licence-plate text it reads.

Give it your own pictures with ``--image FILE`` (JPEG or PNG, repeatable), or let it render a few
synthetic plate scenes (``testkit.plates_synth``: a plate on a car body, tilted, blurred, noisy and
unevenly lit; nothing is downloaded) and compare the readings with the truth. The gateway reads
the text with the PP-OCRv4 ONNX models of the ``rapidocr-onnxruntime`` wheel; its first plate
loads them first.

Run it against a gateway on this machine or your LAN (pictures are private: they only ever go to
a gateway on the LAN)::

    .venv/bin/hearth-gateway run --listen 127.0.0.1:1883 --no-mdns &
    .venv/bin/python examples/vision_plate.py --gateway 127.0.0.1:1883
    HEARTH_GATEWAY=127.0.0.1:1883 .venv/bin/python examples/vision_plate.py --count 20
    .venv/bin/python examples/vision_plate.py --image car.jpg --pattern '[A-Z]{2}[0-9]{2}[A-Z]{3}'

``--count`` synthetic plates (default 5), ``--seed``, ``--difficulty`` (default 1.0: tilts up to
18 degrees, strong blur and light changes), ``--pattern``: a regular expression the reading
must match (letters and digits only), which also lets the gateway repair look-alike characters.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from _args import gateway_parser
from hearth import Client, HearthError
from hearth.protocol.vision import PlateResult

# testkit/ (the synthetic scenes the tests use too) is imported from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.plates_synth import random_plate_text, render_plate


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode the picture")
    return buffer.tobytes()


def plain(text: str) -> str:
    """Letters and digits only: how a reading is compared with a plate's printed text."""
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def lines(result: PlateResult) -> str:
    return ", ".join(f"{line.text!r} {line.score:.2f}" for line in result.lines) or "no text"


def main(argv: Sequence[str] | None = None) -> int:
    parser = gateway_parser(__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, action="append", help="a picture to read")
    parser.add_argument("--count", type=int, default=5, help="synthetic plates (default 5)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--pattern", default="", help="regular expression a reading must match")
    args = parser.parse_args(argv)
    params = {"pattern": args.pattern} if args.pattern else {}

    try:
        # The first plate loads the OCR models on the gateway: allow it time.
        with Client(
            args.gateway, interface=args.interface, placement="edge", timeout_s=60.0
        ) as client:
            if args.image:
                for path in args.image:
                    call = client.plate(path, **params)
                    result = call.result
                    print(
                        f"{path}: {result.text or '(no plate)'}  score {result.score:.2f}  "
                        f"{call.latency_ms:.0f} ms  lines: {lines(result)}"
                    )
                return 0
            rng = np.random.default_rng(args.seed)
            exact = 0
            print(f"{'printed':12s}  {'read':12s}  {'score':>5}  {'ms':>5}")
            for _ in range(args.count):
                truth = random_plate_text(rng)
                scene = render_plate(truth, rng, difficulty=args.difficulty)
                call = client.plate(jpeg(scene), **params)
                ok = plain(call.result.text) == plain(truth)
                exact += ok
                print(
                    f"{truth:12s}  {call.result.text or '-':12s}  {call.result.score:5.2f}  "
                    f"{call.latency_ms:5.0f}  {'ok' if ok else 'MISREAD'}"
                )
    except (HearthError, OSError) as exc:
        print(f"vision_plate: {exc}", file=sys.stderr)
        return 1
    print(f"\n{exact} of {args.count} plates read exactly ({exact / max(1, args.count):.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
