"""Vision through the gateway against the same work done in-process, on loopback.

One run, all on 127.0.0.1: one Mosquitto (the gateway's own config) and one ``hearth-gateway``
subprocess with W worker processes (``--workers``, default one per core). Three parts:

1. Faces: ``vision.faces`` on 640x480 JPEG frames cut from a real photograph (scikit-image's
   astronaut, shifted and re-exposed per frame) through the gateway, against the same pipeline
   in this process (``images.decode`` + ``faces.FaceDetector``, same parameters, OpenCV at one
   thread as in the workers) on W threads (OpenCV releases the GIL). Sequential single-frame
   latency first (interleaved blocks), then throughput with the same number of frames in flight
   on both sides (interleaved halves; the in-process frames queue for W threads as the
   gateway's queue for W workers), with latency under that load. Target: gateway/in-process
   throughput >= 0.8.
2. A camera past capacity: one stream (``client.stream(...).send``) paced at twice the
   gateway's measured face throughput for a few seconds. The gateway keeps only the newest
   waiting frame per stream, so latency should stay bounded: target p99 send-to-result latency
   of processed frames <= 2x the single-frame latency (p50 of sequential calls made just before
   and after the stream). The gateway's queue-wait and run times of those frames show which of
   the two grew. Dropped frames as the device sees them (``Dropped`` outcomes,
   ``Call.dropped``) and as the gateway's status counts them (``frames_dropped``).
3. Odometry: ``vision.odometry`` over a rendered sequence with known motion (``scenes``),
   frames per second through the gateway and in-process, and the median per-pair rotation and
   translation-direction errors of the poses (targets < 1 and < 5 degrees).

Figures are measured, not asserted: a miss is reported (MISS), not an error. On a small, shared
box every figure moves with the background load; the CPU time per frame (all of the
benchmark's processes together) moves less.

    .venv/bin/python benchmarks/vision.py                 # tables
    .venv/bin/python benchmarks/vision.py --json          # one JSON line on stdout
    .venv/bin/python benchmarks/vision.py --frames 200 --stream-seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from _common import (
    LOOPBACK,
    GatewayProcess,
    Mosquitto,
    Summary,
    print_table,
    run_and_report,
    setup_logging,
    tree_cpu_s,
    verdict,
)
from hearth import Client, Dropped
from hearth.protocol.vision import Box, Image
from hearth_gateway.policy import LimitsPolicy, VisionPolicy
from hearth_gateway.status import read_snapshot
from hearth_gateway.vision.faces import FaceDetector, FacesParams
from hearth_gateway.vision.images import decode, encode_jpeg
from hearth_gateway.vision.odometry import OdometryParams, OdometrySessions
from testkit.scenes import relative_errors, render_sequence

log = logging.getLogger("bench.vision")

TARGET_THROUGHPUT_RATIO = 0.8  # gateway frames/s over in-process frames/s, at least
TARGET_STREAM_P99_RATIO = 2.0  # stream p99 over single-frame p50, at most
TARGET_ODO_ROT_DEG = 1.0  # median per-pair rotation error, below
TARGET_ODO_DIR_DEG = 5.0  # median per-pair translation-direction error, below

WIDTH, HEIGHT = 640, 480
DEFAULT_FRAMES = 48  # frames per side in the throughput run
DEFAULT_SEQUENTIAL = 12  # single-frame calls per side
DEFAULT_STREAM_S = 6.0
DEFAULT_ODO_FRAMES = 40
N_VARIANTS = 16  # distinct face frames, cycled
ODO_SEED = 3
JPEG_QUALITY = 90
ODO_JPEG_QUALITY = 95  # odometry follows sub-pixel corners: keep the artefacts small
TIMEOUT_S = 60.0  # one call; a stuck run fails instead of hanging
ROUNDS = 2  # sequential blocks per side

Figures = dict[str, float | int | bool]


# -- frames -----------------------------------------------------------------------------------


def face_frames(count: int, seed: int = 0) -> list[bytes]:
    """``count`` 640x480 JPEGs of the astronaut photograph (512x512, reflected at the sides to
    fill the width), each shifted and exposed a little differently, with sensor noise."""
    from skimage import data as skdata

    photo = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    pad = (WIDTH - photo.shape[1]) // 2 + 64
    wide = cv2.copyMakeBorder(photo, 0, 0, pad, pad, cv2.BORDER_REFLECT)
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        dx = int(rng.integers(0, wide.shape[1] - WIDTH + 1))
        dy = int(rng.integers(0, photo.shape[0] - HEIGHT + 1))
        frame = wide[dy : dy + HEIGHT, dx : dx + WIDTH]
        frame = cv2.convertScaleAbs(frame, alpha=rng.uniform(0.85, 1.15), beta=rng.uniform(-12, 12))
        noise = rng.normal(0.0, 2.0, frame.shape).astype(np.int16)
        frame = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        frames.append(encode_jpeg(frame, JPEG_QUALITY))
    return frames


class InProcessFaces:
    """The gateway worker's faces pipeline, here: decode with the same pixel budget, detect
    with a FaceDetector per thread (a cascade is not to be shared between threads)."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="inproc-faces")
        self._local = threading.local()
        self._params = FacesParams()
        self._max_megapixels = VisionPolicy().max_megapixels

    def detect(self, jpeg: bytes) -> list[Box]:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = FaceDetector()
        image = decode(Image(format="jpeg", data=jpeg), max_megapixels=self._max_megapixels)
        return detector.detect(image, self._params)

    def submit(self, jpeg: bytes) -> Future[list[Box]]:
        return self._pool.submit(self.detect, jpeg)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Load:
    """A throughput run's outcome: wall time, CPU time and each frame's submit-to-done time."""

    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: Load) -> None:
        self.elapsed_s += other.elapsed_s
        self.cpu_s += other.cpu_s
        self.frames += other.frames
        self.latencies_ms += other.latencies_ms

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else float("nan")

    @property
    def cpu_ms_per_frame(self) -> float:
        return self.cpu_s * 1e3 / self.frames if self.frames else float("nan")


def measure_load(
    submit: Callable[[bytes], Future[Any]], frames: Sequence[bytes], count: int, inflight: int
) -> Load:
    """Send ``count`` frames (cycling ``frames``) with at most ``inflight`` outstanding: a new
    one goes out as soon as any finishes."""
    slots = threading.Semaphore(inflight)
    errors: list[BaseException] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def sent(i: int) -> None:
        started = time.perf_counter()

        def finished(future: Future[Any]) -> None:
            exc = future.exception()
            with lock:
                if exc is not None:
                    errors.append(exc)
                latencies.append((time.perf_counter() - started) * 1e3)
            slots.release()

        submit(frames[i % len(frames)]).add_done_callback(finished)

    cpu_before = tree_cpu_s()
    started = time.perf_counter()
    for i in range(count):
        if not slots.acquire(timeout=TIMEOUT_S):
            raise TimeoutError(f"no result within {TIMEOUT_S} s with {inflight} in flight")
        if errors:
            raise errors[0]
        sent(i)
    for _ in range(inflight):  # wait for the last ones
        if not slots.acquire(timeout=TIMEOUT_S):
            raise TimeoutError(f"no result within {TIMEOUT_S} s with {inflight} in flight")
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_s() - cpu_before
    if errors:
        raise errors[0]
    return Load(elapsed, cpu, count, latencies)


def measure_sequential(
    calls: dict[str, Callable[[bytes], Any]], frames: Sequence[bytes], n: int
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """``n`` calls per side, one after another, in ``ROUNDS`` interleaved blocks; the same
    frames on each side, so their results can be compared."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, list[Any]] = {name: [] for name in calls}
    done = 0
    for r in range(ROUNDS):
        block = n // ROUNDS + (n % ROUNDS if r == ROUNDS - 1 else 0)
        for name, call in calls.items():
            for i in range(done, done + block):
                started = time.perf_counter()
                result = call(frames[i % len(frames)])
                samples[name].append((time.perf_counter() - started) * 1e3)
                results[name].append(result)
        done += block
    return samples, results


# -- the three parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    workers: int
    inflight: int
    frames: int
    sequential: int
    stream_s: float
    odo_frames: int


def bench_faces(client: Client, opts: Options, frames: list[bytes], out: Figures) -> float:
    """Part 1; returns the gateway's face throughput (frames/s), the camera's baseline."""
    inproc = InProcessFaces(opts.workers)
    gateway_pool = ThreadPoolExecutor(opts.inflight, thread_name_prefix="gw-faces")
    try:

        def gateway_call(jpeg: bytes) -> list[Box]:
            return client.faces(jpeg).result.faces

        def gateway_submit(jpeg: bytes) -> Future[list[Box]]:
            return gateway_pool.submit(gateway_call, jpeg)

        # Warm-up: every worker and thread loads its cascade and touches its buffers.
        for submit in (gateway_submit, inproc.submit):
            measure_load(submit, frames, 2 * opts.inflight, opts.inflight)
        log.info("faces: warmed up; %d sequential calls per side", opts.sequential)

        gw_runs: list[Any] = []

        def gateway_sequential(jpeg: bytes) -> list[Box]:
            call = client.faces(jpeg)
            gw_runs.append(call)
            return call.result.faces

        samples, results = measure_sequential(
            {"gateway": gateway_sequential, "in-process": inproc.detect}, frames, opts.sequential
        )
        log.info("faces: throughput, %d frames per side, %d in flight", opts.frames, opts.inflight)
        loads = {"gateway": Load(), "in-process": Load()}
        for part in (opts.frames // 2, opts.frames - opts.frames // 2):
            if part:
                loads["gateway"].add(measure_load(gateway_submit, frames, part, opts.inflight))
                loads["in-process"].add(measure_load(inproc.submit, frames, part, opts.inflight))
    finally:
        gateway_pool.shutdown(wait=True)
        inproc.close()

    for name, key in (("gateway", "gateway"), ("in-process", "inproc")):
        single = Summary.of(samples[name])
        loaded = Summary.of(loads[name].latencies_ms)
        out[f"faces_{key}_fps"] = loads[name].fps
        out[f"faces_{key}_cpu_ms_per_frame"] = loads[name].cpu_ms_per_frame
        out[f"faces_{key}_single_p50_ms"] = single.p50
        out[f"faces_{key}_single_p99_ms"] = single.p99
        out[f"faces_{key}_load_p50_ms"] = loaded.p50
        out[f"faces_{key}_load_p99_ms"] = loaded.p99
    out["faces_gateway_run_p50_ms"] = Summary.of([c.timing.run_ms for c in gw_runs]).p50
    out["faces_gateway_queue_p50_ms"] = Summary.of([c.timing.queue_ms for c in gw_runs]).p50
    ratio = float(out["faces_gateway_fps"]) / float(out["faces_inproc_fps"])
    out["faces_throughput_ratio"] = ratio
    out["faces_cpu_ratio"] = float(out["faces_inproc_cpu_ms_per_frame"]) / float(
        out["faces_gateway_cpu_ms_per_frame"]
    )
    out["pass_faces_throughput"] = ratio >= TARGET_THROUGHPUT_RATIO
    # Same frames, same code: the boxes should be the same on both sides.
    out["faces_results_match"] = results["gateway"] == results["in-process"]
    out["faces_found_fraction"] = sum(bool(r) for r in results["gateway"]) / len(results["gateway"])
    out["faces_frames"] = opts.frames
    out["faces_sequential"] = opts.sequential
    return float(out["faces_gateway_fps"])


def _status_dropped(state_dir: Path, since: float, timeout_s: float = 8.0) -> int | None:
    """The gateway's frames_dropped from a status snapshot written after ``since`` (the daemon
    rewrites it every couple of seconds); None if none comes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = read_snapshot(state_dir)
        if snap is not None and snap.updated_at > since:
            return snap.frames_dropped
        time.sleep(0.2)
    return None


def bench_stream(
    client: Client,
    gateway: GatewayProcess,
    opts: Options,
    frames: list[bytes],
    capacity: float,
    out: Figures,
) -> None:
    """Part 2: a camera at twice the measured capacity."""
    rate = 2.0 * capacity
    count = max(2, round(rate * opts.stream_s))
    stream = client.stream(f"bench-cam-{uuid.uuid4().hex[:8]}", "vision.faces")
    dropped_before = _status_dropped(gateway.state_dir, 0.0) or 0

    def single_frames() -> list[float]:
        # The baseline: sequential calls just before and just after the stream, so that a
        # change in the box's background load hits both alike.
        n = max(3, opts.sequential // 2)
        return [client.faces(frames[i % len(frames)]).latency_ms for i in range(n)]

    baseline = single_frames()
    log.info("stream: %d frames at %.1f frames/s (2x capacity)", count, rate)
    futures = []
    started = time.perf_counter()
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(stream.send(frames[i % len(frames)]))
    send_s = time.perf_counter() - started
    outcomes = [f.result(TIMEOUT_S) for f in futures]
    ended = time.time()
    processed = [o for o in outcomes if not isinstance(o, Dropped)]
    dropped = [o for o in outcomes if isinstance(o, Dropped)]
    latency = Summary.of([o.latency_ms for o in processed])
    status = _status_dropped(gateway.state_dir, ended)
    baseline += single_frames()
    single = Summary.of(baseline).p50
    out["stream_single_p50_ms"] = single

    out["stream_target_fps"] = rate
    # Frames 0..count-1 go out at i / rate: count - 1 intervals.
    out["stream_sent_fps"] = (count - 1) / send_s if send_s else float("nan")
    out["stream_sent"] = count
    out["stream_processed"] = len(processed)
    out["stream_processed_fps"] = len(processed) / send_s if send_s else float("nan")
    out["stream_dropped"] = len(dropped)  # Dropped outcomes
    out["stream_dropped_in_results"] = max((o.dropped for o in processed), default=0)
    out["stream_dropped_in_stats"] = stream.stats.dropped
    out["stream_dropped_status"] = -1 if status is None else status - dropped_before
    out["stream_failed"] = stream.stats.failed
    out["stream_p50_ms"] = latency.p50
    out["stream_p99_ms"] = latency.p99
    out["stream_max_ms"] = latency.max
    # Where a processed frame's time went, as the gateway reports it: waiting for a worker
    # (bounded by latest-frame-wins) and running (longer than alone when every core is busy).
    queue = Summary.of([o.timing.queue_ms for o in processed])
    run = Summary.of([o.timing.run_ms for o in processed])
    out["stream_queue_p50_ms"] = queue.p50
    out["stream_queue_p99_ms"] = queue.p99
    out["stream_run_p50_ms"] = run.p50
    out["stream_run_p99_ms"] = run.p99
    out["stream_p99_ratio"] = latency.p99 / single
    out["pass_stream_p99"] = latency.p99 / single <= TARGET_STREAM_P99_RATIO
    out["stream_newest_processed"] = not isinstance(outcomes[-1], Dropped)


def _pose(result: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(result.rotation, float).reshape(3, 3), np.asarray(result.translation, float)


def bench_odometry(client: Client, opts: Options, out: Figures) -> None:
    """Part 3: odometry over a rendered sequence, through the gateway and in-process."""
    started = time.perf_counter()
    seq = render_sequence(opts.odo_frames, width=WIDTH, height=HEIGHT, seed=ODO_SEED)
    jpegs = [encode_jpeg(f, ODO_JPEG_QUALITY) for f in seq.frames]
    log.info("odometry: %d frames rendered in %.1f s", len(jpegs), time.perf_counter() - started)
    k = seq.K
    fx, fy, cx, cy = (float(v) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))

    # A short warm-up session on each side: imports, first allocations.
    with client.odometry(fx=fx, fy=fy, cx=cx, cy=cy) as warm:
        for jpeg in jpegs[:3]:
            warm.track(jpeg)
    with client.odometry(fx=fx, fy=fy, cx=cx, cy=cy) as session:
        started = time.perf_counter()
        gw_results = [session.track(jpeg).result for jpeg in jpegs]
        gw_s = time.perf_counter() - started

    # The same work in this process: decode as the worker does, the same session code.
    max_mp = VisionPolicy().max_megapixels
    params = OdometryParams(fx=fx, fy=fy, cx=cx, cy=cy)
    sessions = OdometrySessions()

    def track(name: str, jpeg: bytes) -> Any:
        image = decode(Image(format="jpeg", data=jpeg), max_megapixels=max_mp)
        return sessions.frame(name, image, params)

    for jpeg in jpegs[:3]:
        track("warm", jpeg)
    started = time.perf_counter()
    local_results = [track("bench", jpeg) for jpeg in jpegs]
    local_s = time.perf_counter() - started

    sides = (("gateway", gw_results, gw_s), ("inproc", local_results, local_s))
    for key, results, seconds in sides:
        rot, direction = relative_errors([_pose(r) for r in results], seq.poses)
        out[f"odo_{key}_fps"] = len(results) / seconds
        out[f"odo_{key}_rot_err_median_deg"] = statistics.median(rot)
        out[f"odo_{key}_dir_err_median_deg"] = statistics.median(direction)
        out[f"odo_{key}_ok_frames"] = sum(r.ok for r in results)
    out["odo_frames"] = len(jpegs)
    out["odo_fps_ratio"] = float(out["odo_gateway_fps"]) / float(out["odo_inproc_fps"])
    out["pass_odo_rot"] = float(out["odo_gateway_rot_err_median_deg"]) < TARGET_ODO_ROT_DEG
    out["pass_odo_dir"] = float(out["odo_gateway_dir_err_median_deg"]) < TARGET_ODO_DIR_DEG


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    figures: Figures


def run(opts: Options, work_dir: Path) -> Outcome:
    cv2.setNumThreads(1)  # as in the gateway's workers: the parallelism is the W threads
    frames = face_frames(N_VARIANTS)
    out: Figures = {}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(work_dir))
        gateway = stack.enter_context(
            GatewayProcess(broker.address, work_dir, workers=opts.workers)
        )
        client = stack.enter_context(
            Client(
                gateway=f"{LOOPBACK}:{broker.address.port}",
                client_id="bench-vision",
                placement="edge",
                timeout_s=TIMEOUT_S,
            )
        )
        capacity = bench_faces(client, opts, frames, out)
        log.info(
            "faces: gateway %.1f frames/s, in-process %.1f frames/s",
            capacity,
            out["faces_inproc_fps"],
        )
        bench_stream(client, gateway, opts, frames, capacity, out)
        bench_odometry(client, opts, out)
    out["workers"] = opts.workers
    out["inflight"] = opts.inflight
    out["cpus"] = os.cpu_count() or 1
    return Outcome(out)


def print_report(outcome: Outcome) -> None:
    f = outcome.figures
    print_table(
        [
            "faces 640x480 JPEG",
            "frames/s",
            "CPU ms/frame",
            "single p50 ms",
            "single p99 ms",
            "load p50 ms",
            "load p99 ms",
        ],
        [
            [
                name,
                f[f"faces_{key}_fps"],
                f[f"faces_{key}_cpu_ms_per_frame"],
                f[f"faces_{key}_single_p50_ms"],
                f[f"faces_{key}_single_p99_ms"],
                f[f"faces_{key}_load_p50_ms"],
                f[f"faces_{key}_load_p99_ms"],
            ]
            for name, key in (("gateway", "gateway"), ("in-process", "inproc"))
        ],
        title=f"Face detection ({f['workers']} gateway workers = in-process threads, "
        f"{f['inflight']} frames in flight, {f['faces_frames']} frames per side; "
        f"{f['cpus']} CPUs; gateway run p50 {f['faces_gateway_run_p50_ms']:.1f} ms, "
        f"queue p50 {f['faces_gateway_queue_p50_ms']:.1f} ms; same boxes on both sides: "
        f"{f['faces_results_match']}; frames with a face: {f['faces_found_fraction']:.0%})",
    )
    print_table(
        ["camera stream", "value"],
        [
            ["target rate (2x capacity), frames/s", f["stream_target_fps"]],
            ["sent, frames/s", f["stream_sent_fps"]],
            ["frames sent", f["stream_sent"]],
            ["frames processed", f["stream_processed"]],
            ["frames dropped (Dropped outcomes)", f["stream_dropped"]],
            ["dropped, last Call.dropped", f["stream_dropped_in_results"]],
            ["dropped, gateway status frames_dropped", f["stream_dropped_status"]],
            ["failed", f["stream_failed"]],
            ["latency p50 ms (processed)", f["stream_p50_ms"]],
            ["latency p99 ms (processed)", f["stream_p99_ms"]],
            ["latency max ms (processed)", f["stream_max_ms"]],
            ["  of it, gateway queue wait p50 ms", f["stream_queue_p50_ms"]],
            ["  of it, gateway queue wait p99 ms", f["stream_queue_p99_ms"]],
            ["  of it, gateway run time p50 ms", f["stream_run_p50_ms"]],
            ["  of it, gateway run time p99 ms", f["stream_run_p99_ms"]],
            ["single-frame p50 ms (sequential, before + after)", f["stream_single_p50_ms"]],
        ],
        title="A camera at twice the gateway's capacity (vision.faces, latest frame wins)",
    )
    print_table(
        ["odometry", "frames/s", "ok frames", "rot err median deg", "dir err median deg"],
        [
            [
                name,
                f[f"odo_{key}_fps"],
                f"{f[f'odo_{key}_ok_frames']}/{f['odo_frames']}",
                f[f"odo_{key}_rot_err_median_deg"],
                f[f"odo_{key}_dir_err_median_deg"],
            ]
            for name, key in (("gateway", "gateway"), ("in-process", "inproc"))
        ],
        title=f"Visual odometry ({f['odo_frames']} rendered {WIDTH}x{HEIGHT} frames as JPEG, "
        "one session, frame by frame)",
    )
    rows: list[list[object]] = []
    ratio = float(f["faces_throughput_ratio"])
    rows.append(
        [
            "faces throughput gateway/in-process",
            ratio,
            f">= {TARGET_THROUGHPUT_RATIO}",
            verdict(ratio, TARGET_THROUGHPUT_RATIO, at_most=False),
        ]
    )
    ratio = float(f["faces_cpu_ratio"])
    rows.append(["  (CPU per frame in-process/gateway)", ratio, "-", "-"])
    ratio = float(f["stream_p99_ratio"])
    rows.append(
        [
            "stream p99 / single-frame p50",
            ratio,
            f"<= {TARGET_STREAM_P99_RATIO}",
            verdict(ratio, TARGET_STREAM_P99_RATIO, at_most=True),
        ]
    )
    for what, key, target in (
        ("rotation", "rot", TARGET_ODO_ROT_DEG),
        ("translation direction", "dir", TARGET_ODO_DIR_DEG),
    ):
        value = float(f[f"odo_gateway_{key}_err_median_deg"])
        rows.append(
            [
                f"odometry median {what} error, deg",
                value,
                f"< {target}",
                "PASS" if value < target else "MISS",
            ]
        )
    print_table(["figure", "value", "target", "verdict"], rows, title="Targets")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_FRAMES,
        help=f"face frames per side for throughput (default {DEFAULT_FRAMES})",
    )
    parser.add_argument(
        "--sequential",
        type=int,
        default=DEFAULT_SEQUENTIAL,
        help=f"single-frame calls per side (default {DEFAULT_SEQUENTIAL})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gateway worker processes = in-process threads (default: one per "
        "core, as the gateway's own default)",
    )
    parser.add_argument(
        "--inflight", type=int, help="face frames in flight for throughput (default 2 x workers)"
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=DEFAULT_STREAM_S,
        help=f"how long the camera publishes (default {DEFAULT_STREAM_S:g})",
    )
    parser.add_argument(
        "--odometry-frames",
        type=int,
        default=DEFAULT_ODO_FRAMES,
        help=f"rendered frames for odometry (default {DEFAULT_ODO_FRAMES})",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    inflight = args.inflight or 2 * args.workers
    quota = LimitsPolicy().max_inflight_per_client
    if not 1 <= inflight <= quota:
        parser.error(f"--inflight must be 1..{quota} (the gateway's per-device quota)")
    if args.workers < 1 or args.frames < 1 or args.sequential < 1:
        parser.error("--workers, --frames and --sequential must be at least 1")
    if args.stream_seconds <= 0 or args.odometry_frames < 2:
        parser.error("--stream-seconds must be positive and --odometry-frames at least 2")
    setup_logging(args.verbose)
    opts = Options(
        workers=args.workers,
        inflight=inflight,
        frames=args.frames,
        sequential=args.sequential,
        stream_s=args.stream_seconds,
        odo_frames=args.odometry_frames,
    )
    return run_and_report(lambda tmp: run(opts, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
