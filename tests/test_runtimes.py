"""The in-process runtimes shared by the SDK (local runs) and the gateway's workers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Tensor
from hearth.runtime.limits import WasmLimits
from hearth.runtime.migratable import MigratableRuntime
from hearth.runtime.onnx import OnnxRuntime, array_to_tensor, select_providers, tensor_to_array
from hearth.runtime.wasm import WasmRuntime


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def runtime():
    rt = WasmRuntime()
    yield rt
    rt.close()


def test_wasm_sandbox_has_no_environment_and_no_filesystem(runtime: WasmRuntime, tmp_path):
    # A module that asks for WASI functions still runs; env is empty and the only preopen
    # is the run's /scratch (tests/test_sandbox.py).
    data = (Path(__file__).parent.parent / "build/examples/wasm/echo.wasm").read_bytes()
    out = runtime.run(_sha(data), wasm=data, stdin=b"in", args=["x"])
    assert (out.exit_code, out.stdout) == (0, b"inx\n")
    assert out.fuel_used > 0


def test_tampered_module_bytes_are_refused(runtime: WasmRuntime, wasm):
    data = wasm["echo"].read_bytes()
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    with pytest.raises(JobError) as info:
        runtime.run(_sha(data), wasm=bytes(tampered))
    assert info.value.code == ErrorCode.HASH_MISMATCH


def test_compiled_modules_are_cached_on_disk(tmp_path: Path, wasm):
    data = wasm["noop"].read_bytes()
    first = WasmRuntime(cache_dir=tmp_path)
    first.load(_sha(data), wasm=data)
    first.close()
    cached = list(tmp_path.glob("*.cwasm"))
    assert len(cached) == 1
    second = WasmRuntime(cache_dir=tmp_path)
    try:
        # Loaded from the cache: no bytes needed at all.
        assert second.run(_sha(data)).exit_code == 0
    finally:
        second.close()


def test_corrupt_cache_entry_is_discarded_and_recompiled(tmp_path: Path, wasm):
    data = wasm["noop"].read_bytes()
    rt = WasmRuntime(cache_dir=tmp_path)
    rt.load(_sha(data), wasm=data)
    rt.close()
    entry = next(tmp_path.glob("*.cwasm"))
    entry.write_bytes(b"garbage")
    rt = WasmRuntime(cache_dir=tmp_path)
    try:
        assert rt.run(_sha(data), wasm=data).exit_code == 0
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("module", "code"),
    [
        ("trap", ErrorCode.TRAP),
        ("spin", ErrorCode.TIMEOUT),
        ("memhog", ErrorCode.MEMORY_LIMIT),
        ("flood", ErrorCode.OUTPUT_LIMIT),
    ],
)
def test_limits_map_to_codes(runtime: WasmRuntime, wasm, module: str, code: ErrorCode):
    data = wasm[module].read_bytes()
    limits = WasmLimits(fuel=100_000_000, memory_bytes=16 << 20, output_bytes=4096)
    with pytest.raises(JobError) as info:
        runtime.run(_sha(data), wasm=data, limits=limits)
    assert info.value.code == code


def test_select_providers_orders_best_first_and_ends_with_cpu():
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(
        ["CPUExecutionProvider", "OpenVINOExecutionProvider", "CUDAExecutionProvider"]
    ) == ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert select_providers([]) == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_a_provider_that_fails_to_load_falls_back_to_cpu(examples):
    # CUDA is asked for first; on a machine without it the session still comes up on the CPU
    # and the provider actually used is the one reported.
    model = (examples / "models" / "digits.onnx").read_bytes()
    rt = OnnxRuntime(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    try:
        x = np.load(examples / "models" / "digits_test_X.npy")[:3]
        outputs, provider = rt.run(_sha(model), [array_to_tensor("input", x)], model=model)
    finally:
        rt.close()
    import onnxruntime as ort

    expected = (
        "CUDAExecutionProvider"
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else "CPUExecutionProvider"
    )
    assert provider == expected
    assert [t.name for t in outputs] == ["label", "probabilities"]


def test_tensor_round_trip_is_exact():
    for array in (
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.linspace(0, 1, 6, dtype=np.float32),
        np.array([True, False]),
    ):
        tensor = array_to_tensor("t", array)
        np.testing.assert_array_equal(tensor_to_array(tensor), array)
    with pytest.raises(JobError) as info:
        tensor_to_array(Tensor("t", "float32", [3], b"\0" * 11))
    assert info.value.code == ErrorCode.BAD_TENSOR


def test_a_new_onnx_session_is_warmed_with_zeros_shaped_like_its_inputs() -> None:
    from hearth.runtime.onnx import _warm_up

    class Session:
        def __init__(self) -> None:
            self.feeds: dict[str, np.ndarray] = {}

        def run(self, outputs: object, feeds: dict[str, np.ndarray]) -> None:
            self.feeds = feeds

    session = Session()
    _warm_up(session, {"image": ("float32", ["batch", 3, 224, None]), "k": ("int64", [])})
    assert session.feeds["image"].shape == (1, 3, 224, 1)
    assert session.feeds["image"].dtype == np.float32
    assert session.feeds["k"].dtype == np.int64


def test_a_model_that_cannot_run_on_zeros_still_loads() -> None:
    from hearth.runtime.onnx import _warm_up

    class Picky:
        def run(self, outputs: object, feeds: object) -> None:
            raise RuntimeError("input too small")

    _warm_up(Picky(), {"x": ("float32", [1, 3, None, None])})  # no exception: just not warmed


# A complete WASI command in the text format: wasmtime's Module() alone would compile and run it.
_WAT = b'(module (func (export "_start")) (memory (export "memory") 1))'


def test_webassembly_text_is_refused_before_it_compiles(runtime: WasmRuntime):
    with pytest.raises(JobError) as info:
        runtime.run(_sha(_WAT), wasm=_WAT)
    assert info.value.code == ErrorCode.INVALID_MODULE
    assert "WebAssembly text" in info.value.message


def test_the_migratable_runtime_refuses_webassembly_text_too(runtime: WasmRuntime):
    with pytest.raises(JobError) as info:
        MigratableRuntime(runtime).module(_sha(_WAT), _WAT)
    assert info.value.code == ErrorCode.INVALID_MODULE
    assert "WebAssembly text" in info.value.message
