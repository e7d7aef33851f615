"""wasi-nn (``wasi_ephemeral_nn``) in the WASI host: a module does its own pre- and
post-processing and runs the model on ONNX Runtime. Real wasmtime, onnxruntime, and a real
gateway for the end-to-end case."""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import wasmtime

from hearth.errors import ErrorCode, JobError
from hearth.runtime.limits import WasmLimits
from hearth.runtime.onnx import OnnxRuntime
from hearth.runtime.wasi_nn import NnErrno, NnLimits, WasiNn
from hearth.runtime.wasm import WasmRuntime
from testkit.examples import REPO_ROOT as ROOT
from testkit.gateway import GatewayProcess

_LINE = re.compile(rb"digit=(\d+) p=([0-9.]+) label=(-?\d+) probs=([-0-9.e,+]+)")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def nn_digits(wasm: dict[str, Path]) -> bytes:
    if "nn_digits" not in wasm:  # a build directory from before the example existed
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_examples.py")], check=True)
    return (ROOT / "build" / "examples" / "wasm" / "nn_digits.wasm").read_bytes()


@pytest.fixture(scope="module")
def model(examples: Path) -> bytes:
    return (examples / "models" / "digits.onnx").read_bytes()


@pytest.fixture(scope="module")
def held_out(examples: Path) -> np.ndarray:
    """Held-out digits (float32 [N, 64], integer pixel values 0..16)."""
    return np.load(examples / "models" / "digits_test_X.npy")


@pytest.fixture
def runtime() -> Iterator[WasmRuntime]:
    rt = WasmRuntime()
    yield rt
    rt.close()


def _stdin(model: bytes, digits: np.ndarray | bytes) -> bytes:
    """nn_digits' framing: u32 LE model length, the model, then the input."""
    body = digits if isinstance(digits, bytes) else digits.astype(np.uint8).tobytes()
    return struct.pack("<I", len(model)) + model + body


def _parse(stdout: bytes) -> tuple[list[int], list[int], np.ndarray]:
    matches = [_LINE.fullmatch(line) for line in stdout.splitlines()]
    assert all(matches), stdout
    digits = [int(m[1]) for m in matches if m]
    labels = [int(m[3]) for m in matches if m]
    probs = np.array([[float(p) for p in m[4].split(b",")] for m in matches if m], np.float32)
    return digits, labels, probs


def _direct(model: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    return label, probabilities


# -- the example, against onnxruntime run directly ---------------------------------------------


def test_nn_digits_gives_the_probabilities_of_onnxruntime(
    runtime: WasmRuntime, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    x = held_out[:24]
    out = runtime.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(model, x))
    assert (out.exit_code, out.stderr) == (0, b"")
    digits, labels, probs = _parse(out.stdout)
    label, probabilities = _direct(model, x)
    np.testing.assert_allclose(probs, probabilities, rtol=1e-6, atol=1e-9)
    assert labels == label.tolist()
    # The argmax done in WebAssembly agrees with the model's own label.
    assert digits == labels


def test_a_pgm_is_scaled_to_the_model_range_in_wasm(
    runtime: WasmRuntime, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    x = held_out[7]
    pixels = np.rint(x * 255 / 16).astype(np.uint8)
    pgm = b"P5\n# an 8x8 digit\n8 8\n255\n" + pixels.tobytes()
    out = runtime.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(model, pgm))
    assert out.exit_code == 0, out.stderr
    _, labels, probs = _parse(out.stdout)
    label, probabilities = _direct(model, x[None, :])
    assert labels == label.tolist()
    np.testing.assert_allclose(probs, probabilities, rtol=1e-6, atol=1e-9)


def test_a_repeated_load_reuses_the_cached_onnx_session(
    nn_digits: bytes, model: bytes, held_out: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = OnnxRuntime(providers=["CPUExecutionProvider"])
    created: list[int] = []
    create = onnx._create_session
    monkeypatch.setattr(onnx, "_create_session", lambda m: created.append(len(m)) or create(m))
    rt = WasmRuntime(wasi_nn=WasiNn(onnx))
    try:
        for i in range(3):
            out = rt.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(model, held_out[i : i + 1]))
            assert out.exit_code == 0, out.stderr
    finally:
        rt.close()
    assert created == [len(model)]
    assert onnx.has(_sha(model))
    onnx.close()  # a shared OnnxRuntime stays open after the WasmRuntime closes


def test_concurrent_runs_keep_their_own_graphs(
    runtime: WasmRuntime, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    runtime.load(_sha(nn_digits), wasm=nn_digits)
    batches = [held_out[i * 5 : i * 5 + 5] for i in range(6)]
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="nn-test") as pool:
        outs = list(
            pool.map(lambda x: runtime.run(_sha(nn_digits), stdin=_stdin(model, x)), batches)
        )
    for x, out in zip(batches, outs, strict=True):
        assert out.exit_code == 0, out.stderr
        np.testing.assert_allclose(_parse(out.stdout)[2], _direct(model, x)[1], rtol=1e-6)


def test_without_wasi_nn_the_module_is_refused_and_plain_wasi_still_runs(
    nn_digits: bytes, wasm: dict[str, Path]
) -> None:
    rt = WasmRuntime(wasi_nn=None)
    try:
        with pytest.raises(JobError) as info:
            rt.run(_sha(nn_digits), wasm=nn_digits)
        assert info.value.code == ErrorCode.INVALID_MODULE
        assert "wasi_ephemeral_nn" in info.value.message
        echo = wasm["echo"].read_bytes()
        assert rt.run(_sha(echo), wasm=echo, stdin=b"x").stdout == b"x"
    finally:
        rt.close()


_WITHOUT_ONNXRUNTIME = """
import hashlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('onnxruntime', 'numpy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from hearth.errors import JobError
from hearth.runtime.wasm import WasmRuntime
rt = WasmRuntime()
assert rt.wasi_nn is None
echo, nn = (open(path, 'rb').read() for path in sys.argv[1:3])
assert rt.run(hashlib.sha256(echo).hexdigest(), wasm=echo, stdin=b'x').stdout == b'x'
try:
    rt.run(hashlib.sha256(nn).hexdigest(), wasm=nn)
except JobError as exc:
    print(exc.code)
rt.close()
"""


def test_a_device_without_onnxruntime_still_runs_plain_wasi(
    nn_digits: bytes, wasm: dict[str, Path]
) -> None:
    module = ROOT / "build" / "examples" / "wasm" / "nn_digits.wasm"
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ONNXRUNTIME, str(wasm["echo"]), str(module)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(ErrorCode.INVALID_MODULE)


def test_host_time_is_charged_to_the_guests_fuel(
    nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    # Any host time at this rate is more fuel than the run has: a guest looping over compute
    # stops at its budget like any other loop.
    rt = WasmRuntime(wasi_nn=WasiNn(limits=NnLimits(fuel_per_second=10**15)))
    try:
        with pytest.raises(JobError) as info:
            rt.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(model, held_out[:1]))
        assert info.value.code == ErrorCode.TIMEOUT
    finally:
        rt.close()


# -- errors the example reports ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "call", "errno"),
    [
        (["--encoding", "0"], "load", NnErrno.INVALID_ENCODING),  # openvino
        (["--encoding", "4"], "load", NnErrno.INVALID_ENCODING),  # tensorflowlite
        (["--encoding", "77"], "load", NnErrno.INVALID_ENCODING),
        (["--target", "3"], "load", NnErrno.INVALID_ARGUMENT),
        (["--dims", "1x63"], "set_input", NnErrno.INVALID_ARGUMENT),
        (["--dims", "64"], "set_input", NnErrno.INVALID_ARGUMENT),
        (["--type", "3"], "set_input", NnErrno.INVALID_ARGUMENT),  # u8 for a float input
        (["--type", "9"], "set_input", NnErrno.INVALID_ARGUMENT),
        (["--out-bytes", "8"], "get_output(probabilities)", NnErrno.TOO_LARGE),
        (["--out-bytes", "4294967295"], "get_output(probabilities)", NnErrno.INVALID_ARGUMENT),
    ],
)
def test_the_module_reports_wasi_nn_errors(
    runtime: WasmRuntime,
    nn_digits: bytes,
    model: bytes,
    held_out: np.ndarray,
    args: list[str],
    call: str,
    errno: NnErrno,
) -> None:
    out = runtime.run(_sha(nn_digits), wasm=nn_digits, args=args, stdin=_stdin(model, held_out[:1]))
    assert out.exit_code == 3
    name = errno.name.lower()
    assert out.stderr == f"nn_digits: {call}: {name} (errno {int(errno)})\n".encode()


def test_autodetect_is_tried_as_onnx(
    runtime: WasmRuntime, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    out = runtime.run(
        _sha(nn_digits), wasm=nn_digits, args=["--encoding", "5"], stdin=_stdin(model, held_out[:2])
    )
    assert out.exit_code == 0, out.stderr


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"not an onnx model" * 100, b"\x08\x07"])
def test_invalid_model_bytes_are_an_error_not_a_crash(
    runtime: WasmRuntime, nn_digits: bytes, held_out: np.ndarray, garbage: bytes
) -> None:
    out = runtime.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(garbage, held_out[:1]))
    assert out.exit_code == 3
    assert out.stderr == b"nn_digits: load: invalid_argument (errno 1)\n"


def test_a_truncated_model_is_an_error_not_a_crash(
    runtime: WasmRuntime, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    out = runtime.run(_sha(nn_digits), wasm=nn_digits, stdin=_stdin(model[:-300], held_out[:1]))
    assert out.exit_code == 3
    assert out.stderr.startswith(b"nn_digits: load: invalid_argument")


# -- the ABI, call by call, from a module that re-exports the imports ----------------------------

_ABI = {  # name: number of i32 parameters; every function returns an i32 errno
    "load": 5,
    "load_by_name": 3,
    "init_execution_context": 2,
    "set_input": 3,
    "compute": 1,
    "get_output": 5,
}


def _proxy_wat(memory: bool) -> str:
    """A module exporting one wasm function per import that just forwards its arguments (so the
    host sees a call from this instance, with its memory)."""
    parts = ["(module"]
    for name, arity in _ABI.items():
        params = " ".join(["i32"] * arity)
        parts.append(
            f'(import "wasi_ephemeral_nn" "{name}" (func ${name} (param {params}) (result i32)))'
        )
    if memory:
        parts.append('(memory (export "memory") 2)')
    for name, arity in _ABI.items():
        params = " ".join(["i32"] * arity)
        args = " ".join(f"(local.get {i})" for i in range(arity))
        parts.append(
            f'(func (export "{name}") (param {params}) (result i32) (call ${name} {args}))'
        )
    return "\n".join([*parts, ")"])


_MEMORY_BYTES = 2 * 65536
_MODEL_AT = 0x1000
_SCRATCH = 0x100  # out-pointers, builders, tensor structs and dims live below _MODEL_AT


class Guest:
    """A module whose exports are the wasi-nn imports, in a store bound to wasi-nn: the test
    plays the guest, with any pointers it likes."""

    def __init__(self, rt: WasmRuntime, *, memory: bool = True, bind: bool = True) -> None:
        module = wasmtime.Module(rt.engine, wasmtime.wat2wasm(_proxy_wat(memory)))
        self.store = wasmtime.Store(rt.engine)
        self.store.set_fuel(10**9)
        assert rt.wasi_nn is not None
        self.binding = rt.wasi_nn.bind(self.store) if bind else None
        self.exports = rt.linker.instantiate(self.store, module).exports(self.store)
        mem = self.exports.get("memory")
        self.memory = mem if isinstance(mem, wasmtime.Memory) else None

    def call(self, name: str, *args: int) -> int:
        fn = self.exports[name]
        assert isinstance(fn, wasmtime.Func)
        return int(fn(self.store, *[a - (1 << 32) if a >= 1 << 31 else a for a in args]))

    def write(self, ptr: int, data: bytes) -> None:
        assert self.memory is not None
        self.memory.write(self.store, data, ptr)

    def u32(self, ptr: int) -> int:
        assert self.memory is not None
        return int(struct.unpack("<I", self.memory.read(self.store, ptr, ptr + 4))[0])

    def load(self, model: bytes, *, out: int = 0, encoding: int = 1) -> int:
        self.write(_MODEL_AT, model)
        self.write(0x10, struct.pack("<II", _MODEL_AT, len(model)))
        return self.call("load", 0x10, 1, encoding, 0, out)

    def tensor(self, at: int, dims: tuple[int, ...], type_: int, data_at: int, n: int) -> int:
        """A tensor struct at ``at``, its dims right after it."""
        self.write(at + 20, struct.pack(f"<{len(dims)}I", *dims))
        self.write(at, struct.pack("<IIB3xII", at + 20, len(dims), type_, data_at, n))
        return at

    def ready_context(self, model: bytes) -> int:
        """Load, init, and set input 0 to one zero digit; returns the context handle."""
        assert self.load(model, out=0) == NnErrno.SUCCESS
        assert self.call("init_execution_context", self.u32(0), 4) == NnErrno.SUCCESS
        ctx = self.u32(4)
        self.write(0x800, bytes(256))
        tensor = self.tensor(_SCRATCH, (1, 64), 1, 0x800, 256)
        assert self.call("set_input", ctx, 0, tensor) == NnErrno.SUCCESS
        return ctx

    def close(self) -> None:
        if self.binding is not None:
            self.binding.close()
        self.store.close()


@pytest.fixture
def guest(runtime: WasmRuntime) -> Iterator[Guest]:
    g = Guest(runtime)
    yield g
    g.close()


_OOB = _MEMORY_BYTES - 2  # a pointer whose 4-byte target runs off the end of memory
_WRAP = 0xFFFFFFF0  # ptr + len wraps around 2**32 in 32-bit arithmetic
_OK, _INVAL, _BIG = NnErrno.SUCCESS, NnErrno.INVALID_ARGUMENT, NnErrno.TOO_LARGE


def test_load_with_hostile_pointers(guest: Guest, model: bytes) -> None:
    guest.write(_MODEL_AT, model)
    guest.write(0x10, struct.pack("<II", _MODEL_AT, len(model)))
    assert guest.call("load", _MEMORY_BYTES, 1, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    assert guest.call("load", _WRAP, 1, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    assert guest.call("load", 0x10, 1, 1, 0, _OOB) == NnErrno.INVALID_ARGUMENT
    assert guest.call("load", 0x10, 0, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    assert guest.call("load", 0x10, 2, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    assert guest.call("load", 0x10, 0xFFFFFFFF, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    # A builder whose bytes run past memory, or wrap around it.
    guest.write(0x18, struct.pack("<II", _MODEL_AT, _MEMORY_BYTES))
    assert guest.call("load", 0x18, 1, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    guest.write(0x18, struct.pack("<II", _WRAP, 0x20))
    assert guest.call("load", 0x18, 1, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    guest.write(0x18, struct.pack("<II", _MODEL_AT, 0))
    assert guest.call("load", 0x18, 1, 1, 0, 0) == NnErrno.INVALID_ARGUMENT
    # Nothing was loaded by any of that: the first good load is graph 0.
    guest.write(0, b"\xff" * 4)
    assert guest.call("load", 0x10, 1, 1, 0, 0) == NnErrno.SUCCESS
    assert guest.u32(0) == 0


def test_unknown_encoding_and_load_by_name(guest: Guest, model: bytes) -> None:
    for encoding in (0, 2, 3, 4, 6, 255, 0x7FFFFFFF):
        assert guest.load(model, encoding=encoding) == NnErrno.INVALID_ENCODING
    guest.write(0x20, b"digits")
    assert guest.call("load_by_name", 0x20, 6, 0) == NnErrno.NOT_FOUND
    assert guest.call("load_by_name", _WRAP, 0x20, 0) == NnErrno.INVALID_ARGUMENT


def test_init_execution_context_checks_handle_and_pointer(guest: Guest, model: bytes) -> None:
    assert guest.call("init_execution_context", 0, 4) == NnErrno.INVALID_ARGUMENT  # no graph yet
    assert guest.load(model) == NnErrno.SUCCESS
    assert guest.call("init_execution_context", 1, 4) == NnErrno.INVALID_ARGUMENT
    assert guest.call("init_execution_context", 0xFFFFFFFF, 4) == NnErrno.INVALID_ARGUMENT
    assert guest.call("init_execution_context", 0, _OOB) == NnErrno.INVALID_ARGUMENT
    assert guest.call("init_execution_context", 0, 4) == NnErrno.SUCCESS


def test_set_input_with_hostile_tensors(guest: Guest, model: bytes) -> None:
    ctx = guest.ready_context(model)
    at = 0x200
    assert guest.call("set_input", ctx, 0, _OOB) == NnErrno.INVALID_ARGUMENT
    assert guest.call("set_input", ctx, 0, _WRAP) == NnErrno.INVALID_ARGUMENT
    assert guest.call("set_input", ctx + 1, 0, at) == NnErrno.INVALID_ARGUMENT
    assert guest.call("set_input", ctx, 1, guest.tensor(at, (1, 64), 1, 0x800, 256)) == _INVAL
    # Dimensions or data outside memory.
    guest.write(at, struct.pack("<IIB3xII", _OOB, 2, 1, 0x800, 256))
    assert guest.call("set_input", ctx, 0, at) == NnErrno.INVALID_ARGUMENT
    guest.write(at, struct.pack("<IIB3xII", at + 20, 0xFFFFFFFF, 1, 0x800, 256))
    assert guest.call("set_input", ctx, 0, at) == NnErrno.INVALID_ARGUMENT
    assert guest.call("set_input", ctx, 0, guest.tensor(at, (1, 64), 1, _OOB, 256)) == _INVAL
    assert guest.call("set_input", ctx, 0, guest.tensor(at, (1, 64), 1, _WRAP, 256)) == _INVAL
    # Shape, type and size that do not match the model's float32 [N, 64].
    for dims, type_, n in [
        ((1, 63), 1, 252),
        ((64,), 1, 256),
        ((1, 1, 64), 1, 256),
        ((1, 64), 3, 64),  # u8
        ((1, 64), 0, 128),  # f16
        ((1, 64), 6, 256),  # no such type
        ((1, 64), 1, 255),  # bytes do not match the shape
        ((2, 64), 1, 256),
    ]:
        assert guest.call("set_input", ctx, 0, guest.tensor(at, dims, type_, 0x800, n)) == _INVAL
    # Nonzero padding after the type tag is not the guest's problem.
    guest.write(at, struct.pack("<IIBBBBII", at + 20, 2, 1, 0xAA, 0xBB, 0xCC, 0x800, 256))
    guest.write(at + 20, struct.pack("<II", 1, 64))
    assert guest.call("set_input", ctx, 0, at) == NnErrno.SUCCESS


def test_compute_and_get_output_in_the_wrong_order_or_out_of_bounds(
    guest: Guest, model: bytes
) -> None:
    assert guest.load(model) == NnErrno.SUCCESS
    assert guest.call("init_execution_context", 0, 4) == NnErrno.SUCCESS
    assert guest.call("compute", 0) == NnErrno.INVALID_ARGUMENT  # input 0 not set
    assert guest.call("compute", 7) == NnErrno.INVALID_ARGUMENT
    assert guest.call("get_output", 0, 1, 0x800, 40, 8) == NnErrno.INVALID_ARGUMENT  # no compute
    ctx = guest.ready_context(model)
    assert guest.call("compute", ctx) == NnErrno.SUCCESS
    assert guest.call("get_output", ctx, 2, 0x800, 40, 8) == NnErrno.INVALID_ARGUMENT
    assert guest.call("get_output", ctx, 1, 0x800, 40, _OOB) == NnErrno.INVALID_ARGUMENT
    assert guest.call("get_output", ctx, 1, _OOB, 40, 8) == NnErrno.INVALID_ARGUMENT
    assert guest.call("get_output", ctx, 1, _WRAP, 0x20, 8) == NnErrno.INVALID_ARGUMENT
    # A declared buffer bigger than memory is refused even though the output would fit.
    assert guest.call("get_output", ctx, 1, 0x800, _MEMORY_BYTES, 8) == NnErrno.INVALID_ARGUMENT
    guest.write(0x800, b"\xee" * 64)
    assert guest.call("get_output", ctx, 1, 0x800, 39, 8) == NnErrno.TOO_LARGE
    assert guest.memory is not None
    assert bytes(guest.memory.read(guest.store, 0x800, 0x840)) == b"\xee" * 64  # untouched
    assert guest.call("get_output", ctx, 1, 0x800, 64, 8) == NnErrno.SUCCESS
    assert guest.u32(8) == 40  # float32 [1, 10]
    assert guest.call("get_output", ctx, 0, 0x800, 8, 8) == NnErrno.SUCCESS
    assert guest.u32(8) == 8  # int64 [1]


def test_limits_per_run(model: bytes) -> None:
    limits = NnLimits(
        max_graphs=2, max_contexts=3, max_model_bytes=len(model), max_tensor_bytes=256
    )
    rt = WasmRuntime(wasi_nn=WasiNn(limits=limits))
    guest = Guest(rt)
    try:
        assert guest.load(model) == NnErrno.SUCCESS
        assert guest.load(model) == NnErrno.SUCCESS
        assert guest.load(model) == NnErrno.BUSY
        assert guest.load(model + b"\x00") == NnErrno.TOO_LARGE
        for _ in range(3):
            assert guest.call("init_execution_context", 0, 4) == NnErrno.SUCCESS
        assert guest.call("init_execution_context", 1, 4) == NnErrno.BUSY
        at = 0x200
        assert guest.call("set_input", 0, 0, guest.tensor(at, (2, 64), 1, 0x800, 512)) == _BIG
        assert guest.call("set_input", 0, 0, guest.tensor(at, (1, 64), 1, 0x800, 256)) == _OK
        # A hostile shape is too large before its product is ever used as a size.
        dims = (0xFFFFFFFF, 64)
        assert guest.call("set_input", 0, 0, guest.tensor(at, dims, 1, 0x800, 256)) == _BIG
    finally:
        guest.close()
        rt.close()
    # The limits are per run: a new store starts with an empty table.
    rt = WasmRuntime(wasi_nn=WasiNn(limits=limits))
    guest = Guest(rt)
    try:
        assert guest.load(model) == NnErrno.SUCCESS
    finally:
        guest.close()
        rt.close()


def test_missing_memory_and_unbound_stores(runtime: WasmRuntime, model: bytes) -> None:
    no_memory = Guest(runtime, memory=False)
    try:
        assert no_memory.call("load", 0, 1, 1, 0, 0) == NnErrno.MISSING_MEMORY
    finally:
        no_memory.close()
    # A store the host did not bind (e.g. a persistent task's) gets an errno, not a trap.
    unbound = Guest(runtime, bind=False)
    try:
        assert unbound.load(model) == NnErrno.UNSUPPORTED_OPERATION
        assert unbound.call("compute", 0) == NnErrno.UNSUPPORTED_OPERATION
    finally:
        unbound.close()


def test_a_failing_backend_is_a_runtime_error_not_a_trap(model: bytes) -> None:
    def broken() -> OnnxRuntime:
        raise RuntimeError("no accelerator today")

    rt = WasmRuntime(wasi_nn=WasiNn(broken))
    guest = Guest(rt)
    try:
        assert guest.load(model) == NnErrno.RUNTIME_ERROR
    finally:
        guest.close()
        rt.close()


def test_handles_do_not_outlive_their_run(guest: Guest, model: bytes) -> None:
    ctx = guest.ready_context(model)
    assert guest.binding is not None
    guest.binding.close()
    assert guest.call("compute", ctx) == NnErrno.UNSUPPORTED_OPERATION


# -- the same module on the gateway ------------------------------------------------------------


def test_nn_digits_on_the_gateway_equals_running_it_locally(
    gateway: GatewayProcess, nn_digits: bytes, model: bytes, held_out: np.ndarray
) -> None:
    stdin = _stdin(model, held_out[:16])
    runtime = WasmRuntime()
    local = runtime.run(_sha(nn_digits), wasm=nn_digits, stdin=stdin, limits=WasmLimits())
    runtime.close()
    with gateway.client() as client:
        run = client.run_wasm(nn_digits, stdin=stdin, where="edge")
    assert run.where == "edge"
    assert run.gateway_id == gateway.gateway_id
    assert (run.exit_code, run.stderr) == (0, b"")
    assert local.exit_code == 0
    np.testing.assert_allclose(_parse(run.stdout)[2], _parse(local.stdout)[2], rtol=1e-5)
    assert _parse(run.stdout)[1] == _parse(local.stdout)[1]
