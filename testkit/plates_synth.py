"""Synthetic licence-plate scenes for testing ``vision.plate``: no files, no downloads.

A plate (white or yellow, dark border, thick Hershey lettering) is mounted on a car-coloured
body in a 480x320 scene, then seen through a camera: a 3-D tilt projected with perspective,
defocus or motion blur, sensor noise, uneven lighting, gamma, and JPEG compression. Everything
comes from the ``rng`` passed in, so a seed reproduces a scene exactly::

    rng = np.random.default_rng(7)
    text = random_plate_text(rng)           # e.g. "AB12CDE"
    bgr = render_plate(text, rng)            # 320x480x3 uint8

``difficulty`` scales the camera's harm: 1.0 means tilts up to 18 degrees, blur up to ~1.3 px
sigma or a 7 px motion streak, noise sigma up to 7 grey levels, strong light changes.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = ["SCENE_SIZE", "random_plate_text", "render_plate"]

SCENE_SIZE = (480, 320)  # width, height in pixels

# (layout of the printed plate, plate aspect width/height, letters the issuer uses). "L" letter,
# "D" digit; spaces and dashes are printed but are not part of the reading. Like the real
# schemes, these leave out the letters that read as digits (I, O, Q; France also U).
_FORMATS = (
    ("LLDD LLL", 4.7, "ABCDEFGHJKLMNPRSTUVWXYZ"),  # GB: AB12 CDE
    ("DLLLDDD", 2.0, "ABCDEFGHJKLMNPRSTUVWXYZ"),  # California: 7ABC123
    ("LL-DDD-LL", 4.7, "ABCDEFGHJKLMNPRSTVWXYZ"),  # France (SIV): AB-123-CD
)

Array = Any  # numpy arrays; OpenCV's stubs and numpy's generics do not meet cleanly


def random_plate_text(rng: np.random.Generator) -> str:
    """A plate number as printed: "AB12 CDE", "7ABC123" or "AB-123-CD" (compare readings
    with the letters and digits only)."""
    layout, _, letters = _FORMATS[int(rng.integers(len(_FORMATS)))]
    text = "".join(
        letters[int(rng.integers(len(letters)))]
        if c == "L"
        else str(int(rng.integers(10)))
        if c == "D"
        else c
        for c in layout
    )
    if layout[0] == "D":  # California's series began at 1AAA000: no leading zero
        text = str(int(rng.integers(1, 10))) + text[1:]
    return text


def _aspect_for(text: str) -> float:
    for layout, aspect, _ in _FORMATS:
        if len(layout) == len(text) and all(
            (a in "LD") == b.isalnum() for a, b in zip(layout, text, strict=True)
        ):
            return aspect
    return 4.7 if len(text) > 7 else 3.0


def _plate_face(text: str, width: int, rng: np.random.Generator) -> Array:
    """The plate seen head-on: background, border, lettering."""
    height = max(12, round(width / _aspect_for(text)))
    yellow = rng.random() < 0.35
    if yellow:  # BGR: GB rear plates
        colour = (
            int(rng.integers(0, 40)),
            int(rng.integers(190, 225)),
            int(rng.integers(235, 256)),
        )
    else:
        grey = int(rng.integers(215, 256))
        colour = (grey, grey, grey)
    face = np.empty((height, width, 3), np.uint8)
    face[:] = colour
    ink = int(rng.integers(10, 50))
    border = max(2, width // 90)
    cv2.rectangle(face, (border, border), (width - 1 - border, height - 1 - border),
                  (ink, ink, ink), border)  # fmt: skip

    font = cv2.FONT_HERSHEY_SIMPLEX if rng.random() < 0.5 else cv2.FONT_HERSHEY_DUPLEX
    # Thick strokes as on real plates: about a seventh of the letter height.
    (w1, h1), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min((width - 6 * border) / w1, 0.62 * height / h1)
    thickness = max(2, round(scale * h1 / 7))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = ((width - tw) // 2, (height + th) // 2)
    cv2.putText(face, text, origin, font, scale, (ink, ink, ink), thickness, cv2.LINE_AA)
    return face


def _background(rng: np.random.Generator) -> Array:
    """A car-ish scene: a sky-to-road gradient, a car body in a random paint, a bumper,
    headlights, and clutter edges the detector must ignore."""
    w, h = SCENE_SIZE
    top = rng.integers(60, 220, 3).astype(np.float32)
    bottom = rng.integers(30, 140, 3).astype(np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    scene = (top * (1 - t) + bottom * t) * np.ones((1, w, 1), np.float32)
    scene = scene.astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):  # poles, kerbs, window frames
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        shade = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(scene, p1, p2, shade, int(rng.integers(1, 6)))
    paint = tuple(int(v) for v in rng.integers(0, 256, 3))
    x0, y0 = int(rng.integers(0, 60)), int(rng.integers(20, 90))
    x1, y1 = int(rng.integers(w - 60, w)), int(rng.integers(h - 50, h))
    cv2.rectangle(scene, (x0, y0), (x1, y1), paint, -1)
    bumper = tuple(max(0, c - 60) for c in paint)
    yb = int(rng.integers((y0 + y1) // 2, y1))
    cv2.rectangle(scene, (x0, yb), (x1, min(h - 1, yb + 30)), bumper, -1)
    for cx in (x0 + 45, x1 - 45):  # lamps
        cv2.ellipse(scene, (cx, y0 + 40), (32, 16), 0, 0, 360, (200, 200, 210), -1)
    return scene


def _tilt_quad(width: int, height: int, max_deg: float, rng: np.random.Generator) -> Array:
    """Corners of a width x height plate turned in 3-D (yaw, pitch, roll up to ``max_deg``)
    and projected through a pinhole camera, centred on the origin."""
    yaw, pitch = np.radians(rng.uniform(-max_deg, max_deg, 2))
    roll = math.radians(rng.uniform(-0.5, 0.5) * max_deg)
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
        math.cos(roll), math.sin(roll),
    )  # fmt: skip
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    corners = np.array(
        [[-width / 2, -height / 2, 0], [width / 2, -height / 2, 0],
         [width / 2, height / 2, 0], [-width / 2, height / 2, 0]]
    )  # fmt: skip
    turned = corners @ (rz @ rx @ ry).T
    focal = 1.6 * width  # a moderately wide lens close to the car: visible keystone
    return (turned[:, :2] * focal / (turned[:, 2:] + focal)).astype(np.float32)


def _motion_kernel(length: int, angle_deg: float) -> Array:
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    centre = ((length - 1) / 2, (length - 1) / 2)
    turn = cv2.getRotationMatrix2D(centre, angle_deg, 1.0)
    streak: Array = cv2.warpAffine(kernel, turn, (length, length))
    return streak / max(float(streak.sum()), 1e-6)


def render_plate(text: str, rng: np.random.Generator, *, difficulty: float = 1.0) -> Array:
    """A BGR scene (uint8, 320x480x3) with one plate showing ``text`` somewhere on a car."""
    w, h = SCENE_SIZE
    scene = _background(rng)
    face = _plate_face(text, int(rng.integers(150, 230)), rng)
    fh, fw = face.shape[:2]

    quad = _tilt_quad(fw, fh, 18.0 * difficulty, rng)
    span = quad.max(axis=0) - quad.min(axis=0)
    lo = -quad.min(axis=0) + 4
    hi = np.array([w, h], np.float32) - quad.max(axis=0) - 4
    centre = rng.uniform(lo, np.maximum(lo + 1, hi)) if (span < [w - 8, h - 8]).all() else lo
    dst = (quad + centre).astype(np.float32)
    src = np.array([[0, 0], [fw, 0], [fw, fh], [0, fh]], np.float32)
    warp = cv2.getPerspectiveTransform(src, dst)
    plate = cv2.warpPerspective(face, warp, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.full((fh, fw), 255, np.uint8), warp, (w, h))
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    image = scene.astype(np.float32) * (1 - alpha) + plate.astype(np.float32) * alpha

    # Light: a shadow or sun gradient across the scene, then contrast, brightness, gamma.
    gx, gy = rng.uniform(-1, 1, 2)
    ramp = (np.arange(w)[None, :] / w - 0.5) * gx + (np.arange(h)[:, None] / h - 0.5) * gy
    image *= (1.0 + 0.5 * difficulty * ramp)[:, :, None]
    contrast = rng.uniform(1 - 0.4 * difficulty, 1 + 0.3 * difficulty)
    brightness = rng.uniform(-40, 40) * difficulty
    image = (image - 128.0) * max(contrast, 0.2) + 128.0 + brightness
    gamma = math.exp(rng.uniform(-0.45, 0.45) * difficulty)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** gamma

    if rng.random() < 0.5:  # out of focus
        sigma = rng.uniform(0.3, 0.3 + 1.0 * difficulty)
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    else:  # a moving car or a shaky camera
        length = 1 + 2 * int(rng.integers(0, 1 + round(2.5 * difficulty)))
        if length > 1:
            image = cv2.filter2D(image, -1, _motion_kernel(length, rng.uniform(0, 180)))
    image += rng.normal(0.0, rng.uniform(0, 7 * difficulty) + 1e-3, image.shape)
    out = np.clip(image, 0, 255).astype(np.uint8)
    quality = int(rng.integers(max(20, round(95 - 50 * difficulty)), 96))
    ok, jpeg = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if ok:
        out = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    return out
