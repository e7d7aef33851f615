"""Vision algorithms against real OpenCV: image decoding and its limits, faces, motion, ORB
features, and the ONNX pipelines' pre- and postprocessing (pure numpy). Only images bundled
with scikit-image are used (nothing is downloaded).
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
import pytest
import skimage.data

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import Box, Image, MotionResult, Postprocess, Preprocess
from hearth_gateway.vision import features
from hearth_gateway.vision.faces import VERSION, FaceDetector, FacesParams
from hearth_gateway.vision.features import DESCRIPTOR_BYTES, FeaturesParams, orb_features
from hearth_gateway.vision.images import decode, encode_jpeg, probe
from hearth_gateway.vision.motion import MotionModel, MotionParams, MotionStreams
from hearth_gateway.vision.pipeline import Transform, nms, postprocess, preprocess

# The astronaut's face (Eileen Collins) in skimage.data.astronaut(), x, y, w, h.
ASTRONAUT_FACE = (176, 65, 96, 96)


def bgr_of(name: str) -> np.ndarray[Any, Any]:
    rgb = getattr(skimage.data, name)()
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def as_jpeg(bgr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Through JPEG and back, as a camera's frame would arrive."""
    return decode(Image(format="jpeg", data=encode_jpeg(bgr)), max_megapixels=10)


def png(bgr: np.ndarray[Any, Any]) -> bytes:
    ok, buffer = cv2.imencode(".png", bgr)
    assert ok
    return buffer.tobytes()


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def xywh(box: Box) -> tuple[int, int, int, int]:
    return (box.x, box.y, box.w, box.h)


def raises_code(code: ErrorCode, call: Callable[[], object]) -> JobError:
    with pytest.raises(JobError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


SMALL = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)


# --- images ----------------------------------------------------------------------------------


def test_probe_reads_the_size_from_each_format() -> None:
    assert probe(Image(format="jpeg", data=encode_jpeg(SMALL))) == (64, 48)
    assert probe(Image(format="png", data=png(SMALL))) == (64, 48)
    raw = Image(format="raw", data=SMALL.tobytes(), width=64, height=48, channels=3)
    assert probe(raw) == (64, 48)


def test_decode_gives_bgr_of_the_header_size() -> None:
    from_png = decode(Image(format="png", data=png(SMALL)), max_megapixels=1)
    assert from_png.dtype == np.uint8
    assert np.array_equal(from_png, SMALL)
    assert decode(Image(format="jpeg", data=encode_jpeg(SMALL)), max_megapixels=1).shape == (
        48,
        64,
        3,
    )
    raw = Image(format="raw", data=SMALL.tobytes(), width=64, height=48, channels=3)
    assert np.array_equal(decode(raw, max_megapixels=1), SMALL)


def test_grey_raw_becomes_bgr() -> None:
    grey = SMALL[:, :, 0].copy()
    image = Image(format="raw", data=grey.tobytes(), width=64, height=48, channels=1)
    pixels = decode(image, max_megapixels=1)
    assert pixels.shape == (48, 64, 3)
    assert all(np.array_equal(pixels[:, :, c], grey) for c in range(3))


def _png_header(width: int, height: int) -> bytes:
    fields = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + fields
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode_jpeg(SMALL))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    "image",
    [
        Image(format="png", data=_png_header(30000, 30000)),
        Image(format="jpeg", data=_jpeg_claiming(30000, 30000)),
        Image(format="raw", data=b"\x00" * 3_000_000, width=1000, height=1000, channels=3),
    ],
    ids=["png", "jpeg", "raw"],
)
def test_images_over_the_pixel_budget_are_refused_before_decoding(
    image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_decode(*args: object) -> None:
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    started = time.perf_counter()
    error = raises_code(ErrorCode.TOO_LARGE, lambda: decode(image, max_megapixels=0.5))
    assert time.perf_counter() - started < 0.5  # a header read, not a decode
    assert "megapixels" in error.message


def test_workers_start_with_the_opencv_pixel_limit_in_their_environment() -> None:
    from hearth.runtime.limits import WasmLimits
    from hearth_gateway.loop import Loop
    from hearth_gateway.runners import WorkerSettings
    from hearth_gateway.workers import WorkerPool

    settings = WorkerSettings(
        runners=["vision"], cache_dir="/nonexistent", wasm_limits=WasmLimits(), max_megapixels=2.0
    )
    loop = Loop()
    try:
        pool = WorkerPool(loop, settings, 1, lambda *_: None, wasm_timeout_s=1, onnx_timeout_s=1)
        assert pool.worker_env["OPENCV_IO_MAX_IMAGE_PIXELS"] == "2000000"
    finally:
        loop.close()


def _bad_crc_png() -> bytes:
    data = bytearray(png(SMALL))
    data[20] ^= 0xFF  # a byte of the width, under the IHDR checksum
    return bytes(data)


JPEG = encode_jpeg(SMALL)
PNG = png(SMALL)


@pytest.mark.parametrize(
    "image",
    [
        Image(format="jpeg", data=b""),
        Image(format="jpeg", data=b"not a jpeg at all"),
        Image(format="jpeg", data=JPEG[:30]),
        Image(format="jpeg", data=JPEG[: len(JPEG) // 2]),  # header intact, scan cut short
        Image(format="jpeg", data=b"\xff\xd8\xff\xda\x00\x02"),  # scan before any frame header
        Image(format="png", data=PNG[:20]),
        Image(format="png", data=PNG[: len(PNG) // 2]),
        Image(format="png", data=_bad_crc_png()),
        Image(format="png", data=JPEG),
        Image(format="raw", data=b"\x00" * 10, width=4, height=4, channels=3),
        Image(format="raw", data=b"\x00" * 64, width=4, height=4, channels=4),
        Image(format="raw", data=b"\x00" * 48, width=0, height=16, channels=3),
        Image(format="gif", data=b"GIF89a"),  # not a format the protocol allows
    ],
)
def test_corrupt_images_are_bad_image(image: Image) -> None:
    raises_code(ErrorCode.BAD_IMAGE, lambda: decode(image, max_megapixels=10))


# --- faces -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def test_finds_the_astronauts_face(detector: FaceDetector) -> None:
    faces = detector.detect(as_jpeg(bgr_of("astronaut")), FacesParams())
    assert len(faces) == 1
    assert faces[0].label == "face"
    assert iou(xywh(faces[0]), ASTRONAUT_FACE) > 0.6


# Photographs without people, all bundled with scikit-image: a cup of coffee, a rocket on its
# launch pad, a cat (a face, but not a human one).
@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_no_faces_where_there_are_none(detector: FaceDetector, name: str) -> None:
    assert detector.detect(as_jpeg(bgr_of(name)), FacesParams()) == []


def test_at_most_max_faces_surest_first(detector: FaceDetector) -> None:
    face = bgr_of("astronaut")[40:200, 150:300]
    crowd = np.hstack([face, face[:, ::-1], face])
    faces = detector.detect(crowd, FacesParams())
    assert len(faces) == 3
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    assert len(detector.detect(crowd, FacesParams(max_faces=2))) == 2


def test_faces_params_are_validated() -> None:
    assert msgspec.convert({}, FacesParams) == FacesParams()
    for bad in ({"scale_factor": 1.0}, {"min_neighbors": -1}, {"max_faces": 0}, {"x": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, FacesParams)


def test_the_version_names_opencv_and_a_missing_cascade_is_clear(tmp_path: Path) -> None:
    assert cv2.__version__ in VERSION
    with pytest.raises(FileNotFoundError, match="cascade"):
        FaceDetector(tmp_path / "nothing.xml")


# --- motion ----------------------------------------------------------------------------------

H, W = 120, 160
SQUARE = 24


def background(seed: int) -> np.ndarray[Any, Any]:
    noise = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return np.asarray(cv2.GaussianBlur(noise, (5, 5), 0))


def frame(base: np.ndarray[Any, Any], step: int, x: int | None = None) -> np.ndarray[Any, Any]:
    """The background with sensor noise, and a bright square at x when given."""
    sensor = np.random.default_rng(1000 + step).normal(0, 2, base.shape)
    out = np.clip(base + sensor, 0, 255).astype(np.uint8)
    if x is not None:
        out[50 : 50 + SQUARE, x : x + SQUARE] = (40, 220, 250)
    return out


def test_a_moving_square_is_found_and_a_still_scene_is_quiet() -> None:
    model, params, base = MotionModel(), MotionParams(), background(0)
    for step in range(params.warmup):
        result = model.update(frame(base, step), params)
        assert result.learning
        assert result.regions == []
    for step in range(params.warmup, 20):
        quiet = model.update(frame(base, step), params)
        assert not quiet.learning
        assert quiet.regions == []
        assert quiet.moving_fraction < 0.01
    for step, x in enumerate(range(20, 120, 8), start=20):
        moving = model.update(frame(base, step, x), params)
        assert moving.regions, step
        assert iou(xywh(moving.regions[0]), (x, 50, SQUARE, SQUARE)) > 0.5
        assert moving.regions[0].label == "motion"
    assert moving.frames_seen == 33
    assert 0.02 < moving.moving_fraction < 0.1


def test_regions_smaller_than_min_area_are_left_out() -> None:
    model, base = MotionModel(), background(0)
    params = MotionParams(min_area=SQUARE * SQUARE + 1)
    for step in range(10):
        model.update(frame(base, step), params)
    assert model.update(frame(base, 10, 60), params).regions == []


def test_a_frame_of_another_size_starts_afresh() -> None:
    model, base = MotionModel(), background(0)
    for step in range(8):
        model.update(frame(base, step), MotionParams())
    result = model.update(np.ascontiguousarray(base[:60, :80]), MotionParams())
    assert (result.frames_seen, result.learning, result.width, result.height) == (1, True, 80, 60)


def test_streams_have_their_own_models() -> None:
    streams, params = MotionStreams(max_streams=4), MotionParams()
    kitchen, porch = background(1), background(2)
    for step in range(10):
        streams.update("kitchen", frame(kitchen, step), params)
        streams.update("porch", frame(porch, step), params)
    assert streams.update("kitchen", frame(kitchen, 10), params).regions == []
    assert streams.update("porch", frame(porch, 10), params).regions == []
    # The kitchen's picture is all new to the porch's model, and not to the kitchen's.
    swapped: MotionResult = streams.update("porch", frame(kitchen, 11), params)
    assert swapped.moving_fraction > 0.5
    assert streams.update("kitchen", frame(kitchen, 11), params).regions == []
    assert len(streams) == 2


def test_streams_are_bounded_and_forget_idle_ones() -> None:
    now = [0.0]
    streams = MotionStreams(max_streams=2, idle_s=10.0, clock=lambda: now[0])
    tiny, params = np.zeros((8, 8, 3), np.uint8), MotionParams()
    streams.update("a", tiny, params)
    streams.update("b", tiny, params)
    streams.update("a", tiny, params)
    streams.update("c", tiny, params)  # over max_streams: b is the least recently used
    assert ("a" in streams, "b" in streams, "c" in streams) == (True, False, True)
    now[0] = 5.0
    streams.update("c", tiny, params)
    now[0] = 12.0
    streams.update("d", tiny, params)  # a was last fed at 0, more than idle_s ago
    assert ("a" in streams, "c" in streams, "d" in streams) == (False, True, True)
    assert streams.close("c")
    assert not streams.close("c")
    assert len(streams) == 1


def test_motion_params_are_validated() -> None:
    for bad in ({"threshold": 0}, {"history": 0}, {"learning_rate": 2.0}, {"warmup": -1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, MotionParams)


# --- features --------------------------------------------------------------------------------


def test_orb_finds_keypoints_with_32_byte_descriptors() -> None:
    image = bgr_of("astronaut")
    result = orb_features(image, FeaturesParams())
    assert (result.width, result.height) == (512, 512)
    assert 300 <= len(result.keypoints) <= 500
    assert len(result.descriptors) == len(result.keypoints) * DESCRIPTOR_BYTES
    assert all(0 <= k.x < 512 and 0 <= k.y < 512 for k in result.keypoints)
    responses = [k.response for k in result.keypoints]
    assert responses == sorted(responses, reverse=True)


def test_max_features_is_respected_and_orb_objects_are_reused() -> None:
    params = FeaturesParams(max_features=10)
    result = orb_features(bgr_of("astronaut"), params)
    assert len(result.keypoints) == 10
    assert len(result.descriptors) == 10 * DESCRIPTOR_BYTES
    assert features._orb(params) is features._orb(FeaturesParams(max_features=10))


@pytest.mark.parametrize("shape", [(200, 200, 3), (1, 1, 3), (40, 300, 3)])
def test_nothing_to_find_is_empty(shape: tuple[int, int, int]) -> None:
    flat = np.full(shape, 128, np.uint8)
    result = orb_features(flat, FeaturesParams())
    assert (result.keypoints, result.descriptors) == ([], b"")
    assert (result.width, result.height) == (shape[1], shape[0])


def test_features_params_are_validated() -> None:
    for bad in ({"max_features": 0}, {"max_features": 5001}, {"scale_factor": 1.0}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, FeaturesParams)


# --- pipeline: preprocessing -----------------------------------------------------------------


def unscaled(**fields: Any) -> Preprocess:
    """Pixels as they are: no scaling, nearest-neighbour resizing."""
    return Preprocess(scale=1.0, interpolation="nearest", **fields)


def test_layouts_and_colour_order() -> None:
    bgr = SMALL[:4, :6]
    rgb = bgr[:, :, ::-1].astype(np.float32)
    expected = {
        "hwc": rgb,
        "nhwc": rgb[None],
        "chw": rgb.transpose(2, 0, 1),
        "nchw": rgb.transpose(2, 0, 1)[None],
        "flat": rgb.reshape(1, 72),
    }
    for layout, want in expected.items():
        pre = unscaled(width=6, height=4, layout=layout)
        tensor, transform = preprocess(bgr, pre)
        assert tensor.dtype == np.float32
        assert tensor.flags.c_contiguous
        assert np.array_equal(tensor, want), layout
    assert transform == Transform(6, 4, 1.0, 1.0)
    as_bgr, _ = preprocess(bgr, unscaled(width=6, height=4, color="bgr", layout="hwc"))
    assert np.array_equal(as_bgr, bgr.astype(np.float32))


def test_grey_flat_input_like_scikit_learn_digits() -> None:
    pre = Preprocess(width=8, height=8, color="gray", scale=16 / 255, layout="flat")
    tensor, _ = preprocess(bgr_of("astronaut"), pre)
    assert tensor.shape == (1, 64)
    assert tensor.min() >= 0.0
    assert tensor.max() <= 16.0
    grey, _ = preprocess(SMALL, unscaled(width=64, height=48, color="gray"))
    assert grey.shape == (1, 1, 48, 64)
    assert np.array_equal(grey[0, 0], cv2.cvtColor(SMALL, cv2.COLOR_BGR2GRAY))


def test_normalisation_per_channel_and_dtypes() -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pre = Preprocess(width=64, height=48, mean=mean, std=std, layout="hwc")
    tensor, _ = preprocess(SMALL, pre)
    rgb = SMALL[:, :, ::-1].astype(np.float32) / 255
    want = (rgb - np.float32(mean)) / np.float32(std)
    assert np.allclose(tensor, want, atol=1e-5)
    half, _ = preprocess(SMALL, msgspec.structs.replace(pre, dtype="float16"))
    assert half.dtype == np.float16
    pixels, _ = preprocess(SMALL, unscaled(width=64, height=48, dtype="uint8"))
    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels[0].transpose(1, 2, 0), SMALL[:, :, ::-1])


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess(width=8, height=8, mean=[0.1, 0.2]),
        Preprocess(width=8, height=8, color="gray", std=[1.0, 1.0, 1.0]),
        Preprocess(width=8, height=8, std=[0.0]),
        Preprocess(width=100_000, height=100_000),
    ],
)
def test_bad_preprocessing_is_bad_params(pre: Preprocess) -> None:
    raises_code(ErrorCode.BAD_PARAMS, lambda: preprocess(SMALL, pre))


def test_letterbox_keeps_the_aspect_and_maps_back() -> None:
    wide = np.full((100, 200, 3), 255, np.uint8)
    pre = unscaled(width=64, height=64, resize="letterbox", layout="hwc")
    tensor, transform = preprocess(wide, pre)
    assert transform == Transform(200, 100, 0.32, 0.32, 0, 16)
    assert np.all(tensor[:16] == 114)
    assert np.all(tensor[48:] == 114)
    assert np.all(tensor[16:48] == 255)
    inner = np.array([[0.0, 16.0, 64.0, 48.0], [32.0, 32.0, 48.0, 40.0], [-5.0, 0.0, 70.0, 70.0]])
    mapped = transform.to_image(inner)
    assert np.allclose(mapped, [[0, 0, 200, 100], [100, 50, 150, 75], [0, 0, 200, 100]])


def test_stretch_maps_each_axis_on_its_own() -> None:
    _, transform = preprocess(np.zeros((100, 200, 3), np.uint8), Preprocess(width=64, height=64))
    assert transform == Transform(200, 100, 0.32, 0.64)
    assert np.allclose(
        transform.to_image(np.array([[32.0, 32.0, 64.0, 64.0]])), [[100, 50, 200, 100]]
    )


# --- pipeline: postprocessing ----------------------------------------------------------------

IDENTITY = Transform(640, 480, 1.0, 1.0)


def test_topk_orders_scores_and_names_them() -> None:
    outputs = {"scores": np.array([[0.1, 0.7, 0.2]], np.float32)}
    post = Postprocess(kind="topk", k=2, labels=["cat", "dog"])
    top = postprocess(outputs, ["scores"], post, IDENTITY).top
    assert [(c.index, c.label) for c in top] == [(1, "dog"), (2, "2")]
    assert top[0].score == pytest.approx(0.7)
    assert len(postprocess(outputs, ["scores"], Postprocess(k=10), IDENTITY).top) == 3


def test_topk_softmax() -> None:
    logits = {"logits": np.array([1.0, 3.0, 2.0], np.float32)}
    top = postprocess(logits, ["logits"], Postprocess(softmax=True), IDENTITY).top
    assert [c.index for c in top] == [1, 2, 0]
    assert sum(c.score for c in top) == pytest.approx(1.0)
    assert top[0].score == pytest.approx(np.exp(3) / (np.exp(1) + np.exp(2) + np.exp(3)))


def test_scikit_learn_outputs_need_the_scores_named() -> None:
    outputs = {"label": np.array([3], np.int64), "probabilities": np.eye(10, dtype=np.float32)[3:4]}
    order = ["label", "probabilities"]
    error = raises_code(
        ErrorCode.BAD_TENSOR, lambda: postprocess(outputs, order, Postprocess(), IDENTITY)
    )
    assert "probabilities" in error.message
    top = postprocess(outputs, order, Postprocess(output="probabilities", k=1), IDENTITY).top
    assert (top[0].index, top[0].score) == (3, 1.0)


@pytest.mark.parametrize(
    ("outputs", "post", "code"),
    [
        ({"out": np.zeros((2, 3), np.float32)}, Postprocess(), ErrorCode.BAD_TENSOR),
        ({"out": np.zeros((0,), np.float32)}, Postprocess(), ErrorCode.BAD_TENSOR),
        ({"out": np.array([np.nan, 1.0])}, Postprocess(), ErrorCode.BAD_TENSOR),
        ({"out": [{"0": 0.5, "1": 0.5}]}, Postprocess(), ErrorCode.BAD_TENSOR),  # a ZipMap
        ({"out": np.zeros((3,), np.float32)}, Postprocess(output="nope"), ErrorCode.BAD_PARAMS),
        ({"out": np.zeros((1, 5, 4), np.float32)}, Postprocess(kind="boxes"), ErrorCode.BAD_TENSOR),
        ({"out": np.zeros((2, 5, 6), np.float32)}, Postprocess(kind="boxes"), ErrorCode.BAD_TENSOR),
    ],
)
def test_outputs_of_the_wrong_shape(
    outputs: dict[str, Any], post: Postprocess, code: ErrorCode
) -> None:
    raises_code(code, lambda: postprocess(outputs, ["out"], post, IDENTITY))


def test_nothing_to_postprocess() -> None:
    result = postprocess({"out": np.zeros(3)}, ["out"], Postprocess(kind="none"), IDENTITY)
    assert (result.top, result.boxes) == ([], [])


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    xyxy = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    scores = np.array([0.8, 0.9, 0.7, 0.1])
    assert nms(xyxy, scores, 0.5, 100) == [1, 2]
    # IoU of boxes 1 and 0 is 0.68; box 3 is box 0 again (IoU 1).
    assert nms(xyxy, scores, 0.99, 100) == [1, 0, 2]
    assert nms(xyxy, scores, 1.0, 100) == [1, 0, 2, 3]
    assert nms(xyxy, scores, 0.5, 1) == [1]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, 10) == []


def test_boxes_per_class_thresholded_and_mapped_back() -> None:
    rows = np.array(
        [
            [10, 10, 50, 50, 0.9, 0],
            [12, 12, 52, 52, 0.8, 0],  # overlaps the first, same class: suppressed
            [12, 12, 52, 52, 0.7, 1],  # same place, another class: kept
            [100, 100, 120, 120, 0.3, 0],  # under the score threshold
            [0, 0, 64, 8, 0.95, 0],  # wholly in the letterbox padding
        ],
        np.float32,
    )[None]
    letterbox = Transform(200, 100, 0.32, 0.32, 0, 16)
    post = Postprocess(kind="boxes", labels=["person", "dog"])
    boxes = postprocess({"det": rows}, ["det"], post, letterbox).boxes
    assert [(b.label, round(b.score, 2)) for b in boxes] == [("person", 0.9), ("dog", 0.7)]
    assert xywh(boxes[0]) == (31, 0, 125, 100)  # y clipped to the image
    assert (
        len(
            postprocess(
                {"det": rows}, ["det"], msgspec.structs.replace(post, max_boxes=1), letterbox
            ).boxes
        )
        == 1
    )


def test_cxcywh_and_yolo_style_class_scores() -> None:
    # cx, cy, w, h, objectness, then one score per class.
    rows = np.array([[100, 100, 40, 20, 0.9, 0.1, 0.8], [300, 300, 10, 10, 0.9, 0.2, 0.1]])
    post = Postprocess(kind="boxes", box_format="cxcywh", labels=["cat", "dog"])
    boxes = postprocess({"out": rows}, ["out"], post, IDENTITY).boxes
    assert len(boxes) == 1
    assert (xywh(boxes[0]), boxes[0].label) == ((80, 90, 40, 20), "dog")
    assert boxes[0].score == pytest.approx(0.72)
    single = np.array([[100, 100, 40, 20, 0.9]])
    assert postprocess({"out": single}, ["out"], post, IDENTITY).boxes[0].label == "cat"
