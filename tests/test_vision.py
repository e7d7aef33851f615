"""Vision through the gateway: real Mosquitto, real gateway daemon, OpenCV and onnxruntime in
its workers. The algorithms' own accuracy is tested in test_vision_*.py; here: the capabilities
behind the protocol, streams, sessions, pipelines and bad input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

import hearth
from hearth import Dropped, ErrorCode, JobError
from hearth.protocol.vision import Image, Postprocess, Preprocess
from testkit.gateway import GatewayProcess
from testkit.scenes import render_sequence
from testkit.wait import wait_until


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    assert ok
    return buf.tobytes()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card),
    with a tiny, valid IDAT that would inflate to far less."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def test_faces_in_a_real_photograph_and_none_in_a_scene_without_people(
    gateway: GatewayProcess,
) -> None:
    with gateway.client() as client:
        astronaut = client.faces(_jpeg(skdata.astronaut()))
        coffee = client.faces(_jpeg(skdata.coffee()))
    assert astronaut.where == "edge"
    assert astronaut.gateway_id == gateway.gateway_id
    faces = astronaut.result.faces
    assert len(faces) == 1, faces
    face = faces[0]
    # Eileen Collins' face in skimage's astronaut image is around x 170-250, y 60-160.
    centre = (face.x + face.w / 2, face.y + face.h / 2)
    assert 170 < centre[0] < 250
    assert 60 < centre[1] < 160
    assert coffee.result.faces == []


def test_capabilities_are_listed_with_versions_in_status_and_mdns(make_gateway) -> None:
    gw = make_gateway("--mdns-interface", "127.0.0.1")
    capabilities = gw.snapshot().capabilities
    assert set(capabilities) == {
        "vision.faces",
        "vision.motion",
        "vision.features",
        "vision.plate",
        "vision.odometry",
    }
    assert capabilities["vision.faces"].startswith("1 (haar")
    found = [
        g for g in hearth.discover(3.0, interface="127.0.0.1") if g.gateway_id == gw.gateway_id
    ]
    assert found
    assert found[0].capabilities["vision.plate"] == "1"


def test_features_and_raw_frames(gateway: GatewayProcess) -> None:
    gray = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)
    with gateway.client() as client:
        call = client.features(gray, max_features=200)  # a numpy array travels raw
    result = call.result
    assert (result.width, result.height) == (512, 512)
    assert 50 < len(result.keypoints) <= 200
    assert len(result.descriptors) == 32 * len(result.keypoints)


def test_digits_pipeline_reads_held_out_digits_sent_as_images(
    gateway: GatewayProcess, examples: Path
) -> None:
    model = examples / "models" / "digits.onnx"
    x = np.load(examples / "models" / "digits_test_X.npy")
    y = np.load(examples / "models" / "digits_test_y.npy")
    # The model reads 8x8 digits of 0..16; the camera sends 32x32 grey PNGs of them.
    pre = Preprocess(width=8, height=8, color="gray", scale=16 / 255, layout="flat")
    post = Postprocess(kind="topk", output="probabilities", k=3)
    n = 200
    correct = 0
    with gateway.client() as client:
        for digit, truth in zip(x[:n], y[:n], strict=True):
            pixels = np.round(digit.reshape(8, 8) * 255 / 16).astype(np.uint8)
            big = cv2.resize(pixels, (32, 32), interpolation=cv2.INTER_NEAREST)
            ok, png = cv2.imencode(".png", big)
            assert ok
            run = client.pipeline(model, png.tobytes(), pre, post)
            assert len(run.result.top) == 3
            correct += int(run.result.top[0].index == int(truth))
    accuracy = correct / n
    print(f"digits through the gateway as images: {accuracy:.1%} of {n}")
    assert accuracy >= 0.95


def test_stream_frames_past_capacity_are_dropped_and_reported(make_gateway) -> None:
    gw = make_gateway("--workers", "1")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(4)]
    jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
    with gw.client() as client:
        stream = client.stream("porch", "vision.faces")
        futures = [stream.send(jpegs[i % 4]) for i in range(40)]  # as fast as we can publish
        outcomes = [f.result(30) for f in futures]
    dropped = [o for o in outcomes if isinstance(o, Dropped)]
    processed = [o for o in outcomes if not isinstance(o, Dropped)]
    assert dropped, "a camera publishing this fast should outrun one worker"
    assert processed
    assert not isinstance(outcomes[-1], Dropped)  # latest frame wins: the newest always runs
    assert processed[-1].dropped == len(dropped)  # each result carries the stream's count
    assert wait_until(lambda: gw.snapshot().frames_dropped == len(dropped), 5)


def test_odometry_session_through_the_gateway(gateway: GatewayProcess) -> None:
    seq = render_sequence(8, width=320, height=240, seed=3)
    fx, fy, cx, cy = seq.K[0, 0], seq.K[1, 1], seq.K[0, 2], seq.K[1, 2]
    with gateway.client() as client:
        session = client.odometry("hall", fx=fx, fy=fy, cx=cx, cy=cy)
        poses = [session.track(frame).result for frame in seq.frames]
        assert [p.frame for p in poses] == list(range(1, 9))
        assert all(p.ok for p in poses[1:])
        assert session.close() == 8
        with pytest.raises(JobError) as closed:
            session.track(seq.frames[0])
        assert closed.value.code is ErrorCode.NO_SESSION
        assert client.close_session("hall") == 0  # closing twice is harmless


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (Image(format="jpeg", data=b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50), ErrorCode.BAD_IMAGE),
        (Image(format="jpeg", data=b""), ErrorCode.BAD_IMAGE),
        (Image(format="png", data=_png_header(30000, 30000)), ErrorCode.TOO_LARGE),
        (Image(format="raw", data=b"\0" * 10, width=4, height=4, channels=3), ErrorCode.BAD_IMAGE),
    ],
    ids=["corrupt-jpeg", "empty", "png-30000x30000", "raw-short"],
)
def test_bad_images_get_clear_errors_and_the_gateway_stays_up(
    gateway: GatewayProcess, image: Image, code: ErrorCode
) -> None:
    with gateway.client() as client:
        with pytest.raises(JobError) as failed:
            client.faces(image)
        assert failed.value.code is code
        assert failed.value.where == "edge"
        assert client.faces(_jpeg(skdata.astronaut())).result.faces  # the next good one works
    assert gateway.proc is not None
    assert gateway.proc.poll() is None


def test_bad_calls_get_clear_errors(gateway: GatewayProcess, examples: Path) -> None:
    good = _jpeg(skdata.coffee())
    with gateway.client() as client:
        with pytest.raises(JobError) as unknown:
            client.call("vision.telepathy", good)
        assert unknown.value.code is ErrorCode.UNKNOWN_CAPABILITY
        with pytest.raises(JobError) as params:
            client.faces(good, min_size="big")
        assert params.value.code is ErrorCode.BAD_PARAMS
        with pytest.raises(JobError) as no_stream:
            client.call("vision.motion", good)
        assert no_stream.value.code is ErrorCode.BAD_PARAMS
        # The digits model wants 64 features: a 10x10 input is the wrong shape.
        model = examples / "models" / "digits.onnx"
        with pytest.raises(JobError) as shape:
            client.pipeline(
                model, good, Preprocess(width=10, height=10, color="gray", layout="flat")
            )
        assert shape.value.code is ErrorCode.BAD_TENSOR
        with pytest.raises(JobError) as dtype:
            client.pipeline(
                model,
                good,
                Preprocess(width=8, height=8, color="gray", layout="flat", dtype="uint8"),
            )
        assert dtype.value.code is ErrorCode.BAD_TENSOR
        assert client.faces(good).result.faces == []
