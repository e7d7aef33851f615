"""Protocol v1, vision: images on the wire, capability calls, and the typed result of each
capability (docs/vision.md lists the same, with examples).

A ``call`` carries a capability name, an image and a flat map of parameters; the gateway answers
with ``call_result`` whose ``result`` map has the shape of the capability's result struct below.
Both sides convert with ``msgspec.convert``: the gateway validates parameters at the boundary
(``bad_params``), the SDK turns results back into these structs.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = [
    "CAPABILITIES",
    "Box",
    "Classification",
    "FacesResult",
    "FeaturesResult",
    "Image",
    "ImageFormat",
    "Keypoint",
    "MotionResult",
    "PipelineResult",
    "PlateResult",
    "PlateText",
    "PoseResult",
    "Postprocess",
    "Preprocess",
]

ImageFormat = Literal["jpeg", "png", "raw"]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class Image(msgspec.Struct, frozen=True, kw_only=True):
    """A picture. ``jpeg`` and ``png`` carry the file's bytes (size read from the header);
    ``raw`` is 8-bit pixels, row-major, ``channels`` of 1 (grey) or 3 (BGR, OpenCV's order),
    and needs ``width``, ``height`` and ``channels``."""

    format: ImageFormat
    data: bytes
    width: int = 0
    height: int = 0
    channels: int = 0


class Box(msgspec.Struct, frozen=True, kw_only=True):
    """An axis-aligned box in pixels of the image as sent (x, y: top-left corner)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    label: str = ""


class FacesResult(msgspec.Struct, frozen=True, kw_only=True):
    width: int
    height: int
    faces: list[Box]


class MotionResult(msgspec.Struct, frozen=True, kw_only=True):
    """Moving regions against the stream's background model. The first frames of a stream only
    teach the model (``learning`` is true until ``warmup`` frames were seen)."""

    width: int
    height: int
    regions: list[Box]
    moving_fraction: float  # of the image's pixels
    frames_seen: int
    learning: bool


class Keypoint(msgspec.Struct, frozen=True, kw_only=True):
    x: float
    y: float
    size: float
    angle: float
    response: float
    octave: int


class FeaturesResult(msgspec.Struct, frozen=True, kw_only=True):
    """ORB keypoints; ``descriptors`` is len(keypoints) rows of 32 bytes, row-major."""

    width: int
    height: int
    keypoints: list[Keypoint]
    descriptors: bytes


class PlateText(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    score: float
    # The text line's corners (x, y) clockwise from top-left, in image pixels.
    quad: list[tuple[float, float]]


class PlateResult(msgspec.Struct, frozen=True, kw_only=True):
    """``text`` is the best plate-like reading (letters and digits only, upper case), empty if
    none; ``lines`` every text line read, best first."""

    width: int
    height: int
    text: str
    score: float
    lines: list[PlateText]


class PoseResult(msgspec.Struct, frozen=True, kw_only=True):
    """The camera's pose after this frame, in the frame of the session's first frame.

    ``rotation`` is a row-major 3x3 matrix and ``translation`` a 3-vector for the camera-to-world
    transform. Monocular odometry has no scale: each step is unit length per frame pair with
    measurable parallax, zero when the camera stood still or only turned, and steps are
    chained. ``rel_rotation``/``rel_translation`` are the motion from the previous frame
    (x_curr = R x_prev + t, OpenCV's recoverPose convention).
    ``ok`` is false when too few features were tracked to estimate motion (the pose is then
    carried over)."""

    session: str
    frame: int  # frames seen in this session, this one included
    ok: bool
    inliers: int
    keyframe: bool
    rotation: list[float]
    translation: list[float]
    rel_rotation: list[float]
    rel_translation: list[float]


CAPABILITIES: dict[str, type[msgspec.Struct]] = {
    "vision.faces": FacesResult,
    "vision.motion": MotionResult,
    "vision.features": FeaturesResult,
    "vision.plate": PlateResult,
    "vision.odometry": PoseResult,
}


# --- ONNX image pipelines --------------------------------------------------------------------


class Preprocess(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an image becomes the model's input tensor, in this order: colour conversion, resize
    to ``width`` x ``height``, ``value = (pixel * scale - mean[c]) / std[c]`` per channel, then
    ``layout`` (``nchw``/``nhwc`` add a batch axis of 1; ``chw``/``hwc`` do not) and ``dtype``."""

    width: Positive
    height: Positive
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear", "nearest"] = "area"
    scale: float = 1.0 / 255.0
    mean: list[float] = msgspec.field(default_factory=lambda: [0.0])
    std: list[float] = msgspec.field(default_factory=lambda: [1.0])
    layout: Literal["nchw", "nhwc", "chw", "hwc", "flat"] = "nchw"
    dtype: Literal["float32", "float16", "uint8"] = "float32"


class Postprocess(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to make of the output: ``topk`` reads a score vector (softmax applied when
    ``softmax``); ``boxes`` reads rows of [x1, y1, x2, y2, score, class] (or [cx, cy, w, h, score,
    class...] with ``box_format = "cxcywh"``) in input pixels, keeps those over
    ``score_threshold`` and applies non-maximum suppression at ``iou_threshold``; boxes are
    mapped back to the original image. ``none`` returns the raw tensors."""

    kind: Literal["topk", "boxes", "none"] = "topk"
    output: str = ""  # the output tensor to read; empty: the model's first
    k: Positive = 5
    softmax: bool = False
    labels: list[str] = []
    score_threshold: float = 0.5
    iou_threshold: float = 0.45
    box_format: Literal["xyxy", "cxcywh"] = "xyxy"
    max_boxes: Positive = 100


class Classification(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    label: str
    score: float


class PipelineResult(msgspec.Struct, frozen=True, kw_only=True):
    top: list[Classification] = []
    boxes: list[Box] = []
