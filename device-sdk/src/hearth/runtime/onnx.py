"""ONNX models under onnxruntime: named tensors in, named tensors out.

Sessions are cached per model hash. The execution provider is the best one this machine has
(``PROVIDER_PREFERENCE``); if it fails to load a model the next one is tried, down to the CPU,
and the provider that actually runs is reported with every result.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hearth.errors import ErrorCode, JobError, LocalRuntimeUnavailable
from hearth.protocol.messages import Dtype, Tensor
from hearth.runtime._blob import verified_bytes

try:
    import numpy as np
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only without the `local` extra
    np = None  # type: ignore[assignment]
    ort = None

__all__ = [
    "PROVIDER_PREFERENCE",
    "OnnxRuntime",
    "Signature",
    "array_to_tensor",
    "select_providers",
    "tensor_to_array",
]

log = logging.getLogger(__name__)

# Best first. TensorRT and CUDA for NVIDIA boxes, OpenVINO for Intel iGPU/NPU, CoreML on a Mac,
# DirectML on Windows, then the CPU, which is always there.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
_CPU = "CPUExecutionProvider"

# ONNX tensor element types (as onnxruntime names them) to protocol dtypes.
_ORT_TO_DTYPE = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def select_providers(
    available: Sequence[str], preference: Sequence[str] = PROVIDER_PREFERENCE
) -> list[str]:
    """The available providers in preference order, always ending with the CPU.

    >>> select_providers(["CPUExecutionProvider", "CUDAExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    chosen = [p for p in preference if p in available and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    return chosen


def tensor_to_array(tensor: Tensor) -> Any:
    """A read-only numpy view of a protocol Tensor, after checking its byte length."""
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise JobError(
            ErrorCode.BAD_TENSOR,
            f"tensor {tensor.name!r}: {len(tensor.data)} bytes, shape {tensor.shape} "
            f"of {tensor.dtype} needs {expected}",
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


_DTYPES = frozenset(_ORT_TO_DTYPE.values())


def array_to_tensor(name: str, array: Any) -> Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.name not in _DTYPES:
        raise JobError(
            ErrorCode.BAD_TENSOR,
            f"tensor {name!r} has type {array.dtype}, not one of the protocol's numeric dtypes",
        )
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return Tensor(
        name=name,
        dtype=cast(Dtype, str(np.dtype(dtype.name))),
        shape=list(array.shape),
        data=array.astype(dtype, copy=False).tobytes(),
    )


def _warm_up(session: Any, inputs: dict[str, tuple[str, list[int | str | None]]]) -> bool:
    """Run the model once on zeros (free dimensions as 1), so that the first real job does not
    pay for onnxruntime's lazy initialisation (kernel selection, arena growth; on a GPU the
    CUDA context and cuDNN autotuning). Best effort: a model that cannot run on such an input
    (a minimum image size, say) is simply not warmed; returns whether the run succeeded."""
    try:
        feeds = {
            name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in shape], dtype)
            for name, (dtype, shape) in inputs.items()
        }
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any failure only means "not warmed"
        log.debug("warm-up run skipped: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
        return False
    return True


def _load_error(exc: Exception) -> str:
    """One line on why a session could not be made. Accelerator providers put a C++ signature
    on the first line and the reason on the last ("CPU plug-in doesn't support ..."): keep
    the first line when it is short, else the last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return repr(exc)
    line = lines[0] if len(lines[0]) <= 200 or len(lines) == 1 else lines[-1]
    return line[:300]


Signature = tuple[str, str, list[int | str]]  # name, dtype, shape


def _signature(args: Any) -> list[Signature]:
    return [
        (a.name, _ORT_TO_DTYPE.get(a.type, a.type), [d if d is not None else "" for d in a.shape])
        for a in args
    ]


@dataclass(frozen=True, slots=True)
class _Loaded:
    session: Any  # ort.InferenceSession
    provider: str
    inputs: dict[str, tuple[str, list[int | str | None]]]  # name -> (dtype, shape)
    outputs: tuple[str, ...]


class OnnxRuntime:
    """Cached onnxruntime sessions keyed by model sha256. Thread-safe; ``close()`` idempotent."""

    def __init__(
        self,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        max_cached: int = 16,
        provider_options: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if ort is None:
            raise LocalRuntimeUnavailable(
                "ONNX needs onnxruntime and numpy: pip install 'hearth-device-sdk[local]'"
            )
        self.providers = list(providers or select_providers(ort.get_available_providers()))
        self._intra_op_threads = intra_op_threads
        # Per provider, e.g. {"OpenVINOExecutionProvider": {"device_type": "GPU"}}.
        self._provider_options = {k: dict(v) for k, v in (provider_options or {}).items()}
        self._max_cached = max_cached
        self._sessions: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._sessions

    def load(self, sha256: str, model: bytes | None = None, path: Path | None = None) -> str:
        """Make ``sha256`` runnable; returns the provider that will run it."""
        return self._loaded(sha256, model, path).provider

    def signature(
        self, sha256: str, model: bytes | None = None, path: Path | None = None
    ) -> tuple[list[Signature], list[Signature]]:
        """The model's inputs and outputs, (name, dtype, shape) each, as its session reports
        them: a Dtype name where there is one, a symbolic dimension by its name ("" if none)."""
        session = self._loaded(sha256, model, path).session
        return _signature(session.get_inputs()), _signature(session.get_outputs())

    def _loaded(self, sha256: str, model: bytes | None, path: Path | None) -> _Loaded:
        with self._lock:
            loaded = self._sessions.get(sha256)
            if loaded is not None:
                self._sessions.move_to_end(sha256)
                return loaded
        model = verified_bytes(sha256, model, path, what="model", missing=ErrorCode.INVALID_MODEL)
        loaded = self._create_session(model)
        with self._lock:
            self._sessions[sha256] = loaded
            while len(self._sessions) > self._max_cached:
                self._sessions.popitem(last=False)
        return loaded

    def _create_session(self, model: bytes) -> _Loaded:
        options = ort.SessionOptions()
        if self._intra_op_threads:
            options.intra_op_num_threads = self._intra_op_threads
        options.inter_op_num_threads = 1
        last_error = "no execution provider"
        # Try providers best-first: a CUDA or TensorRT provider that cannot load (missing
        # libraries, unsupported operator) must not take the model down with it.
        for index, provider in enumerate(self.providers):
            providers = self.providers[index:]
            try:
                session = self._session(model, options, providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises many unrelated types
                last_error = _load_error(exc)
                if "INVALID_PROTOBUF" in last_error or "INVALID_GRAPH" in last_error:
                    break  # the model itself is bad: no provider will help
                log.info("provider %s could not load model: %s", provider, last_error)
                continue
            actual = session.get_providers()[0]
            inputs = {
                i.name: (_ORT_TO_DTYPE.get(i.type, i.type), list(i.shape))
                for i in session.get_inputs()
            }
            outputs = tuple(o.name for o in session.get_outputs())
            if not _warm_up(session, inputs) and actual != _CPU:
                # A failed run can leave an accelerator's session broken: onnxruntime-openvino
                # 1.24 then returns all-NaN outputs (or errors) for every later input, one
                # session in three for PP-OCRv4's recogniser, whose pooling refuses the warm-up's
                # 1-pixel image. So that session is not kept; a fresh one starts cold.
                session = self._session(model, options, providers)
            return _Loaded(session, actual, inputs, outputs)
        raise JobError(ErrorCode.INVALID_MODEL, last_error)

    def _session(self, model: bytes, options: Any, providers: list[str]) -> Any:
        return ort.InferenceSession(
            model,
            sess_options=options,
            providers=providers,
            provider_options=[self._provider_options.get(p, {}) for p in providers],
        )

    def _failed(self, sha256: str, loaded: _Loaded, exc: Exception) -> JobError:
        """The job's error for a run that raised; an accelerator's session is dropped (made
        again on next use), as after a failed warm-up (see _create_session)."""
        if loaded.provider != _CPU:
            with self._lock:
                if self._sessions.get(sha256) is loaded:
                    del self._sessions[sha256]
        message = str(exc).strip().splitlines()[0][:300] if str(exc) else repr(exc)
        return JobError(ErrorCode.BAD_TENSOR, message)

    def run(
        self,
        sha256: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[str] = (),
        *,
        model: bytes | None = None,
        path: Path | None = None,
    ) -> tuple[list[Tensor], str]:
        """Run the model; returns (output tensors, provider). Raises JobError(BAD_TENSOR) for
        inputs that do not match the model's names, dtypes or shapes."""
        loaded = self._loaded(sha256, model, path)
        feeds = self._feeds(loaded, inputs)
        wanted = list(outputs) or list(loaded.outputs)
        unknown = [name for name in wanted if name not in loaded.outputs]
        if unknown:
            raise JobError(ErrorCode.BAD_TENSOR, f"unknown outputs {unknown}")
        try:
            results = loaded.session.run(wanted, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise self._failed(sha256, loaded, exc) from None
        tensors = [
            array_to_tensor(name, value) for name, value in zip(wanted, results, strict=True)
        ]
        return tensors, loaded.provider

    def run_arrays(
        self,
        sha256: str,
        feeds: Mapping[str, Any],
        outputs: Sequence[str] = (),
        *,
        model: bytes | None = None,
        path: Path | None = None,
    ) -> tuple[list[Any], str]:
        """Like ``run``, for trusted in-process callers (the vision capabilities): numpy arrays
        in and out by name, without the copies and checks a protocol Tensor needs. Returns
        (output arrays, provider); onnxruntime's complaints become JobError(BAD_TENSOR)."""
        loaded = self._loaded(sha256, model, path)
        wanted = list(outputs) or list(loaded.outputs)
        try:
            results = loaded.session.run(wanted, dict(feeds))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise self._failed(sha256, loaded, exc) from None
        return list(results), loaded.provider

    def metadata(
        self, sha256: str, *, model: bytes | None = None, path: Path | None = None
    ) -> dict[str, str]:
        """The model's custom metadata (``metadata_props``), e.g. a recogniser's alphabet."""
        loaded = self._loaded(sha256, model, path)
        return dict(loaded.session.get_modelmeta().custom_metadata_map)

    def input_specs(
        self, sha256: str, *, model: bytes | None = None, path: Path | None = None
    ) -> list[tuple[str, str, list[int | str | None]]]:
        """The model's inputs in the model's order: (name, dtype, shape); a dimension is an
        int when fixed, else a symbolic name or None."""
        loaded = self._loaded(sha256, model, path)
        return [(name, dtype, list(shape)) for name, (dtype, shape) in loaded.inputs.items()]

    @staticmethod
    def _feeds(loaded: _Loaded, inputs: Sequence[Tensor]) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for tensor in inputs:
            spec = loaded.inputs.get(tensor.name)
            if spec is None:
                raise JobError(
                    ErrorCode.BAD_TENSOR,
                    f"model has no input {tensor.name!r} (inputs: {sorted(loaded.inputs)})",
                )
            dtype, shape = spec
            if tensor.dtype != dtype:
                raise JobError(
                    ErrorCode.BAD_TENSOR, f"input {tensor.name!r} is {dtype}, got {tensor.dtype}"
                )
            if len(shape) != len(tensor.shape) or any(
                isinstance(want, int) and want != got
                for want, got in zip(shape, tensor.shape, strict=True)
            ):
                raise JobError(
                    ErrorCode.BAD_TENSOR,
                    f"input {tensor.name!r} has shape {shape}, got {tensor.shape}",
                )
            feeds[tensor.name] = tensor_to_array(tensor)
        missing = set(loaded.inputs) - set(feeds)
        if missing:
            raise JobError(ErrorCode.BAD_TENSOR, f"missing inputs {sorted(missing)}")
        return feeds

    def forget(self, sha256: str) -> None:
        """Drop ``sha256``'s session (it is made again on next use)."""
        with self._lock:
            self._sessions.pop(sha256, None)

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
