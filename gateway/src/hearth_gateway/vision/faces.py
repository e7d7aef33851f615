"""``vision.faces``: frontal faces with OpenCV's Viola-Jones Haar cascade
(``haarcascade_frontalface_default.xml``, shipped inside the opencv-python wheel).

What it does: the image is turned grey and histogram-equalised (so that exposure matters less),
then scanned at scales growing by ``scale_factor`` from ``min_size`` pixels up; a window counts
as a face when at least ``min_neighbors`` overlapping detections agree. Each box's score is the
cascade's confidence for it (the last stage's weighted sum, from ``detectMultiScale3``): larger
is surer, but it is not a probability and has no fixed range.

Limits: upright, roughly frontal faces only (profiles and faces turned more than ~30 degrees are
missed); a classical detector, so expect a few false positives on busy textures and misses in
poor light. No identities, landmarks or age/gender: just boxes.

Why opencv-python-headless is pinned below 5: the OpenCV 5 wheels dropped ``CascadeClassifier``
(the old ``objdetect`` cascades moved out) and no longer ship the ``cv2.data`` cascade files,
so this module would have no detector to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import cv2
import cv2.data
import msgspec
import numpy as np
import numpy.typing as npt

from hearth.protocol.vision import Box

__all__ = ["CASCADE", "VERSION", "FaceDetector", "FacesParams"]

CASCADE = "haarcascade_frontalface_default.xml"
VERSION = f"haar-frontalface-default (opencv {cv2.__version__})"


class FacesParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of ``vision.faces``."""

    # Smallest face looked for, in pixels (its side); the cascade's own window is 24.
    min_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 30
    # Step between scales. Below 1.05 the number of scales, and so the time, grows steeply.
    scale_factor: Annotated[float, msgspec.Meta(ge=1.05, le=2.0)] = 1.1
    # Overlapping raw detections needed to report a face: higher, fewer false positives.
    min_neighbors: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    max_faces: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class FaceDetector:
    """Holds the loaded cascade; make one per worker process and reuse it.

    >>> FaceDetector().detect(bgr, FacesParams())  # doctest: +SKIP
    [Box(x=176, y=65, w=96, h=96, score=7.4, label='face')]
    """

    def __init__(self, cascade_path: Path | None = None) -> None:
        path = cascade_path or Path(cv2.data.haarcascades) / CASCADE
        if not path.is_file():
            raise FileNotFoundError(
                f"face cascade {path} is missing: opencv-python(-headless) 4.x ships it in "
                "cv2/data; OpenCV 5 wheels do not"
            )
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ValueError(f"face cascade {path} could not be loaded")

    def detect(self, bgr: npt.NDArray[np.uint8], params: FacesParams) -> list[Box]:
        """Faces in a BGR image, surest first, at most ``params.max_faces``."""
        grey = cv2.equalizeHist(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
        rects, _levels, weights = self._cascade.detectMultiScale3(
            grey,
            scaleFactor=params.scale_factor,
            minNeighbors=params.min_neighbors,
            minSize=(params.min_size, params.min_size),
            outputRejectLevels=True,
        )
        scores = np.ravel(np.asarray(weights, dtype=np.float64))
        faces = [
            Box(x=int(x), y=int(y), w=int(w), h=int(h), score=float(score), label="face")
            for (x, y, w, h), score in zip(np.reshape(rects, (-1, 4)), scores, strict=True)
        ]
        faces.sort(key=lambda box: box.score, reverse=True)
        return faces[: params.max_faces]
