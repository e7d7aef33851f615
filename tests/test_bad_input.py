"""Bad input from the network: each case gets its error code back, the gateway stays up, and the
next good job works."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from hearth.errors import ErrorCode
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    Describe,
    Error,
    OnnxJob,
    Tensor,
    WasmJob,
    WasmResult,
    encode,
)
from helpers import RawDevice
from testkit.gateway import GatewayProcess


@pytest.fixture
def device(gateway: GatewayProcess):
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        yield dev


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _upload(dev: RawDevice, data: bytes) -> str:
    reply = dev.upload(data)
    assert isinstance(reply, BlobStored), reply
    return reply.sha256


def _good_job_still_works(dev: RawDevice, wasm: dict[str, Path], gateway: GatewayProcess) -> None:
    sha = _upload(dev, wasm["echo"].read_bytes())
    reply = dev.request(WasmJob(job_id=os.urandom(6).hex(), module=sha, stdin=b"still here"))
    assert isinstance(reply, WasmResult), reply
    assert reply.stdout == b"still here"
    assert gateway.proc is not None
    assert gateway.proc.poll() is None


def _error(reply: object, code: ErrorCode) -> Error:
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply
    assert reply.message
    return reply


def test_malformed_envelope(device: RawDevice, gateway, wasm) -> None:
    for payload in (
        b"",
        b"\xc1garbage",
        b"not msgpack at all",
        msgspec.msgpack.encode([1, 2]),
        msgspec.msgpack.encode({"type": "wasm", "v": 1, "job_id": "x"}),
        msgspec.msgpack.encode({"type": "nonsense", "v": 1}),
        msgspec.msgpack.encode({"type": "wasm", "v": 1, "job_id": "../../etc", "module": "0" * 64}),
    ):
        _error(device.request(payload), ErrorCode.MALFORMED)
    _good_job_still_works(device, wasm, gateway)


def test_unknown_schema_version(device: RawDevice, gateway, wasm) -> None:
    payload = msgspec.msgpack.encode(
        {"type": "wasm", "v": 2, "job_id": "a", "module": "0" * 64, "new_field": [1]}
    )
    _error(device.request(payload), ErrorCode.UNSUPPORTED_VERSION)
    _good_job_still_works(device, wasm, gateway)


def test_blob_whose_bytes_do_not_match_its_hash(device: RawDevice, gateway, wasm) -> None:
    data = wasm["echo"].read_bytes()
    _error(device.upload(data, sha256=_sha(b"something else")), ErrorCode.HASH_MISMATCH)
    reply = device.request(WasmJob(job_id="j1", module=_sha(b"something else")))
    assert type(reply).__name__ == "NeedBlob"  # nothing was stored under the wrong name
    _good_job_still_works(device, wasm, gateway)
    assert ("blob", _sha(b"something else"), "refused") in _audit(gateway)


def test_truncated_upload(device: RawDevice, gateway, wasm) -> None:
    data = wasm["echo"].read_bytes()
    sha = _sha(data)
    device.send(BlobChunk(sha256=sha, size=len(data), offset=0, data=data[:1000]))
    skipped = device.send(BlobChunk(sha256=sha, size=len(data), offset=2000, data=data[2000:]))
    _error(device.reply(skipped), ErrorCode.BLOB_INCOMPLETE)
    reply = device.request(WasmJob(job_id="j2", module=sha))
    assert type(reply).__name__ == "NeedBlob"
    _good_job_still_works(device, wasm, gateway)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00asm\x01\x00\x00\x00\xff\xff",
        b"MZ not wasm",
        b"\x00asm",
        b'(module (func (export "_start")))',
    ],
    ids=["corrupt", "not-wasm", "header-only", "text"],
)
def test_invalid_wasm(device: RawDevice, gateway, wasm, payload: bytes) -> None:
    sha = _upload(device, payload)
    _error(device.request(WasmJob(job_id="bad", module=sha)), ErrorCode.INVALID_MODULE)
    _good_job_still_works(device, wasm, gateway)


def test_invalid_onnx(device: RawDevice, gateway, wasm) -> None:
    sha = _upload(device, b"\x08\x07this is not a protobuf model" * 10)
    tensor = Tensor(name="input", dtype="float32", shape=[1, 64], data=bytes(256))
    _error(
        device.request(OnnxJob(job_id="bad", model=sha, inputs=[tensor])), ErrorCode.INVALID_MODEL
    )
    _good_job_still_works(device, wasm, gateway)


@pytest.mark.parametrize(
    ("module", "code"),
    [
        ("trap", ErrorCode.TRAP),
        ("spin", ErrorCode.TIMEOUT),
        ("memhog", ErrorCode.MEMORY_LIMIT),
        ("flood", ErrorCode.OUTPUT_LIMIT),
    ],
)
def test_hostile_wasm(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm, module: str, code: ErrorCode
) -> None:
    # Tight limits keep the test quick; the mapping to codes is what is under test.
    policy = tmp_path / "tight.toml"
    policy.write_text(
        "[wasm]\nfuel = 200_000_000\nmemory_bytes = 33_554_432\noutput_bytes = 65_536\n"
    )
    gw = make_gateway("--policy", str(policy))
    with RawDevice(gw.listen, gw.gateway_id) as dev:
        sha = _upload(dev, wasm[module].read_bytes())
        _error(dev.request(WasmJob(job_id=module, module=sha)), code)
        _good_job_still_works(dev, wasm, gw)


def test_oversized_payload(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm
) -> None:
    policy = tmp_path / "small.toml"
    policy.write_text("[limits]\nmax_message_bytes = 65_536\nmax_blob_bytes = 1_000_000\n")
    gw = make_gateway("--policy", str(policy))
    with RawDevice(gw.listen, gw.gateway_id) as dev:
        sha = _upload(dev, wasm["echo"].read_bytes())
        big = WasmJob(job_id="big", module=sha, stdin=os.urandom(100_000))
        _error(dev.request(encode(big)), ErrorCode.TOO_LARGE)
        huge_blob = BlobChunk(sha256="0" * 64, size=2_000_000, offset=0, data=b"x")
        _error(dev.request(huge_blob), ErrorCode.TOO_LARGE)
        _good_job_still_works(dev, wasm, gw)


@pytest.mark.parametrize(
    ("tensor", "why"),
    [
        (Tensor(name="input", dtype="float64", shape=[2, 64], data=bytes(2 * 64 * 8)), "float32"),
        (Tensor(name="input", dtype="float32", shape=[2, 63], data=bytes(2 * 63 * 4)), "shape"),
        (Tensor(name="input", dtype="float32", shape=[2, 64], data=bytes(10)), "bytes"),
        (Tensor(name="nope", dtype="float32", shape=[2, 64], data=bytes(512)), "no input"),
        (Tensor(name="input", dtype="float32", shape=[64], data=bytes(256)), "shape"),
    ],
    ids=["dtype", "shape", "short-data", "unknown-name", "rank"],
)
def test_tensor_with_wrong_dtype_or_shape(
    device: RawDevice, gateway, wasm, examples, tensor: Tensor, why: str
) -> None:
    sha = _upload(device, (examples / "models" / "digits.onnx").read_bytes())
    error = _error(
        device.request(OnnxJob(job_id="t", model=sha, inputs=[tensor])), ErrorCode.BAD_TENSOR
    )
    assert why in error.message
    x = np.load(examples / "models" / "digits_test_X.npy")[:2]
    ok = device.request(
        OnnxJob(
            job_id="t-ok",
            model=sha,
            inputs=[Tensor(name="input", dtype="float32", shape=[2, 64], data=x.tobytes())],
        )
    )
    assert type(ok).__name__ == "OnnxResult"
    _good_job_still_works(device, wasm, gateway)


def test_reply_topic_of_another_device_is_refused(device: RawDevice, gateway, wasm) -> None:
    other = RawDevice(gateway.listen, gateway.gateway_id)
    try:
        device.send(b"\x80", response_topic=f"hearth/v1/dev/{other.client_id}/reply")
        with pytest.raises(queue.Empty):
            other.replies.get(timeout=1.0)
    finally:
        other.close()
    _good_job_still_works(device, wasm, gateway)


def test_a_stored_blob_that_fails_its_hash_is_refused_and_asked_for_again(
    device: RawDevice, gateway, wasm
) -> None:
    data = wasm["echo"].read_bytes()
    sha = _upload(device, data)
    stored = gateway.state_dir / "blobs" / sha[:2] / sha
    stored.write_bytes(data[:-10] + b"tampered!!")  # changed on disk behind the gateway's back
    _error(device.request(WasmJob(job_id="t1", module=sha)), ErrorCode.HASH_MISMATCH)
    reply = device.request(WasmJob(job_id="t2", module=sha))
    assert type(reply).__name__ == "NeedBlob"  # removed: the device re-uploads it
    _good_job_still_works(device, wasm, gateway)
    assert ("blob", sha, "refused") in _audit(gateway)


def test_describe_of_a_tampered_blob_is_refused_and_the_blob_asked_for_again(
    device: RawDevice, gateway, wasm
) -> None:
    data = wasm["echo"].read_bytes()
    sha = _upload(device, data)
    stored = gateway.state_dir / "blobs" / sha[:2] / sha
    stored.write_bytes(data[:-10] + b"tampered!!")
    _error(device.request(Describe(job_id="d1", blob=sha)), ErrorCode.HASH_MISMATCH)
    reply = device.request(Describe(job_id="d2", blob=sha))
    assert type(reply).__name__ == "NeedBlob"
    _good_job_still_works(device, wasm, gateway)


def _audit(gateway: GatewayProcess) -> list[tuple[str, str, str]]:
    """(action, target, decision) of each audit entry, as `hearth-gateway audit` shows them."""
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "audit",
            "--json",
            "--state-dir",
            str(gateway.state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    entries = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    return [(e["action"], e["target"], e["decision"]) for e in entries]


def test_a_result_over_the_message_limit_is_answered_with_too_large(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm
) -> None:
    policy = tmp_path / "small.toml"
    policy.write_text("[limits]\nmax_message_bytes = 200_000\n")
    gw = make_gateway("--policy", str(policy))
    with RawDevice(gw.listen, gw.gateway_id) as dev:
        sha = _upload(dev, wasm["mandelbrot"].read_bytes())
        # A 640x480 picture is 307 kB of output: within the WASM output limit, over the message.
        _error(
            dev.request(WasmJob(job_id="big-out", module=sha, args=["640", "480", "10"])),
            ErrorCode.TOO_LARGE,
        )
        _good_job_still_works(dev, wasm, gw)


def _model_bytes(
    make_initializer: Callable[[], object] | None = None, *, op: str = "Add", domain: str = ""
) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((4,), np.float32), "w")
    if make_initializer is not None:
        make_initializer(weight)  # type: ignore[misc]
    node = helper.make_node(op, ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("location", ["/etc/hostname", "../../../etc/hostname", "weights.bin"])
def test_onnx_external_data_is_refused(device: RawDevice, gateway, wasm, location: str) -> None:
    """Models are loaded from their bytes: no external-data reference can reach a file."""
    from onnx import TensorProto

    def external(weight: object) -> None:
        weight.ClearField("raw_data")  # type: ignore[attr-defined]
        weight.data_location = TensorProto.EXTERNAL  # type: ignore[attr-defined]
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()  # type: ignore[attr-defined]
            entry.key, entry.value = key, value

    sha = _upload(device, _model_bytes(external))
    tensor = Tensor(name="x", dtype="float32", shape=[4], data=bytes(16))
    _error(
        device.request(OnnxJob(job_id="ext", model=sha, inputs=[tensor])), ErrorCode.INVALID_MODEL
    )
    _good_job_still_works(device, wasm, gateway)


def test_onnx_custom_operators_cannot_be_loaded(device: RawDevice, gateway, wasm) -> None:
    sha = _upload(device, _model_bytes(op="Exfiltrate", domain="com.example.evil"))
    tensor = Tensor(name="x", dtype="float32", shape=[4], data=bytes(16))
    _error(
        device.request(OnnxJob(job_id="custom", model=sha, inputs=[tensor])),
        ErrorCode.INVALID_MODEL,
    )
    _good_job_still_works(device, wasm, gateway)


def test_wasm_cannot_reach_files_or_the_environment(gateway, wasm) -> None:
    """WASM that tries to open files outside any scratch directory, list /, or read the
    environment fails cleanly, inside the module: the job itself succeeds."""
    with gateway.client() as client:
        run = client.run_wasm(wasm["escape"])
    assert run.exit_code == 0
    assert run.stdout.decode().splitlines() == [
        "read /etc/passwd: denied",
        "write escape.txt: denied",
        "list /: denied",
        "environment: denied",
    ]
