"""ONNX image pipelines, the parts around the model: ``preprocess`` turns a decoded image into
the model's input tensor as a ``Preprocess`` describes, ``postprocess`` turns the model's outputs
into class scores or boxes as a ``Postprocess`` describes (both in hearth.protocol.vision).

Preprocessing, in order: colour (``rgb``, ``bgr`` or ``gray``), resize (``stretch`` to the
input size, or ``letterbox``: keep the aspect ratio, centre, and pad with grey 114 as YOLO-style
detectors are trained), ``value = (pixel * scale - mean[c]) / std[c]``, layout, dtype. The
returned ``Transform`` maps input-pixel coordinates back to the original image.

Postprocessing reads one output (``post.output``, else the model's first):

- ``topk``: a score vector (any shape with at most one axis longer than 1), optionally
  softmaxed; the ``k`` best, labelled from ``labels`` by index (else the index as text).
- ``boxes``: rows, optionally under a batch axis of 1, of 5 or more numbers: the box (``xyxy``
  or ``cxcywh``, input pixels), then either ``score`` (class 0), ``score, class`` or
  ``objectness, class scores...`` (YOLOv5-style: score = objectness x best class score). Rows
  over ``score_threshold`` are mapped to the image, clipped, and thinned by non-maximum
  suppression per class; the ``max_boxes`` best remain.
- ``none``: nothing here; the caller returns the raw tensors.

Limits: one image per call (batch 1); transposed detector heads (YOLOv8's 84 x 8400) and
scikit-learn's ZipMap outputs (a list of dicts; export with ``zipmap=False``) are refused with
``bad_tensor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import Box, Classification, PipelineResult, Postprocess, Preprocess

__all__ = ["LETTERBOX_FILL", "MAX_INPUT_PIXELS", "Transform", "nms", "postprocess", "preprocess"]

LETTERBOX_FILL = 114
# The input size comes from the request: without a cap, 100000 x 100000 would be 120 GB.
MAX_INPUT_PIXELS = 4096 * 4096
Floats = npt.NDArray[np.float64]

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


@dataclass(frozen=True, slots=True)
class Transform:
    """From the model's input pixels back to the original image:
    ``x_image = (x_input - pad_x) / scale_x`` (and the same for y)."""

    width: int  # of the original image
    height: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_image(self, xyxy: Floats) -> Floats:
        """Boxes (N x 4, x1 y1 x2 y2 in input pixels) in image pixels, clipped to the image."""
        out = np.empty_like(xyxy, dtype=np.float64)
        out[:, 0::2] = np.clip((xyxy[:, 0::2] - self.pad_x) / self.scale_x, 0, self.width)
        out[:, 1::2] = np.clip((xyxy[:, 1::2] - self.pad_y) / self.scale_y, 0, self.height)
        return out


# --- preprocessing ---------------------------------------------------------------------------


def preprocess(
    bgr: npt.NDArray[np.uint8], pre: Preprocess, *, max_input_pixels: int = MAX_INPUT_PIXELS
) -> tuple[npt.NDArray[Any], Transform]:
    """The input tensor for a BGR image, and how to map input pixels back to the image."""
    if pre.width * pre.height > max_input_pixels:
        raise JobError(
            ErrorCode.BAD_PARAMS,
            f"input size {pre.width}x{pre.height} is over {max_input_pixels} pixels",
        )
    pixels = _colour(bgr, pre.color)
    resized, transform = _resize(pixels, pre)
    values = _normalise(resized, pre)
    return np.ascontiguousarray(_layout(values, pre.layout)), transform


def _colour(bgr: npt.NDArray[np.uint8], color: str) -> npt.NDArray[np.uint8]:
    if color == "rgb":
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    if color == "gray":
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
    return bgr


def _resize(pixels: npt.NDArray[np.uint8], pre: Preprocess) -> tuple[npt.NDArray[Any], Transform]:
    """Resized pixels, always H x W x C (cv2.resize drops a single channel's axis)."""
    height, width = pixels.shape[:2]
    interpolation = _INTERPOLATION[pre.interpolation]
    if pre.resize == "stretch":
        resized = cv2.resize(pixels, (pre.width, pre.height), interpolation=interpolation)
        transform = Transform(width, height, pre.width / width, pre.height / height)
    else:
        scale = min(pre.width / width, pre.height / height)
        inner_w = max(1, min(pre.width, round(width * scale)))
        inner_h = max(1, min(pre.height, round(height * scale)))
        pad_x, pad_y = (pre.width - inner_w) // 2, (pre.height - inner_h) // 2
        inner = cv2.resize(pixels, (inner_w, inner_h), interpolation=interpolation)
        resized = cv2.copyMakeBorder(
            inner,
            pad_y,
            pre.height - inner_h - pad_y,
            pad_x,
            pre.width - inner_w - pad_x,
            cv2.BORDER_CONSTANT,
            value=(LETTERBOX_FILL,) * 3,
        )
        # The scale actually applied on each axis, after rounding to whole pixels.
        transform = Transform(width, height, inner_w / width, inner_h / height, pad_x, pad_y)
    return np.asarray(resized).reshape(pre.height, pre.width, -1), transform


def _normalise(pixels: npt.NDArray[Any], pre: Preprocess) -> npt.NDArray[Any]:
    channels = pixels.shape[2]
    mean = _per_channel("mean", pre.mean, channels)
    std = _per_channel("std", pre.std, channels)
    if not np.all(std != 0) or not np.isfinite(pre.scale):
        raise JobError(ErrorCode.BAD_PARAMS, "pre.std must not be 0 and pre.scale must be finite")
    values: npt.NDArray[np.float32] = (
        pixels.astype(np.float32) * np.float32(pre.scale) - mean
    ) / std
    if pre.dtype == "uint8":
        # For models that take raw pixels (scale 1, mean 0, std 1); anything else is clipped.
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return values.astype(_DTYPES[pre.dtype])


def _per_channel(name: str, values: list[float], channels: int) -> npt.NDArray[np.float32]:
    if len(values) not in (1, channels):
        raise JobError(
            ErrorCode.BAD_PARAMS,
            f"pre.{name} needs 1 or {channels} values for this colour, not {len(values)}",
        )
    array = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise JobError(ErrorCode.BAD_PARAMS, f"pre.{name} must be finite numbers")
    return array


def _layout(values: npt.NDArray[Any], layout: str) -> npt.NDArray[Any]:
    if layout == "hwc":
        return values
    if layout == "nhwc":
        return values[np.newaxis]
    if layout == "chw":
        return values.transpose(2, 0, 1)
    if layout == "nchw":
        return values.transpose(2, 0, 1)[np.newaxis]
    # "flat": one row of H*W*C values in pixel order, as scikit-learn models take 8x8 digits.
    return values.reshape(1, -1)


# --- postprocessing --------------------------------------------------------------------------


def postprocess(
    outputs: dict[str, Any], output_order: list[str], post: Postprocess, transform: Transform
) -> PipelineResult:
    """Class scores or boxes from the model's outputs (by name; ``output_order`` is the
    model's order, whose first is read when ``post.output`` is empty)."""
    if post.kind == "none":
        return PipelineResult()
    scores = _scores_output(outputs, output_order, post.output)
    if post.kind == "topk":
        return PipelineResult(top=_topk(scores, post))
    return PipelineResult(boxes=_boxes(scores, post, transform))


def _scores_output(outputs: dict[str, Any], order: list[str], wanted: str) -> Floats:
    name = wanted or (order[0] if order else "")
    if name not in outputs:
        raise JobError(
            ErrorCode.BAD_PARAMS, f"the model has no output {name!r}; it has {sorted(outputs)}"
        )
    value = outputs[name]
    if not isinstance(value, np.ndarray):
        raise JobError(
            ErrorCode.BAD_TENSOR,
            f"output {name!r} is a {type(value).__name__}, not a tensor (a scikit-learn ZipMap? "
            "export with zipmap=False)",
        )
    # Scores are floats, or 8-bit integers in quantised models; wider integers are labels.
    if value.dtype.kind != "f" and value.dtype not in (np.uint8, np.int8):
        others = [n for n in order if n != name]
        raise JobError(
            ErrorCode.BAD_TENSOR,
            f"output {name!r} holds {value.dtype} values (class labels?), not scores; "
            f"name the scores output in post.output (the model also has {others})",
        )
    return np.asarray(value, dtype=np.float64)


def _topk(scores: Floats, post: Postprocess) -> list[Classification]:
    if scores.size == 0 or sum(side > 1 for side in scores.shape) > 1:
        raise JobError(
            ErrorCode.BAD_TENSOR, f"topk needs a vector of scores, got shape {list(scores.shape)}"
        )
    vector = scores.ravel()
    if np.isnan(vector).any():
        raise JobError(ErrorCode.BAD_TENSOR, "the model's scores contain NaN")
    if post.softmax:
        exp = np.exp(vector - vector.max())
        vector = exp / exp.sum()
    best = np.argsort(-vector, kind="stable")[: post.k]
    return [
        Classification(index=int(i), label=_label(post.labels, int(i)), score=float(vector[i]))
        for i in best
    ]


def _label(labels: list[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def _boxes(rows: Floats, post: Postprocess, transform: Transform) -> list[Box]:
    if rows.ndim == 3 and rows.shape[0] == 1:
        rows = rows[0]
    if rows.ndim != 2 or rows.shape[1] < 5:
        raise JobError(
            ErrorCode.BAD_TENSOR,
            f"boxes needs rows of [box(4), score, class...], got shape {list(rows.shape)}",
        )
    scores, classes = _row_scores(rows)
    keep = (scores > post.score_threshold) & np.isfinite(rows[:, :4]).all(axis=1)
    corners = _corners(rows[keep, :4], post.box_format)
    xyxy = transform.to_image(corners)
    scores, classes = scores[keep], classes[keep]
    # Boxes wholly in the letterbox padding or outside the image have nothing left.
    visible = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
    xyxy, scores, classes = xyxy[visible], scores[visible], classes[visible]
    chosen = _nms_per_class(xyxy, scores, classes, post.iou_threshold, post.max_boxes)
    return [_box(xyxy[i], float(scores[i]), _label(post.labels, int(classes[i]))) for i in chosen]


def _row_scores(rows: Floats) -> tuple[Floats, npt.NDArray[np.int64]]:
    count, columns = rows.shape
    if columns == 5:
        return rows[:, 4], np.zeros(count, dtype=np.int64)
    if columns == 6:
        classes = np.nan_to_num(rows[:, 5], nan=-1.0, posinf=-1.0, neginf=-1.0)
        return rows[:, 4], np.rint(classes).astype(np.int64)
    best = np.argmax(rows[:, 5:], axis=1)
    return rows[:, 4] * rows[np.arange(count), 5 + best], best.astype(np.int64)


def _corners(boxes: Floats, box_format: str) -> Floats:
    if box_format == "xyxy":
        return boxes
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _box(xyxy: Floats, score: float, label: str) -> Box:
    x1, y1, x2, y2 = (round(float(v)) for v in xyxy)
    return Box(x=x1, y=y1, w=x2 - x1, h=y2 - y1, score=score, label=label)


def _nms_per_class(
    xyxy: Floats, scores: Floats, classes: npt.NDArray[np.int64], iou: float, limit: int
) -> list[int]:
    """Indices kept by NMS within each class, best score first, at most ``limit``."""
    kept: list[int] = []
    for cls in np.unique(classes):
        members = np.flatnonzero(classes == cls)
        kept.extend(int(members[i]) for i in nms(xyxy[members], scores[members], iou, limit))
    kept.sort(key=lambda i: -scores[i])
    return kept[:limit]


def nms(xyxy: Floats, scores: Floats, iou_threshold: float, limit: int) -> list[int]:
    """Greedy non-maximum suppression: indices of the boxes kept, best first. A box goes when
    its intersection-over-union with a better kept box is over ``iou_threshold``."""
    x1, y1, x2, y2 = xyxy.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size and len(kept) < limit:
        best, rest = int(order[0]), order[1:]
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        overlap = width * height
        union = areas[best] + areas[rest] - overlap
        ratio = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
        kept.append(best)
        order = rest[ratio <= iou_threshold]
    return kept
