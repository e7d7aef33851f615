"""An example camera: streams frames to a Hearth gateway and gets faces and motion back.

The camera makes its own pictures (nothing is downloaded): a 640x480 textured wall with a
photograph hanging on it (scikit-image's astronaut, so there is a face to find) and a dark ball
rolling across in front. Every frame goes out twice, without waiting for answers, on two camera
streams: ``vision.faces`` (face boxes) and ``vision.motion`` (what moved, against a background
model the gateway learns from this stream). When the camera sends faster than the gateway can
work, the gateway keeps only the newest waiting frame of each stream and tells the camera
which frames it dropped; the camera prints each frame's answers as they arrive.

Run it against a gateway on this machine or your LAN (frames are private: they only ever go to
a gateway on the LAN)::

    .venv/bin/hearth-gateway run --listen 127.0.0.1:1883 --no-mdns &
    .venv/bin/python examples/vision_camera.py --gateway 127.0.0.1:1883
    HEARTH_GATEWAY=127.0.0.1:1883 .venv/bin/python examples/vision_camera.py --fps 20
    .venv/bin/python examples/vision_camera.py          # find the gateway over mDNS

``--fps`` sets the camera's rate (default 8) and ``--frames`` how many it sends (default 40).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import cv2
import numpy as np

from _args import gateway_parser
from hearth import Call, Client, Dropped, HearthError

WIDTH, HEIGHT = 640, 480
BALL_RADIUS = 28  # px
PHOTO_SIDE = 300  # px: the photograph on the wall (the face in it is about 55 px)


class Scene:
    """A fixed camera's view: the wall and photograph stay, the ball rolls left to right."""

    def __init__(self, seed: int = 0) -> None:
        from skimage import data as skdata

        rng = np.random.default_rng(seed)
        # A plaster-like wall: smoothed noise, a few painted shapes, a gradient of light.
        wall = cv2.GaussianBlur(rng.integers(40, 220, (HEIGHT, WIDTH, 3), np.uint8), (0, 0), 1.5)
        for _ in range(40):
            x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
            w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            colour = tuple(int(c) for c in rng.integers(60, 200, 3))
            cv2.rectangle(wall, (x, y), (x + w, y + h), colour, -1)
        light = np.linspace(0.8, 1.1, WIDTH, dtype=np.float32)[None, :, None]
        wall = np.clip(wall * light, 0, 255).astype(np.uint8)
        photo = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
        photo = cv2.resize(photo, (PHOTO_SIDE, PHOTO_SIDE), interpolation=cv2.INTER_AREA)
        top, left = 60, WIDTH - PHOTO_SIDE - 30
        wall[top : top + PHOTO_SIDE, left : left + PHOTO_SIDE] = photo
        self.background = wall
        self._rng = rng

    def frame(self, index: int, total: int) -> np.ndarray:
        image = self.background.copy()
        # The ball crosses the left part of the picture once over the whole run.
        x = int(40 + (WIDTH - PHOTO_SIDE - 120) * index / max(1, total - 1))
        y = int(HEIGHT - 110 + 25 * np.sin(index / 3))
        cv2.circle(image, (x, y), BALL_RADIUS, (30, 30, 40), -1, lineType=cv2.LINE_AA)
        noise = self._rng.normal(0.0, 2.0, image.shape)  # the sensor's
        return np.clip(image + noise, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode a frame")
    return buffer.tobytes()


def boxes(items: Sequence[Any]) -> str:
    return " ".join(f"({b.x},{b.y} {b.w}x{b.h})" for b in items) or "-"


def describe(outcome: Future[Any], kind: str) -> str:
    try:
        result = outcome.result()
    except HearthError as exc:
        return f"{kind}: error {exc}"
    if isinstance(result, Dropped):
        return f"{kind}: dropped (a newer frame came first)"
    assert isinstance(result, Call)
    took = f"{result.latency_ms:.0f} ms"
    if kind == "faces":
        return f"faces: {len(result.result.faces)} {boxes(result.result.faces)}  {took}"
    motion = result.result
    if motion.learning:
        return f"motion: learning the background  {took}"
    regions = f"{len(motion.regions)} {boxes(motion.regions[:3])}"
    return f"motion: {regions} ({motion.moving_fraction:.1%} moving)  {took}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = gateway_parser(__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=5.0, help="frames per second (default 5)")
    parser.add_argument("--frames", type=int, default=50, help="frames to send (default 50)")
    parser.add_argument("--name", default="porch", help="the camera's stream name")
    args = parser.parse_args(argv)
    if args.fps <= 0 or args.frames < 1:
        parser.error("--fps must be positive and --frames at least 1")

    scene = Scene()
    frames = [jpeg(scene.frame(i, args.frames)) for i in range(args.frames)]
    names = {"faces": f"{args.name}-faces", "motion": f"{args.name}-motion"}
    print(
        f"{args.frames} frames of {WIDTH}x{HEIGHT} at {args.fps:g} frames/s on streams "
        f"{names['faces']} (vision.faces) and {names['motion']} (vision.motion)"
    )
    outcomes: dict[str, list[Future[Any]]] = {"faces": [], "motion": []}
    try:
        with Client(args.gateway, interface=args.interface, placement="edge") as client:
            streams = {kind: client.stream(name, f"vision.{kind}") for kind, name in names.items()}
            pending: deque[tuple[int, Future[Any], Future[Any]]] = deque()

            def show(final: bool) -> None:
                # Each frame's line once both its answers are in (all of them at the end).
                while pending and (final or (pending[0][1].done() and pending[0][2].done())):
                    index, faces, motion = pending.popleft()
                    wait([faces, motion], timeout=60)
                    print(
                        f"frame {index:3d}  {describe(faces, 'faces'):48s}  "
                        + describe(motion, "motion")
                    )

            started = time.monotonic()
            for index, frame in enumerate(frames):
                delay = started + index / args.fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                # send() does not wait for the answer: the camera keeps its own pace.
                faces, motion = streams["faces"].send(frame), streams["motion"].send(frame)
                outcomes["faces"].append(faces)
                outcomes["motion"].append(motion)
                pending.append((index, faces, motion))
                show(final=False)
            show(final=True)
            elapsed = time.monotonic() - started
    except HearthError as exc:
        print(f"vision_camera: {exc}", file=sys.stderr)
        return 1
    print(f"\n{args.frames} frames in {elapsed:.1f} s")
    for kind, stream in streams.items():
        dropped = sum(isinstance(f.result(), Dropped) for f in outcomes[kind] if not f.exception())
        print(
            f"{stream.name}: sent {stream.stats.sent}, processed {stream.stats.processed}, "
            f"dropped {dropped} (the gateway's count for this stream: {stream.stats.dropped}), "
            f"failed {stream.stats.failed}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
