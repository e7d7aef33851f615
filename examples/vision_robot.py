"""An example robot: streams its camera through ``vision.odometry`` and prints its trajectory.

The robot's camera is simulated (nothing is downloaded): ``testkit.scenes.render_sequence``
renders a textured room with boxes as seen from a camera driving a known path (a wide curve with
some sway, bob and head turns), with sensor noise. The robot opens an odometry session on the
gateway, sends the frames one by one as JPEGs and gets the camera's pose back for each; the
gateway keeps the session's keyframes until the robot closes it.

One camera cannot see scale, so the estimated positions are in the session's own unit (each
measured step has length 1); the true path moves 0.1 m per frame. At the end the robot compares
with the ground truth: the per-step rotation and direction-of-travel errors, and how far the
end point drifted once the estimated path is given the true path's length.

Run it against a gateway on this machine or your LAN::

    .venv/bin/hearth-gateway run --listen 127.0.0.1:1883 --no-mdns &
    .venv/bin/python examples/vision_robot.py --gateway 127.0.0.1:1883
    HEARTH_GATEWAY=127.0.0.1:1883 .venv/bin/python examples/vision_robot.py --frames 120
    .venv/bin/python examples/vision_robot.py          # find the gateway over mDNS

``--frames`` (default 60), ``--size`` (default 640x480), ``--seed`` (the room; default 3).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from _args import gateway_parser
from hearth import Client, HearthError

# testkit/ (the synthetic scenes the tests use too) is imported from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.scenes import relative_errors, render_sequence


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode a frame")
    return buffer.tobytes()


def size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def path_length(positions: Sequence[np.ndarray]) -> float:
    return sum(float(np.linalg.norm(b - a)) for a, b in itertools.pairwise(positions))


def main(argv: Sequence[str] | None = None) -> int:
    parser = gateway_parser(__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="frames to drive (default 60)")
    parser.add_argument("--size", type=size, default=(640, 480), help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=3, help="which room (default 3)")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    width, height = args.size

    started = time.monotonic()
    seq = render_sequence(args.frames, width=width, height=height, seed=args.seed)
    frames = [jpeg(frame) for frame in seq.frames]
    took = time.monotonic() - started
    print(f"rendered {args.frames} frames of {width}x{height} in {took:.1f} s")
    k = seq.K  # the camera's intrinsics, which the session needs
    fx, fy, cx, cy = (float(v) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
    poses = []
    print("frame   ok  inliers  key        x       y       z   true x, y, z (m)")
    try:
        with (
            Client(args.gateway, interface=args.interface, placement="edge") as client,
            client.odometry(fx=fx, fy=fy, cx=cx, cy=cy) as session,
        ):
            started = time.monotonic()
            for index, frame in enumerate(frames):
                pose = session.track(frame).result
                poses.append(pose)
                x, y, z = pose.translation
                tx, ty, tz = seq.poses[index][1]
                print(
                    f"{pose.frame:5d}  {'yes' if pose.ok else 'no':>3}  {pose.inliers:7d}  "
                    f"{'*' if pose.keyframe else '':>3}  {x:7.2f} {y:7.2f} {z:7.2f}   "
                    f"{tx:6.2f} {ty:6.2f} {tz:6.2f}"
                )
            elapsed = time.monotonic() - started
            processed = session.close()
    except HearthError as exc:
        print(f"vision_robot: {exc}", file=sys.stderr)
        return 1

    estimated = [
        (np.asarray(p.rotation, float).reshape(3, 3), np.asarray(p.translation, float))
        for p in poses
    ]
    rotation, direction = relative_errors(estimated, seq.poses)
    true_xyz = [t for _, t in seq.poses]
    est_xyz = [t for _, t in estimated]
    # Monocular odometry has no scale: give the estimated path the true path's length.
    scale = path_length(true_xyz) / max(path_length(est_xyz), 1e-9)
    drift = float(np.linalg.norm(est_xyz[-1] * scale - true_xyz[-1]))
    travelled = path_length(true_xyz)
    print(
        f"\n{processed} frames in {elapsed:.1f} s ({len(frames) / elapsed:.1f} frames/s), "
        f"{sum(p.ok for p in poses)} tracked"
    )
    print(
        f"per step: rotation error median {statistics.median(rotation):.3f} deg "
        f"(max {max(rotation):.3f}), direction of travel error median "
        f"{statistics.median(direction):.2f} deg (max {max(direction):.2f})"
    )
    print(
        f"end point: {drift:.2f} m from the truth after {travelled:.1f} m "
        f"({drift / travelled:.1%} of the distance; scale taken from the true path length)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
