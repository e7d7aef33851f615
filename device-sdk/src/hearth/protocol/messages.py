"""Protocol v1 messages: typed, versioned, validated on decode.

Every message is a MessagePack map whose ``type`` key selects the struct below and whose ``v``
key is the schema version (``PROTOCOL_VERSION``). Binary fields (stdin, tensors, module bytes)
are MessagePack ``bin``: they never take a detour through base64. docs/protocol.md is the same
contract written for implementers in other languages; tests/test_protocol_doc.py keeps the two in
step.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from hearth.errors import ErrorCode

__all__ = [
    "PROTOCOL_VERSION",
    "BlobChunk",
    "BlobStored",
    "DataClass",
    "Dtype",
    "Error",
    "GatewayStatus",
    "NeedBlob",
    "OnnxJob",
    "OnnxResult",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "Tensor",
    "Timing",
    "WasmJob",
    "WasmResult",
]

PROTOCOL_VERSION = 1

DataClass = Literal["private", "public"]

# A sha256 digest as 64 lowercase hex characters: how modules and models are named forever.
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
# Job ids are chosen by the device and scoped to it; keep them safe inside topics and logs.
JobId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.-]{1,64}$")]
SHA256_RE = re.compile("^[0-9a-f]{64}$")

Dtype = Literal[
    "float32", "float64", "float16", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
]  # fmt: skip
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _Message(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    v: int = PROTOCOL_VERSION


class Tensor(msgspec.Struct, frozen=True):
    """A dense tensor: little-endian, C order, ``data`` is exactly prod(shape) * itemsize bytes."""

    name: str
    dtype: Dtype
    shape: list[NonNegative]
    data: bytes


class Timing(msgspec.Struct, frozen=True):
    """Where the gateway spent a job's time, in milliseconds."""

    queue_ms: float = 0.0
    run_ms: float = 0.0


# --- requests: device -> gateway, on hearth/v1/gw/{gateway}/req/{client} ---------------------


class Ping(_Message, frozen=True, tag="ping"):
    """Round-trip probe; answered with Pong. Devices use it to measure latency and load."""


class WasmJob(_Message, frozen=True, tag="wasm"):
    """Run a WASI command module (named by hash) with args and stdin."""

    job_id: JobId
    module: Sha256
    args: list[str] = []
    stdin: bytes = b""
    data_class: DataClass = "private"


class OnnxJob(_Message, frozen=True, tag="onnx"):
    """Run an ONNX model (named by hash) on named input tensors."""

    job_id: JobId
    model: Sha256
    inputs: list[Tensor]
    outputs: list[str] = []  # empty: all of the model's outputs
    data_class: DataClass = "private"


class BlobChunk(_Message, frozen=True, tag="blob"):
    """One chunk of a content-addressed upload. Chunks are sent in order; the gateway answers
    the last one (``offset + len(data) == size``) with BlobStored, or any one with an Error."""

    sha256: Sha256
    size: NonNegative
    offset: NonNegative
    data: bytes


Request = Ping | WasmJob | OnnxJob | BlobChunk


# --- replies: gateway -> device, on the request's Response Topic ------------------------------


class Pong(_Message, frozen=True, tag="pong"):
    gateway_id: str
    queue_depth: int
    workers: int
    load: float  # jobs queued or running per worker


class WasmResult(_Message, frozen=True, tag="wasm_result"):
    job_id: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    timing: Timing = Timing()


class OnnxResult(_Message, frozen=True, tag="onnx_result"):
    job_id: str
    outputs: list[Tensor]
    provider: str  # the onnxruntime execution provider that ran it
    timing: Timing = Timing()


class NeedBlob(_Message, frozen=True, tag="need_blob"):
    """The job names a blob the gateway does not hold: upload it, then send the job again."""

    job_id: str
    sha256: str
    max_chunk: int  # bytes of ``data`` per BlobChunk the gateway accepts


class BlobStored(_Message, frozen=True, tag="blob_stored"):
    sha256: str
    size: int


class Error(_Message, frozen=True, tag="error"):
    code: ErrorCode
    message: str
    job_id: str | None = None


Reply = Pong | WasmResult | OnnxResult | NeedBlob | BlobStored | Error


# --- retained status: hearth/v1/gw/{gateway}/status -------------------------------------------


class GatewayStatus(_Message, frozen=True, tag="status"):
    """Retained on the status topic. The gateway's MQTT Last Will publishes the same message with
    ``state="offline"`` so devices learn at once that a gateway died."""

    gateway_id: str
    state: Literal["online", "offline"]
    version: str = ""
    runners: list[str] = []
    providers: list[str] = []  # onnxruntime execution providers, best first
    workers: int = 0
    queue_depth: int = 0
    load: float = 0.0
    max_message_bytes: int = 0
    started_at: float = 0.0  # unix seconds
