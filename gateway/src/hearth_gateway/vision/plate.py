"""``vision.plate``: licence-plate text with PaddleOCR's PP-OCRv4 models on our OnnxRuntime.

The pipeline is PaddleOCR's, reimplemented without its Python dependencies:

1. **Detection** (DB, ``ch_PP-OCRv4_det_infer.onnx``): the image, resized to multiples of 32,
   gives a text-probability map; thresholded regions become rotated rectangles, grown by the
   DB "unclip" distance (area * ratio / perimeter) because the network is trained to predict
   shrunken text kernels. Boxes continuing one line (a plate split at its wide space) are joined.
2. **Recognition** (CRNN/SVTR + CTC, ``ch_PP-OCRv4_rec_infer.onnx``): each box is warped to a
   horizontal strip 48 px high and read by greedy CTC decoding over the alphabet stored in the
   model (``character`` metadata: blank + 6623 symbols + space).
3. **Plate choice**: each line is decoded a second time with the alphabet narrowed to what a
   plate can carry (A-Z, 0-9, separators; lower-case and full-width forms fold into their
   upper-case ASCII letter, since the network learned them as separate classes of the same
   shape). The best line that looks like a plate (and matches ``pattern`` when given) wins.

The angle classifier (``cls``) is not used: plates are mounted upright, and the warp already
straightens tilted boxes.

The models ship in the ``rapidocr-onnxruntime`` wheel (Apache-2.0, converted from PaddleOCR);
the gateway finds them there without importing that package, or in ``models_dir``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import cv2
import msgspec
import numpy as np

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import PlateResult, PlateText
from hearth.runtime.onnx import OnnxRuntime

__all__ = ["DET_MODEL", "REC_MODEL", "VERSION", "PlateParams", "PlateReader", "default_models_dir"]

DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
VERSION = "plate/1 (PP-OCRv4 det + PP-OCRv4 rec, ch)"

Array = Any  # numpy arrays; OpenCV's stubs and numpy's generics do not meet cleanly

# Detection, as PaddleOCR's PP-OCRv4 inference config has it.
_DET_MAX_SIDE = 960  # px: larger images are scaled down (time grows with area)
_DET_MIN_SIDE = 320  # px: smaller ones are scaled up so small text keeps a few pixels of height
_DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet's, applied to BGR as Paddle does
_DET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_DET_THRESH = 0.3  # probability for a pixel to be text
_DET_BOX_THRESH = 0.6  # mean probability inside a box for it to count
_DET_UNCLIP = 1.5  # PaddleOCR's default unclip ratio
_DET_MIN_SIZE = 3  # px (detector scale): shorter boxes are specks
_MAX_CONTOURS = 1000  # candidate regions examined (PaddleOCR's max_candidates)
_MAX_BOXES = 32  # largest boxes read; a plate scene has a handful
# Joining words of one line (in text heights; see _Rect.same_line).
_JOIN_MAX_GAP = 0.5
_JOIN_MAX_OFFSET = 0.35
_JOIN_MAX_HEIGHT_RATIO = 1.5
_JOIN_MAX_TURN = 12.0  # degrees

# Recognition.
_REC_HEIGHT = 48  # px: the PP-OCRv3/v4 recogniser's input height
_REC_MIN_WIDTH = 320  # px: PaddleOCR pads batches to at least 48x320
_REC_MAX_WIDTH = 1600  # px: a longer line is squeezed rather than grown without bound
_REC_BATCH = 8

# What a plate reading may contain after folding; separators are dropped from the reading.
_PLATE_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_SEPARATORS = frozenset(" -.·_")
_MIN_PLATE_CHARS = 2
# The longest plates issued have ten characters; longer readings are signs and stickers, and
# bounding the length bounds the pattern repair's search (and a caller's regex) too.
_MAX_PLATE_CHARS = 12
# Pattern repair: readings that miss ``pattern`` may swap characters of similar shape, but only
# towards an alternative the network itself ranked next (see _fit_pattern).
_MAX_SWAPS = 3


class PlateParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of ``vision.plate``.

    ``min_score``: lines read with lower mean confidence are dropped. ``pattern``: a regular
    expression that a plate's reading (upper-case letters and digits only) must match in full,
    e.g. ``"[A-Z]{2}[0-9]{2}[A-Z]{3}"``; empty accepts any reading of 2 to 12 characters. A
    reading that misses the pattern may swap look-alikes (O/0, I/1, S/5, B/8, ...) to match it.
    ``max_lines``: at most this many lines are returned.
    """

    min_score: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    pattern: Annotated[str, msgspec.Meta(max_length=256)] = ""
    max_lines: Annotated[int, msgspec.Meta(ge=1, le=_MAX_BOXES)] = 8


def default_models_dir() -> Path | None:
    """Where the ``rapidocr-onnxruntime`` wheel keeps its models, if it is installed. The
    package is located, never imported: importing it would pull in its GUI OpenCV build."""
    try:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@dataclass(frozen=True, slots=True)
class _Model:
    sha256: str
    path: Path  # lets the runtime reload it if its session cache evicted it


@dataclass(frozen=True, slots=True)
class _Line:
    quad: Array  # 4x2 float32, clockwise from top-left, image pixels
    text: str  # full-alphabet reading
    score: float
    plate: str  # folded to _PLATE_SYMBOLS
    plate_score: float


class PlateReader:
    """Reads licence plates in BGR images. Holds no native handles of its own: its sessions
    live in ``runtime``, whose owner closes it.

    >>> reader = PlateReader(OnnxRuntime())  # doctest: +SKIP
    >>> reader.read(bgr, PlateParams(pattern="[A-Z]{2}[0-9]{2}[A-Z]{3}")).text  # doctest: +SKIP
    'AB12CDE'
    """

    def __init__(self, runtime: OnnxRuntime, models_dir: Path | None = None) -> None:
        self._runtime = runtime
        folder = models_dir if models_dir is not None else default_models_dir()
        if folder is None:
            raise JobError(
                ErrorCode.UNSUPPORTED,
                "vision.plate needs the PP-OCRv4 models: install the rapidocr-onnxruntime wheel "
                "(pip install --no-deps rapidocr-onnxruntime) or configure a models directory",
            )
        self._det = self._load(folder / DET_MODEL)
        self._rec = self._load(folder / REC_MODEL)
        meta = runtime.metadata(self._rec.sha256, path=self._rec.path)
        alphabet = meta.get("character", "")
        if not alphabet:
            raise JobError(ErrorCode.INTERNAL, f"{REC_MODEL} carries no 'character' alphabet")
        # PaddleOCR's CTC head: class 0 is the blank, then the dictionary's lines, then a space.
        # Split on "\n" only, as PaddleOCR reads its dictionary file.
        self._chars = ["", *alphabet.split("\n"), " "]
        self._fold = _fold_matrix(self._chars)

    def _load(self, path: Path) -> _Model:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise JobError(
                ErrorCode.UNSUPPORTED,
                f"vision.plate model {path.name} unreadable in {path.parent}: {exc.strerror}",
            ) from None
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._runtime.load(sha256, model=data)
        except JobError as exc:  # a damaged install, not the caller's model: not INVALID_MODEL
            raise JobError(ErrorCode.INTERNAL, f"{path.name}: {exc.message}") from None
        return _Model(sha256, path)

    @property
    def provider(self) -> str:
        """The execution providers that run the detector and the recogniser, comma-separated
        when they differ (what a call_result reports)."""
        det = self._runtime.load(self._det.sha256, path=self._det.path)
        rec = self._runtime.load(self._rec.sha256, path=self._rec.path)
        return det if det == rec else f"{det},{rec}"

    def read(self, bgr: Array, params: PlateParams | None = None) -> PlateResult:
        """Every text line in ``bgr`` (H x W x 3 uint8; grey and BGRA are accepted too), and the
        best plate-like reading among them. Raises JobError(BAD_IMAGE) for non-images,
        JobError(BAD_PARAMS) for a ``pattern`` that is not a regular expression."""
        params = params or PlateParams()
        image = _as_bgr(bgr)
        height, width = image.shape[:2]
        try:
            pattern = re.compile(params.pattern) if params.pattern else None
        except re.error as exc:
            raise JobError(ErrorCode.BAD_PARAMS, f"pattern: {exc}") from None

        quads = self._detect(image)
        lines = self._recognise(image, quads) if quads else []
        lines = [line for line in lines if line.text.strip() and line.score >= params.min_score]

        ranked: list[tuple[tuple[bool, float], _Line, str]] = []
        for line in lines:
            reading = line.plate
            if pattern is not None and len(reading) <= _MAX_PLATE_CHARS:
                reading = _fit_pattern(reading, pattern) or ""
            # The folded reading has its own confidence: a line of other script folds into
            # letters only by the little probability the network gave them.
            is_plate = (
                _MIN_PLATE_CHARS <= len(reading) <= _MAX_PLATE_CHARS
                and line.plate_score >= params.min_score
            )
            ranked.append(((is_plate, line.plate_score if is_plate else line.score), line, reading))
        ranked.sort(key=lambda item: item[0], reverse=True)
        best = ranked[0] if ranked and ranked[0][0][0] else None
        return PlateResult(
            width=width,
            height=height,
            text=best[2] if best else "",
            score=round(best[1].plate_score, 4) if best else 0.0,
            lines=[
                PlateText(
                    text=line.text,
                    score=round(line.score, 4),
                    quad=[(round(float(x), 1), round(float(y), 1)) for x, y in line.quad],
                )
                for _, line, _ in ranked[: params.max_lines]
            ],
        )

    # --- detection ------------------------------------------------------------------------

    def _detect(self, image: Array) -> list[Array]:
        height, width = image.shape[:2]
        scale = min(1.0, _DET_MAX_SIDE / max(height, width))
        scale = max(
            scale, min(_DET_MIN_SIDE / min(height, width), _DET_MAX_SIDE / max(height, width))
        )
        det_h = max(32, round(height * scale / 32) * 32)
        det_w = max(32, round(width * scale / 32) * 32)
        resized = cv2.resize(image, (det_w, det_h), interpolation=cv2.INTER_LINEAR)
        tensor = (resized.astype(np.float32) / 255.0 - _DET_MEAN) / _DET_STD
        tensor = tensor.transpose(2, 0, 1)[None]
        (prob,), _ = self._runtime.run_arrays(
            self._det.sha256, {"x": np.ascontiguousarray(tensor)}, path=self._det.path
        )
        prob = prob[0, 0]
        # A 2x2 dilation joins letters that the threshold leaves apart (PaddleOCR's use_dilation).
        mask = cv2.dilate((prob > _DET_THRESH).astype(np.uint8), np.ones((2, 2), np.uint8))
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        rects: list[_Rect] = []
        for contour in contours[:_MAX_CONTOURS]:
            rect = cv2.minAreaRect(contour)
            if min(rect[1]) < _DET_MIN_SIZE:
                continue
            if _box_score(prob, cv2.boxPoints(rect)) < _DET_BOX_THRESH:
                continue
            grown = _Rect.of(_unclip(rect))
            if grown.short >= _DET_MIN_SIZE + 2:
                rects.append(grown)
        sx, sy = width / det_w, height / det_h
        quads: list[tuple[float, Array]] = []
        for line in _join_words(rects):
            quad = _order_quad(cv2.boxPoints(line.cv()))
            quad[:, 0] = np.clip(quad[:, 0] * sx, 0, width)
            quad[:, 1] = np.clip(quad[:, 1] * sy, 0, height)
            quads.append((line.long * line.short, quad))
        quads.sort(key=lambda item: item[0], reverse=True)
        return [quad for _, quad in quads[:_MAX_BOXES]]

    # --- recognition ----------------------------------------------------------------------

    def _recognise(self, image: Array, quads: list[Array]) -> list[_Line]:
        crops = [_crop(image, quad) for quad in quads]
        # Similar widths in one batch waste little padding (PaddleOCR sorts the same way).
        order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / crops[i].shape[0])
        lines: list[_Line | None] = [None] * len(crops)
        for start in range(0, len(order), _REC_BATCH):
            batch = order[start : start + _REC_BATCH]
            widths = [_rec_width(crops[i]) for i in batch]
            tensor = np.zeros(
                (len(batch), 3, _REC_HEIGHT, max(*widths, _REC_MIN_WIDTH)), np.float32
            )
            for row, (i, w) in enumerate(zip(batch, widths, strict=True)):
                strip = cv2.resize(crops[i], (w, _REC_HEIGHT), interpolation=cv2.INTER_LINEAR)
                tensor[row, :, :, :w] = (strip.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0
            (probs,), _ = self._runtime.run_arrays(
                self._rec.sha256, {"x": tensor}, path=self._rec.path
            )
            if probs.shape[-1] != len(self._chars):
                raise JobError(
                    ErrorCode.INTERNAL,
                    f"{REC_MODEL} has {probs.shape[-1]} classes for {len(self._chars)} symbols",
                )
            for row, i in enumerate(batch):
                text, score = _ctc_greedy(probs[row], self._chars)
                plate_probs = probs[row] @ self._fold
                plate, plate_score = _ctc_greedy(plate_probs, _FOLDED_CHARS)
                lines[i] = _Line(
                    quad=quads[i],
                    text=text,
                    score=score,
                    plate="".join(c for c in plate if c not in _SEPARATORS),
                    plate_score=plate_score,
                )
        return [line for line in lines if line is not None]


# --- helpers ------------------------------------------------------------------------------

# Plate decoding classes: blank, the plate symbols, then one class for all separators.
_FOLDED_CHARS = ["", *_PLATE_SYMBOLS, " "]


def _fold_matrix(chars: list[str]) -> Array:
    """A (classes x folded classes) 0/1 matrix summing the network's probabilities of every
    symbol that prints as the same plate character: 'a', 'A' and the full-width A all become
    'A'."""
    fold = np.zeros((len(chars), len(_FOLDED_CHARS)), np.float32)
    fold[0, 0] = 1.0
    for index, char in enumerate(chars[1:], start=1):
        plain = unicodedata.normalize("NFKC", char).upper()
        if len(plain) == 1 and plain in _PLATE_SYMBOLS:
            fold[index, 1 + _PLATE_SYMBOLS.index(plain)] = 1.0
        elif plain in _SEPARATORS or char == "\u3000":
            fold[index, len(_FOLDED_CHARS) - 1] = 1.0
    return fold


def _ctc_greedy(probs: Array, chars: list[str]) -> tuple[str, float]:
    """Best class per time step, repeats merged, blanks (class 0) dropped; the score is the
    mean probability of the kept steps."""
    best = probs.argmax(axis=1)
    keep = best != 0
    keep[1:] &= best[1:] != best[:-1]
    if not keep.any():
        return "", 0.0
    text = "".join(chars[i] for i in best[keep])
    return text, float(probs[keep, best[keep]].mean())


def _as_bgr(bgr: Any) -> Array:
    if not isinstance(bgr, np.ndarray) or bgr.dtype != np.uint8:
        raise JobError(ErrorCode.BAD_IMAGE, "vision.plate needs an 8-bit image array")
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    elif bgr.ndim == 3 and bgr.shape[2] == 1:
        bgr = cv2.cvtColor(bgr[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif bgr.ndim == 3 and bgr.shape[2] == 4:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGRA2BGR)
    elif bgr.ndim != 3 or bgr.shape[2] != 3:
        raise JobError(ErrorCode.BAD_IMAGE, f"image of shape {bgr.shape} is not grey, BGR or BGRA")
    if min(bgr.shape[:2]) < 1:
        raise JobError(ErrorCode.BAD_IMAGE, f"empty image of shape {bgr.shape}")
    return np.ascontiguousarray(bgr)


def _box_score(prob: Array, points: Array) -> float:
    """Mean text probability inside the polygon (PaddleOCR's "fast" box score)."""
    h, w = prob.shape
    x0 = int(np.clip(np.floor(points[:, 0].min()), 0, w - 1))
    x1 = int(np.clip(np.ceil(points[:, 0].max()), 0, w - 1))
    y0 = int(np.clip(np.floor(points[:, 1].min()), 0, h - 1))
    y1 = int(np.clip(np.ceil(points[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(mask, [(points - [x0, y0]).astype(np.int32)], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def _unclip(rect: Any) -> Any:
    """Grow a rotated rectangle by DB's unclip distance, area * ratio / perimeter, on every
    side. For a rectangle this is what the polygon offset (pyclipper) computes, less the
    rounded corners, which the min-area rectangle taken afterwards squares off anyway."""
    (cx, cy), (w, h), angle = rect
    distance = w * h * _DET_UNCLIP / max(2.0 * (w + h), 1e-6)
    return (cx, cy), (w + 2 * distance, h + 2 * distance), angle


@dataclass(frozen=True, slots=True)
class _Rect:
    """A rotated rectangle with its long side first: ``angle`` (degrees, [0, 180)) is the
    direction of the long side, which for a text line is the reading direction."""

    cx: float
    cy: float
    long: float
    short: float
    angle: float

    @classmethod
    def of(cls, rect: Any) -> _Rect:
        (cx, cy), (w, h), angle = rect
        if w < h:
            w, h, angle = h, w, angle + 90.0
        return cls(float(cx), float(cy), float(w), float(h), float(angle) % 180.0)

    def cv(self) -> Any:
        return (self.cx, self.cy), (self.long, self.short), self.angle

    def same_line(self, other: _Rect) -> bool:
        """Whether ``other`` continues this line: same height and direction, on the same
        centre line, and touching or nearly so along it."""
        ref = self if self.long / self.short >= other.long / other.short else other
        turn = abs(self.angle - other.angle) % 180.0
        if (
            min(turn, 180.0 - turn) > _JOIN_MAX_TURN
            and min(self.long / self.short, other.long / other.short) > 1.5
        ):
            return False  # fmt: skip
        if max(self.short, other.short) > _JOIN_MAX_HEIGHT_RATIO * min(self.short, other.short):
            return False
        ux, uy = math.cos(math.radians(ref.angle)), math.sin(math.radians(ref.angle))
        dx, dy = other.cx - self.cx, other.cy - self.cy
        along, across = abs(dx * ux + dy * uy), abs(-dx * uy + dy * ux)
        height = (self.short + other.short) / 2
        gap = along - (self.long + other.long) / 2
        return across <= _JOIN_MAX_OFFSET * height and gap <= _JOIN_MAX_GAP * height


def _join_words(rects: list[_Rect]) -> list[_Rect]:
    """Boxes of one text line, joined. The detector splits a line at a wide space (the gap of
    "AB12 CDE" is wider than its letter spacing), and a plate read in halves is not read."""
    groups = list(range(len(rects)))

    def root(i: int) -> int:
        while groups[i] != i:
            groups[i] = groups[groups[i]]
            i = groups[i]
        return i

    for i, j in itertools.combinations(range(len(rects)), 2):
        if rects[i].same_line(rects[j]):
            groups[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(rects)):
        members.setdefault(root(i), []).append(i)
    joined = []
    for group in members.values():
        if len(group) == 1:
            joined.append(rects[group[0]])
            continue
        points = np.concatenate([cv2.boxPoints(rects[i].cv()) for i in group])
        joined.append(_Rect.of(cv2.minAreaRect(points)))
    return joined


def _order_quad(points: Array) -> Array:
    """Corners clockwise from top-left (PaddleOCR's get_mini_boxes ordering)."""
    pts = sorted(points.tolist(), key=lambda p: p[0])
    left = sorted(pts[:2], key=lambda p: p[1])
    right = sorted(pts[2:], key=lambda p: p[1])
    return np.array([left[0], right[0], right[1], left[1]], np.float32)


def _crop(image: Array, quad: Array) -> Array:
    """The quad warped to an upright strip; tall strips are turned a quarter (vertical text)."""
    width = max(1, round(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3]))))
    height = max(
        1, round(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    )
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    warp = cv2.getPerspectiveTransform(quad.astype(np.float32), target)
    strip = cv2.warpPerspective(
        image, warp, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
    if height >= 1.5 * width:
        strip = np.ascontiguousarray(np.rot90(strip))
    return strip


def _rec_width(crop: Array) -> int:
    h, w = crop.shape[:2]
    return int(min(_REC_MAX_WIDTH, max(8, math.ceil(_REC_HEIGHT * w / h))))


def _fit_pattern(reading: str, pattern: re.Pattern[str]) -> str | None:
    """``reading`` if it matches, else the closest variant (fewest swaps between look-alike
    letters and digits) that does, or None."""
    if pattern.fullmatch(reading):
        return reading
    spots = [i for i, c in enumerate(reading) if c in _LOOKALIKE]
    for swaps in range(1, min(_MAX_SWAPS, len(spots)) + 1):
        for chosen in itertools.combinations(spots, swaps):
            for options in itertools.product(*(_LOOKALIKE[reading[i]] for i in chosen)):
                variant = list(reading)
                for i, c in zip(chosen, options, strict=True):
                    variant[i] = c
                candidate = "".join(variant)
                if pattern.fullmatch(candidate):
                    return candidate
    return None


# Letters and digits that the same glyph shapes can stand for; used only to satisfy a
# caller's ``pattern`` (a position that must be a digit cannot hold an O).
_LOOKALIKE: dict[str, str] = {
    "0": "OD", "O": "0", "D": "0", "Q": "0",
    "1": "I", "I": "1", "L": "1",
    "2": "Z", "Z": "2",
    "5": "S", "S": "5",
    "6": "G", "G": "6",
    "8": "B", "B": "8",
    "4": "A", "A": "4",
    "7": "T", "T": "7",
}  # fmt: skip
