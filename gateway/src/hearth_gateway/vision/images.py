"""Images from the wire into pixels: ``probe`` reads the size from the header alone, ``decode``
refuses anything over the pixel budget before a byte of it is decompressed.

Decompression bombs are the threat: a PNG or JPEG of a few hundred bytes can declare
30000 x 30000 pixels (2.7 GB as BGR). ``probe`` reads only the header (JPEG: the markers up to
the frame header; PNG: the signature and a CRC-checked IHDR), and ``decode`` compares its answer
with ``max_megapixels`` before calling OpenCV. A second, process-wide line of defence is
OpenCV's own limit (``OPENCV_IO_MAX_IMAGE_PIXELS``, which the worker pool puts in each worker's
environment).

Limits: JPEG and PNG only (plus raw 8-bit grey/BGR); EXIF orientation is *not* applied, so
pixel coordinates are those of the stored pixel grid; animated or 16-bit PNGs decode to their
first frame in 8-bit BGR; a JPEG whose size is set later by a DNL marker is refused.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import numpy.typing as npt

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import Image

__all__ = ["decode", "encode_jpeg", "probe"]

BGR = npt.NDArray[np.uint8]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_SIDE = 2**31 - 1  # the PNG spec's limit on width and height
# Start-of-frame markers: SOF0..SOF15 minus DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers without a length field: TEM, RST0..RST7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_JPEG_EOI = b"\xff\xd9"
# IMREAD_IGNORE_ORIENTATION keeps the decoded grid equal to the header's width x height.
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def _bad(message: str) -> JobError:
    return JobError(ErrorCode.BAD_IMAGE, message)


def probe(image: Image) -> tuple[int, int]:
    """Width and height in pixels, from the header only (nothing is decompressed).

    Raises ``JobError(BAD_IMAGE)`` for empty, truncated or corrupt headers and for raw images
    whose byte count does not match ``width * height * channels``.
    """
    if not image.data:
        raise _bad("empty image")
    if image.format == "jpeg":
        width, height, _ = _probe_jpeg(image.data)
        return width, height
    if image.format == "png":
        return _probe_png(image.data)
    if image.format == "raw":
        return _probe_raw(image)
    raise _bad(f"unknown image format {image.format!r}")


def _probe_png(data: bytes) -> tuple[int, int]:
    if not data.startswith(_PNG_SIGNATURE):
        raise _bad("not a PNG file (bad signature)")
    header = data[8:33]  # length, "IHDR", 13 bytes of fields, CRC
    if len(header) < 25:
        raise _bad("truncated PNG header")
    length, kind = struct.unpack(">I4s", header[:8])
    if kind != b"IHDR" or length != 13:
        raise _bad("PNG does not start with an IHDR chunk")
    (crc,) = struct.unpack(">I", header[21:25])
    if zlib.crc32(header[4:21]) != crc:
        raise _bad("corrupt PNG header (IHDR checksum)")
    width, height = struct.unpack(">II", header[8:16])
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise _bad(f"invalid PNG size {width}x{height}")
    return width, height


def _probe_jpeg(data: bytes) -> tuple[int, int, int]:
    """Width, height and the offset just past the frame header."""
    if not data.startswith(b"\xff\xd8"):
        raise _bad("not a JPEG file (no SOI marker)")
    pos = 2
    while True:
        # A marker is 0xFF, optionally more 0xFF fill bytes, then the marker code.
        if pos >= len(data) or data[pos] != 0xFF:
            raise _bad("truncated or corrupt JPEG header")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise _bad("truncated JPEG header")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: image data without a frame header before it
            raise _bad("JPEG has no frame header")
        if pos + 2 > len(data):
            raise _bad("truncated JPEG header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2 or pos + length > len(data):
            raise _bad("truncated or corrupt JPEG segment")
        if marker in _JPEG_SOF:
            return (*_jpeg_frame_size(data[pos + 2 : pos + length]), pos + length)
        pos += length


def _jpeg_frame_size(frame: bytes) -> tuple[int, int]:
    if len(frame) < 6:
        raise _bad("truncated JPEG frame header")
    _precision, height, width, components = struct.unpack(">BHHB", frame[:6])
    if height == 0:
        raise _bad("JPEG with the height set by a DNL marker is not supported")
    if width == 0 or components == 0:
        raise _bad(f"invalid JPEG frame {width}x{height}, {components} components")
    return width, height


def _probe_raw(image: Image) -> tuple[int, int]:
    width, height, channels = image.width, image.height, image.channels
    if channels not in (1, 3):
        raise _bad(f"raw images have 1 or 3 channels, not {channels}")
    if width <= 0 or height <= 0:
        raise _bad(f"raw image needs a positive width and height, got {width}x{height}")
    if len(image.data) != width * height * channels:
        raise _bad(
            f"raw image of {width}x{height}x{channels} needs {width * height * channels} bytes, "
            f"got {len(image.data)}"
        )
    return width, height


def decode(image: Image, *, max_megapixels: float) -> BGR:
    """The image as a BGR uint8 array of shape (height, width, 3).

    Raises ``JobError(TOO_LARGE)`` when the header declares more than ``max_megapixels``
    million pixels (checked before decoding), ``JobError(BAD_IMAGE)`` when the image is corrupt,
    truncated or decodes to another size than its header says.
    """
    width, height = probe(image)
    if width * height > max_megapixels * 1e6:
        raise JobError(
            ErrorCode.TOO_LARGE,
            f"image of {width}x{height} pixels is over the limit of {max_megapixels:g} megapixels",
        )
    if image.format == "raw":
        return _decode_raw(image)
    if image.format == "jpeg":
        _, _, frame_end = _probe_jpeg(image.data)
        # libjpeg fills a truncated scan with grey and only warns; a real file ends in EOI,
        # which cannot occur inside entropy-coded data (0xFF there is always stuffed).
        if image.data.find(_JPEG_EOI, frame_end) < 0:
            raise _bad("truncated JPEG (no end-of-image marker)")
    return _imdecode(image.data, width, height)


def _imdecode(data: bytes, width: int, height: int) -> BGR:
    try:
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_FLAGS)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE" in str(exc):  # OpenCV's own limit (workers.py) tripped
            raise JobError(ErrorCode.TOO_LARGE, "image over the decoder's pixel limit") from None
        raise _bad(f"undecodable image: {exc.err}") from None
    if pixels is None:
        raise _bad("corrupt image data")
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8:
        raise _bad(f"image decoded to {pixels.shape}, but its header says {width}x{height}")
    return np.asarray(pixels, dtype=np.uint8)


def _decode_raw(image: Image) -> BGR:
    pixels = np.frombuffer(image.data, dtype=np.uint8)
    if image.channels == 1:
        grey = pixels.reshape(image.height, image.width)
        return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    # A copy: frombuffer over bytes is read-only, and callers may draw on what they get.
    return pixels.reshape(image.height, image.width, 3).copy()


def encode_jpeg(bgr: BGR, quality: int = 90) -> bytes:
    """A JPEG file of a BGR (or grey) uint8 image; for examples and tests."""
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return bytes(buffer.tobytes())
