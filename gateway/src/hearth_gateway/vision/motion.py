"""``vision.motion``: what moved in a camera stream, against a background model learnt from the
stream's own frames (OpenCV's MOG2 Gaussian-mixture background subtractor).

Each stream (a key: the caller's scope and stream name) has its own model. A frame is compared
with the model pixel by pixel; pixels far from it (squared Mahalanobis distance over
``threshold``) are foreground. Speckle is removed with a morphological opening, holes are closed,
and each connected foreground area of at least ``min_area`` pixels becomes a region (its
bounding box), largest first. The model keeps learning from every frame, so something that
stops moving fades into the background after about ``history`` frames.

Limits: a fixed camera is assumed (panning or shaking moves everything); sudden light changes
show up as motion until the model has caught up; shadows count as motion (shadow detection is
off: it is slow and unreliable in indoor light). The first ``warmup`` frames only teach the model.
A frame of another size than the previous one starts the stream's model afresh.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

import cv2
import msgspec
import numpy as np
import numpy.typing as npt

from hearth.protocol.vision import Box, MotionResult

__all__ = ["MAX_REGIONS", "MotionModel", "MotionParams", "MotionStreams"]

# A noisy frame can break into thousands of blobs; the answer stays small.
MAX_REGIONS = 100

_OPEN = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
_CLOSE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))


class MotionParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of ``vision.motion``."""

    # MOG2's varThreshold: squared distance from the model above which a pixel is moving.
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=10_000.0)] = 25.0
    # Frames the model remembers (and, with the automatic learning rate, learns over).
    history: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 200
    # Smallest region reported, in pixels of moving area.
    min_area: Annotated[int, msgspec.Meta(ge=1)] = 200
    # Frames that only teach the model before regions are reported.
    warmup: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 5
    # How fast the model adapts, 0..1 per frame; negative: automatic (1 / frames seen, then
    # 1 / history). 0 freezes the background.
    learning_rate: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] = -1.0


class MotionModel:
    """The background model of one stream."""

    def __init__(self) -> None:
        self._subtractor: Any = None
        self._shape: tuple[int, ...] = ()
        self.frames_seen = 0

    def reset(self) -> None:
        self._subtractor = None
        self._shape = ()
        self.frames_seen = 0

    def update(self, bgr: npt.NDArray[np.uint8], params: MotionParams) -> MotionResult:
        """Learn from a BGR frame and report what moves in it."""
        if bgr.shape != self._shape:
            self.reset()
            self._shape = bgr.shape
        mask = self._foreground(bgr, params)
        self.frames_seen += 1
        height, width = bgr.shape[:2]
        learning = self.frames_seen <= params.warmup
        if learning:
            regions: list[Box] = []
            fraction = 0.0
        else:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _OPEN)
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _CLOSE)
            regions = _regions(mask, params.min_area)
            fraction = float(np.count_nonzero(mask)) / (width * height)
        return MotionResult(
            width=width,
            height=height,
            regions=regions,
            moving_fraction=fraction,
            frames_seen=self.frames_seen,
            learning=learning,
        )

    def _foreground(self, bgr: npt.NDArray[np.uint8], params: MotionParams) -> Any:
        if self._subtractor is None:
            self._subtractor = cv2.createBackgroundSubtractorMOG2(
                history=params.history, varThreshold=params.threshold, detectShadows=False
            )
        else:  # a stream may change its parameters between frames
            self._subtractor.setHistory(params.history)
            self._subtractor.setVarThreshold(params.threshold)
        return self._subtractor.apply(bgr, learningRate=params.learning_rate)


def _regions(mask: Any, min_area: int) -> list[Box]:
    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    # Row 0 is the background; columns are x, y, w, h, area.
    blobs = [row for row in stats[1:count] if row[cv2.CC_STAT_AREA] >= min_area]
    blobs.sort(key=lambda row: int(row[cv2.CC_STAT_AREA]), reverse=True)
    return [
        Box(x=int(x), y=int(y), w=int(w), h=int(h), label="motion")
        for x, y, w, h, _area in blobs[:MAX_REGIONS]
    ]


class MotionStreams:
    """The models of many streams, by key. At most ``max_streams`` are kept (the least recently
    used goes first), and a stream without a frame for ``idle_s`` seconds is dropped.

    Not thread-safe: one owner (the vision worker) calls it.
    """

    def __init__(
        self,
        *,
        max_streams: int = 64,
        idle_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.max_streams = max_streams
        self.idle_s = idle_s
        self._clock = clock
        self._models: OrderedDict[str, tuple[MotionModel, float]] = OrderedDict()

    def update(self, key: str, bgr: npt.NDArray[np.uint8], params: MotionParams) -> MotionResult:
        now = self._clock()
        self._drop_idle(now)
        model = self._models.pop(key, (MotionModel(), now))[0]
        self._models[key] = (model, now)
        while len(self._models) > self.max_streams:
            self._models.popitem(last=False)
        return model.update(bgr, params)

    def close(self, key: str) -> bool:
        """Forget a stream; False if it was not known. Closing twice is harmless."""
        return self._models.pop(key, None) is not None

    def clear(self) -> None:
        self._models.clear()

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def _drop_idle(self, now: float) -> None:
        # Ordered by last use, so the idle ones are at the front.
        while self._models:
            key, (_model, last) = next(iter(self._models.items()))
            if now - last <= self.idle_s:
                return
            del self._models[key]
