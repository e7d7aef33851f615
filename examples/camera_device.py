"""An example Hearth device: a "camera" that offloads its image and inference work.

It renders its own camera frame (a 640x480 grayscale scene with shapes, a gradient and sensor
noise), then runs three real jobs through the device SDK with ``placement="auto"``:

* ``imgfilter edges``: Sobel edges of the frame (build/examples/wasm/imgfilter.wasm),
* ``mandelbrot``: a CPU-heavy render (build/examples/wasm/mandelbrot.wasm),
* ``digits.onnx``: the digits classifier on the held-out test digits, with its accuracy.

Each job is called a few times so that auto placement can be seen at work: the first call
measures the gateway, the second measures this device, later ones go wherever was faster. When
no gateway answers, the same calls run here.

``examples/demo.py`` (``make demo``) drives it against a gateway it starts itself. Alone, against
any gateway (build the modules first: ``python scripts/build_examples.py``)::

    python examples/camera_device.py                       # discover on every interface
    python examples/camera_device.py --interface 127.0.0.1 # discover on one interface
    python examples/camera_device.py --gateway HOST:PORT   # no discovery
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hearth import Client, GatewayInfo, HearthError, JobError, discover

__all__ = [
    "BUILD_DIR",
    "CameraDevice",
    "Row",
    "describe_gateway",
    "format_row",
    "main",
    "missing_examples",
    "render_frame",
    "table_header",
]

REPO = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO / "build" / "examples"

_EDGE_THRESHOLD = 96  # Sobel magnitude above which a pixel counts as an edge
_MANDELBROT_ARGS = ("640", "480", "400")


@dataclass(frozen=True)
class Row:
    """One call: what ran, where, why, how long it took as seen from the device, what it gave."""

    job: str
    where: str  # "edge" | "local"
    why: str
    latency_ms: float
    result: str
    gateway_id: str | None = None
    digest: str = ""  # of the job's output, to compare runs on the gateway and here


def _files(build_dir: Path) -> dict[str, Path]:
    return {
        "imgfilter": build_dir / "wasm" / "imgfilter.wasm",
        "mandelbrot": build_dir / "wasm" / "mandelbrot.wasm",
        "digits": build_dir / "models" / "digits.onnx",
        "digits_x": build_dir / "models" / "digits_test_X.npy",
        "digits_y": build_dir / "models" / "digits_test_y.npy",
    }


def missing_examples(build_dir: Path = BUILD_DIR) -> list[Path]:
    """The built example files this device needs and does not find."""
    return [path for path in _files(build_dir).values() if not path.is_file()]


# -- the camera frame -------------------------------------------------------------------------


def render_frame(width: int = 640, height: int = 480, seed: int = 7) -> bytes:
    """A synthetic camera frame as a binary PGM (P5): a lit gradient, a few solid shapes and
    Gaussian sensor noise. Deterministic for a given seed."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 40.0 + 90.0 * x / width + 50.0 * y / height  # light falling across the scene
    # A bright disc, a dark box, a mid-gray ring and a triangle.
    cx, cy, r = 0.30 * width, 0.40 * height, 0.16 * height
    img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = 225.0
    box = (x > 0.55 * width) & (x < 0.85 * width) & (y > 0.15 * height) & (y < 0.45 * height)
    img[box] = 25.0
    d = np.hypot(x - 0.70 * width, y - 0.75 * height)
    img[(d > 0.10 * height) & (d < 0.15 * height)] = 150.0
    tri = (y > 0.60 * height) & (y < 0.92 * height)
    tri &= np.abs(x - 0.25 * width) < (y - 0.60 * height) * 0.6
    img[tri] = 200.0
    img += np.random.default_rng(seed).normal(0.0, 4.0, img.shape)
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    return f"P5\n{width} {height}\n255\n".encode() + pixels.tobytes()


def parse_pgm(data: bytes) -> np.ndarray:
    """A binary PGM with maxval 255 and no comments (what the example modules write)."""
    fields = data.split(maxsplit=4)
    if len(fields) < 5 or fields[0] != b"P5" or fields[3] != b"255":
        raise ValueError(f"not an 8-bit binary PGM: {data[:20]!r}")
    width, height = int(fields[1]), int(fields[2])
    pixels = np.frombuffer(fields[4], dtype=np.uint8)
    if pixels.size != width * height:
        raise ValueError(f"PGM {width}x{height} holds {pixels.size} samples")
    return pixels.reshape(height, width)


# -- the device -------------------------------------------------------------------------------


class CameraDevice:
    """Runs the example jobs through ``client``; each method returns one Row.

    Raises FileNotFoundError when the examples are not built, JobError when a job fails
    wherever it ran, and ValueError when a job's output is not what it should be.
    """

    def __init__(self, client: Client, build_dir: Path = BUILD_DIR) -> None:
        missing = missing_examples(build_dir)
        if missing:
            raise FileNotFoundError(
                f"{missing[0]} is missing: build the examples with "
                "`python scripts/build_examples.py` (or `make examples`)"
            )
        self.client = client
        self.files = _files(build_dir)
        self.frame = render_frame()
        self.digits_x = np.load(self.files["digits_x"], allow_pickle=False).astype(np.float32)
        self.digits_y = np.load(self.files["digits_y"], allow_pickle=False)

    def detect_edges(self) -> Row:
        run = self.client.run_wasm(self.files["imgfilter"], stdin=self.frame, args=["edges"])
        if run.exit_code != 0:
            raise ValueError(f"imgfilter exited {run.exit_code}: {run.stderr.decode()[:200]}")
        edges = parse_pgm(run.stdout)
        share = float((edges > _EDGE_THRESHOLD).mean())
        height, width = edges.shape
        return Row(
            "imgfilter edges",
            run.where,
            run.reason,
            run.latency_ms,
            f"{width}x{height} PGM, {share:.1%} edge pixels",
            run.gateway_id,
            hashlib.sha256(run.stdout).hexdigest(),
        )

    def render_mandelbrot(self) -> Row:
        run = self.client.run_wasm(self.files["mandelbrot"], args=_MANDELBROT_ARGS)
        if run.exit_code != 0:
            raise ValueError(f"mandelbrot exited {run.exit_code}: {run.stderr.decode()[:200]}")
        image = parse_pgm(run.stdout)
        inside = float((image == 0).mean())
        height, width = image.shape
        return Row(
            "mandelbrot",
            run.where,
            run.reason,
            run.latency_ms,
            f"{width}x{height} PGM, {inside:.1%} in the set",
            run.gateway_id,
            hashlib.sha256(run.stdout).hexdigest(),
        )

    def classify_digits(self) -> Row:
        result = self.client.infer(self.files["digits"], {"input": self.digits_x}, ["label"])
        labels = np.asarray(result.outputs["label"]).reshape(-1)
        if labels.shape != self.digits_y.shape:
            raise ValueError(f"digits: {labels.shape[0]} labels for {self.digits_y.shape[0]}")
        correct = int((labels == self.digits_y).sum())
        return Row(
            "digits.onnx",
            result.where,
            result.reason,
            result.latency_ms,
            f"accuracy {correct / labels.size:.1%} on {labels.size} digits",
            result.gateway_id,
            hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(),
        )

    def jobs(self) -> list[Callable[[], Row]]:
        return [self.detect_edges, self.render_mandelbrot, self.classify_digits]

    def run(self, repeat: int = 3, on_row: Callable[[Row], None] | None = None) -> list[Row]:
        """Each job ``repeat`` times in a row; ``on_row`` sees each row as it comes."""
        rows = []
        for job in self.jobs():
            for _ in range(repeat):
                row = job()
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        return rows


# -- output -----------------------------------------------------------------------------------

_COLUMNS = "{job:<16} {where:<6} {why:<42} {latency:>10}  {result}"
_RULE_WIDTH = 108


def table_header() -> str:
    head = _COLUMNS.format(job="JOB", where="WHERE", why="WHY", latency="LATENCY", result="RESULT")
    return f"{head}\n{'-' * _RULE_WIDTH}"


def format_row(row: Row) -> str:
    return _COLUMNS.format(
        job=row.job,
        where=row.where,
        why=row.why,
        latency=f"{row.latency_ms:.1f} ms",
        result=row.result,
    )


def describe_gateway(gateway: GatewayInfo) -> str:
    """One line: id, broker, measured round trip, accelerators, runners, load."""
    rtt = "no answer" if gateway.rtt_ms is None else f"{gateway.rtt_ms:.1f} ms"
    return (
        f"{gateway.gateway_id}  broker {gateway.broker}  RTT {rtt}  "
        f"accelerators {','.join(gateway.accelerators) or '-'}  "
        f"runners {','.join(gateway.runners) or '-'}  load {gateway.load:.2f}"
    )


# -- stand-alone ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="An example device: offloads image and inference jobs to a Hearth gateway, "
        "or runs them itself when none is reachable."
    )
    parser.add_argument("--gateway", metavar="HOST:PORT", help="use this gateway, no discovery")
    parser.add_argument("--interface", metavar="IP", help="discover on this interface only")
    parser.add_argument(
        "--where",
        choices=["auto", "edge", "local"],
        default="auto",
        help="placement (default auto)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, metavar="N", help="calls per job (default 3)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.gateway:
        print(f"Using gateway {args.gateway} (given, no discovery)")
    else:
        where = f"on {args.interface}" if args.interface else "on all interfaces"
        gateways = discover(interface=args.interface)
        if not gateways:
            print(f"No gateway found over mDNS {where}: every job will run on this device")
        else:
            print(f"Found over mDNS {where}:")
        for gateway in gateways:
            print(f"  {describe_gateway(gateway)}")
    started = time.monotonic()
    try:
        with Client(args.gateway, interface=args.interface, placement=args.where) as client:
            device = CameraDevice(client)
            print()
            print(table_header())
            rows = device.run(args.repeat, on_row=lambda row: print(format_row(row), flush=True))
    except JobError as exc:
        print(f"job failed ({exc.where}): {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (HearthError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    edge = sum(row.where == "edge" for row in rows)
    print(
        f"\n{len(rows)} calls in {time.monotonic() - started:.1f} s: {edge} on the gateway, "
        f"{len(rows) - edge} on this device."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
