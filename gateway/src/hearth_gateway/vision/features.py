"""``vision.features``: ORB keypoints and binary descriptors (OpenCV's ``ORB``), for a device
that matches images itself (place recognition, stitching, tracking) but cannot afford to find
features.

Corners are found with FAST (``fast_threshold``: the brightness step, 0..255, around a
candidate) on a pyramid of ``levels`` images each ``scale_factor`` smaller, ranked by their
Harris score, and the best ``max_features`` are kept. Each gets a 256-bit rBRIEF descriptor
(32 bytes) that is rotation-invariant; compare descriptors by Hamming distance.

Limits: nothing is found within ~31 pixels of the border (the descriptor's patch must fit), in
flat areas, or in images under 63 pixels wide or high; keypoint coordinates are in pixels of the
full-size image.
"""

from __future__ import annotations

import functools
from typing import Annotated

import cv2
import msgspec
import numpy as np
import numpy.typing as npt

from hearth.protocol.vision import FeaturesResult, Keypoint

__all__ = ["DESCRIPTOR_BYTES", "FeaturesParams", "orb_features"]

DESCRIPTOR_BYTES = 32
# Pixels kept clear of the border: the descriptor's 31-pixel patch must fit around a keypoint.
_EDGE = 31


class FeaturesParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of ``vision.features``."""

    max_features: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    fast_threshold: Annotated[int, msgspec.Meta(ge=1, le=255)] = 20
    scale_factor: Annotated[float, msgspec.Meta(gt=1.0, le=2.0)] = 1.2
    levels: Annotated[int, msgspec.Meta(ge=1, le=16)] = 8


@functools.lru_cache(maxsize=16)
def _orb(params: FeaturesParams) -> cv2.ORB:
    # ORB objects hold nothing per image, and creating one costs more than a small image's run.
    return cv2.ORB.create(
        nfeatures=params.max_features,
        scaleFactor=params.scale_factor,
        nlevels=params.levels,
        edgeThreshold=_EDGE,
        patchSize=_EDGE,
        fastThreshold=params.fast_threshold,
    )


def orb_features(bgr: npt.NDArray[np.uint8], params: FeaturesParams) -> FeaturesResult:
    """ORB keypoints of a BGR image, strongest first, with their descriptors."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    height, width = grey.shape
    if min(height, width) <= 2 * _EDGE:
        # Nothing fits inside the border, and OpenCV asserts on 1-pixel-wide images.
        return FeaturesResult(width=width, height=height, keypoints=[], descriptors=b"")
    found, descriptors = _orb(params).detectAndCompute(grey, None)
    if descriptors is None or not found:
        return FeaturesResult(width=width, height=height, keypoints=[], descriptors=b"")
    # ORB's per-level quotas can add up to a few more than asked for.
    order = sorted(range(len(found)), key=lambda i: found[i].response, reverse=True)
    order = order[: params.max_features]
    keypoints = [_keypoint(found[i]) for i in order]
    rows = np.ascontiguousarray(descriptors[order], dtype=np.uint8)
    return FeaturesResult(
        width=width, height=height, keypoints=keypoints, descriptors=rows.tobytes()
    )


def _keypoint(point: cv2.KeyPoint) -> Keypoint:
    x, y = point.pt
    return Keypoint(
        x=float(x),
        y=float(y),
        size=float(point.size),
        angle=float(point.angle),
        response=float(point.response),
        octave=int(point.octave),
    )
