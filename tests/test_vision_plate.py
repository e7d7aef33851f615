"""vision.plate against the real PP-OCRv4 models on onnxruntime, with synthetic plate scenes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from hearth.errors import ErrorCode, JobError
from hearth.runtime.onnx import OnnxRuntime
from hearth_gateway.vision.plate import PlateParams, PlateReader, default_models_dir
from testkit.plates_synth import SCENE_SIZE, random_plate_text, render_plate

# The three synthetic formats (GB, California, France), as a caller would configure them.
PATTERN = "[A-Z]{2}[0-9]{2}[A-Z]{3}|[1-9][A-Z]{3}[0-9]{3}|[A-Z]{2}[0-9]{3}[A-Z]{2}"


@pytest.fixture(scope="module")
def reader() -> Iterator[PlateReader]:
    folder = default_models_dir()
    if folder is None or not folder.is_dir():
        pytest.skip("the rapidocr-onnxruntime wheel (PP-OCRv4 models) is not installed")
    runtime = OnnxRuntime(providers=["CPUExecutionProvider"])
    yield PlateReader(runtime)
    runtime.close()


def _truth(printed: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", printed)


@pytest.mark.slow
def test_reads_synthetic_plates(reader: PlateReader) -> None:
    # Tilts up to 18 degrees, defocus or motion blur, noise, uneven light, JPEG: difficulty 1.
    rng = np.random.default_rng(20240611)
    count, exact, elapsed_s = 200, 0, 0.0
    misses = []
    for _ in range(count):
        printed = random_plate_text(rng)
        scene = render_plate(printed, rng)
        started = time.perf_counter()
        result = reader.read(scene, PlateParams())
        elapsed_s += time.perf_counter() - started
        assert (result.width, result.height) == SCENE_SIZE
        if result.text == _truth(printed):
            exact += 1
            assert result.lines
            assert result.score >= 0.5
        else:
            misses.append((printed, result.text))
    rate = exact / count
    print(
        f"\nvision.plate: exact reads {exact}/{count} = {rate:.1%}, "
        f"{elapsed_s / count * 1e3:.0f} ms per plate; misses: {misses}"
    )
    assert rate >= 0.90


def test_pattern_picks_and_repairs(reader: PlateReader) -> None:
    rng = np.random.default_rng(3)
    printed = "AB12 CDE"
    scene = render_plate(printed, rng, difficulty=0.3)
    assert reader.read(scene).text == "AB12CDE"
    assert reader.read(scene, PlateParams(pattern=PATTERN)).text == "AB12CDE"
    # A pattern nothing matches: lines are still reported, but no plate.
    result = reader.read(scene, PlateParams(pattern="[0-9]{9}"))
    assert result.text == ""
    assert result.score == 0.0
    assert result.lines


def test_no_text_reads_nothing(reader: PlateReader) -> None:
    rng = np.random.default_rng(11)
    w, h = SCENE_SIZE
    blank_plate = render_plate("        ", rng)  # a plate with nothing printed on it
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    flat = np.full((h, w, 3), 128, np.uint8)
    for image in (blank_plate, noise, flat):
        result = reader.read(image)
        assert result.text == ""
        assert result.score == 0.0


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (1, 1, 3), (2, 3000, 3), (3000, 2), (31, 33, 4), (40, 40, 1), (7, 5, 3)],
)
def test_odd_shapes_read_nothing(reader: PlateReader, shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = reader.read(image)
    assert (result.width, result.height) == (shape[1], shape[0])
    assert result.text == ""


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((10, 10, 3, 1), np.uint8),
        np.zeros(10, np.uint8),
        np.zeros((10, 10, 3), np.float32),
        "not an image",
    ],
    ids=["empty", "two-channels", "4d", "1d", "float", "str"],
)
def test_garbage_is_a_bad_image(reader: PlateReader, image: object) -> None:
    with pytest.raises(JobError) as caught:
        reader.read(image)
    assert caught.value.code is ErrorCode.BAD_IMAGE


def test_bad_pattern_is_bad_params(reader: PlateReader) -> None:
    with pytest.raises(JobError) as caught:
        reader.read(np.zeros((32, 32, 3), np.uint8), PlateParams(pattern="[A-"))
    assert caught.value.code is ErrorCode.BAD_PARAMS


def test_params_are_validated_at_the_boundary() -> None:
    assert msgspec.convert({"pattern": "[A-Z]+"}, PlateParams).pattern == "[A-Z]+"
    for bad in ({"min_score": 2.0}, {"max_lines": 0}, {"colour": "red"}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, PlateParams)


def test_missing_models_are_unsupported(tmp_path: Path) -> None:
    runtime = OnnxRuntime(providers=["CPUExecutionProvider"])
    try:
        with pytest.raises(JobError) as caught:
            PlateReader(runtime, models_dir=tmp_path)
        assert caught.value.code is ErrorCode.UNSUPPORTED
        assert "ch_PP-OCRv4_det_infer.onnx" in caught.value.message
    finally:
        runtime.close()


def test_synthetic_scenes_are_deterministic() -> None:
    first = np.random.default_rng(5)
    second = np.random.default_rng(5)
    assert random_plate_text(first) == random_plate_text(second)
    a = render_plate("7ABC123", first)
    b = render_plate("7ABC123", second)
    assert a.shape == (SCENE_SIZE[1], SCENE_SIZE[0], 3)
    assert a.dtype == np.uint8
    assert np.array_equal(a, b)
