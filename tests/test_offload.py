"""The offload path end to end: real Mosquitto, real gateway daemon, real wasmtime and
onnxruntime."""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest

import hearth
from hearth.errors import ErrorCode
from hearth.protocol import (
    BlobChunk,
    Describe,
    Described,
    Error,
    NeedBlob,
    TensorInfo,
    WasmExport,
    WasmImport,
    WasmJob,
    WasmResult,
    decode_request,
    decode_status,
)
from hearth.runtime.wasm import WasmRuntime
from hearth.transport import connect, make_client
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until


def test_discovery_finds_the_gateway_on_loopback(make_gateway) -> None:
    gw = make_gateway("--mdns-interface", "127.0.0.1")
    found = hearth.discover(3.0, interface="127.0.0.1")
    mine = [g for g in found if g.gateway_id == gw.gateway_id]
    assert mine, f"gateway {gw.gateway_id} not among {[g.gateway_id for g in found]}"
    info = mine[0]
    assert str(info.broker) == gw.address
    assert info.runners == ["wasm", "onnx", "task", "vision", "migrate"]
    assert "cpu" in info.accelerators
    assert info.rtt_ms is not None
    assert info.rtt_ms > 0


def test_wasm_job_output_equals_running_the_module_locally(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    frame = _pgm(64, 48)
    runtime = WasmRuntime()
    module = wasm["imgfilter"].read_bytes()
    local = runtime.run(
        hashlib.sha256(module).hexdigest(), wasm=module, args=["edges"], stdin=frame
    )
    runtime.close()
    with gateway.client() as client:
        run = client.run_wasm(wasm["imgfilter"], stdin=frame, args=["edges"])
    assert run.where == "edge"
    assert run.gateway_id == gateway.gateway_id
    assert (run.exit_code, run.stdout, run.stderr) == (local.exit_code, local.stdout, local.stderr)
    assert run.stdout.startswith(b"P5\n64 48\n255\n")


def test_wasm_exit_code_and_args_cross_intact(gateway: GatewayProcess, wasm) -> None:
    with gateway.client() as client:
        run = client.run_wasm(wasm["echo"], stdin=b"\x00binary\xff", args=["--exit", "7", "a b"])
    assert run.exit_code == 7
    assert run.stdout == b"\x00binary\xffa b\n"
    assert run.stderr == b"echo: done\n"


def test_onnx_job_outputs_equal_direct_onnxruntime(gateway: GatewayProcess, examples) -> None:
    model = examples / "models" / "digits.onnx"
    x = np.load(examples / "models" / "digits_test_X.npy")[:50]
    direct = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probabilities = direct.run(["label", "probabilities"], {"input": x})
    with gateway.client() as client:
        result = client.infer(model, {"input": x})
    assert result.where == "edge"
    assert result.provider == "CPUExecutionProvider"
    np.testing.assert_array_equal(result.outputs["label"], label)
    np.testing.assert_allclose(result.outputs["probabilities"], probabilities, rtol=1e-5, atol=1e-6)


def test_module_bytes_cross_the_network_once(gateway: GatewayProcess, broker, wasm) -> None:
    """Count blob chunks on the wire with an independent subscriber, not the SDK's own stats."""
    chunks: list[BlobChunk] = []
    jobs: list[WasmJob] = []
    spy = make_client(f"spy-{uuid.uuid4().hex[:6]}")
    subscribed = threading.Event()
    spy.on_subscribe = lambda *_: subscribed.set()

    def seen(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        message = decode_request(msg.payload)
        if isinstance(message, BlobChunk):
            chunks.append(message)
        elif isinstance(message, WasmJob):
            jobs.append(message)

    spy.on_message = seen
    connect(
        spy,
        broker.address,
        on_connected=lambda: spy.subscribe(f"hearth/v1/gw/{gateway.gateway_id}/req/+", 1),
    )
    assert subscribed.wait(5)
    try:
        with gateway.client() as client:
            for i in range(3):
                run = client.run_wasm(wasm["echo"], stdin=f"frame {i}".encode())
                assert run.stdout == f"frame {i}".encode()
        size = wasm["echo"].stat().st_size
        assert wait_until(lambda: len(jobs) >= 4)
        assert sum(len(c.data) for c in chunks) == size  # the module, once
        # first job, its retry after the upload, then two jobs carrying only the hash
        assert len(jobs) == 4
        assert all(len(j.module) == 64 for j in jobs)
    finally:
        spy.disconnect()
        spy.loop_stop()


def test_a_job_id_seen_twice_returns_the_stored_answer(gateway: GatewayProcess, wasm) -> None:
    module = wasm["mandelbrot"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        assert dev.upload(module).sha256 == sha  # type: ignore[union-attr]
        job = WasmJob(job_id="same-id", module=sha, args=["64", "48", "50"])
        first = dev.request(job)
        second = dev.request(job)
    assert isinstance(first, WasmResult)
    assert isinstance(second, WasmResult)
    assert first == second  # byte-identical answer, including the original timing
    assert wait_until(lambda: gateway.snapshot().jobs_duplicate >= 1, timeout_s=10)
    assert gateway.snapshot().jobs_completed == 1  # it ran once


def test_a_job_id_re_used_with_other_content_is_a_conflict(gateway: GatewayProcess, wasm) -> None:
    with gateway.client() as client:
        first = client.run_wasm(wasm["echo"], stdin=b"one", job_id="re-used", where="edge")
    # Another client (another process, say) with the same id: the gateway's journal refuses it.
    with gateway.client() as other, pytest.raises(hearth.JobError) as info:
        other.run_wasm(wasm["echo"], stdin=b"two", job_id="re-used", where="edge")
    with gateway.client() as third:
        again = third.run_wasm(wasm["echo"], stdin=b"one", job_id="re-used", where="edge")
    assert info.value.code == hearth.ErrorCode.CONFLICT
    assert not info.value.code.retryable
    assert "re-used" in info.value.message
    assert first.stdout == again.stdout == b"one"
    assert again.timing == first.timing  # the stored answer, with its first timing
    assert wait_until(lambda: gateway.snapshot().jobs_duplicate >= 1, timeout_s=10)
    assert gateway.snapshot().jobs_completed == 1  # the job ran once


@pytest.mark.parametrize("where", ["local", "edge"])
def test_a_job_id_re_used_on_the_device_is_a_conflict_whichever_side_runs_it(
    gateway: GatewayProcess, wasm, where: str
) -> None:
    # The device's own runtime keeps no journal; the client remembers the ids it was given,
    # so one id means one job on both sides (the local side is the must-show).
    with gateway.client() as client:
        first = client.run_wasm(wasm["echo"], stdin=b"one", job_id=f"dev-{where}", where=where)
        same = client.run_wasm(wasm["echo"], stdin=b"one", job_id=f"dev-{where}", where=where)
        with pytest.raises(hearth.JobError) as info:
            client.run_wasm(wasm["echo"], stdin=b"two", job_id=f"dev-{where}", where="local")
        with pytest.raises(hearth.JobError) as async_info:
            client.run_wasm_async(
                wasm["echo"], stdin=b"two", job_id=f"dev-{where}", where=where
            ).result(timeout=30)
        other = client.run_wasm(wasm["echo"], stdin=b"two", job_id=f"new-{where}", where=where)
    assert first.stdout == same.stdout == b"one"
    assert other.stdout == b"two"
    for refused in (info.value, async_info.value):
        assert refused.code == hearth.ErrorCode.CONFLICT
        assert f"dev-{where}" in refused.message
        assert refused.job_id == f"dev-{where}"
    assert info.value.where == "local"


def test_a_re_sent_job_is_the_same_job_however_it_is_encoded(gateway: GatewayProcess, wasm) -> None:
    module = wasm["echo"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        dev.upload(module)
        first = dev.request(WasmJob(job_id="encoded", module=sha, stdin=b"x"))
        # Keys in another order, defaults left out: the same job, so its stored answer.
        same = {"stdin": b"x", "module": sha, "job_id": "encoded", "type": "wasm"}
        again = dev.request(msgspec.msgpack.encode(same))
        refused = dev.request(msgspec.msgpack.encode({**same, "args": ["y"]}))
    assert isinstance(first, WasmResult)
    assert again == first
    assert isinstance(refused, Error)
    assert (refused.code, refused.job_id) == (ErrorCode.CONFLICT, "encoded")


def test_gateway_status_is_retained_with_a_last_will(gateway: GatewayProcess, broker) -> None:
    states: list[str] = []
    watcher = make_client(f"watch-{uuid.uuid4().hex[:6]}")
    watcher.on_message = lambda _c, _u, m: states.append(decode_status(m.payload).state)
    topic = f"hearth/v1/gw/{gateway.gateway_id}/status"
    connect(watcher, broker.address, on_connected=lambda: watcher.subscribe(topic, 1))
    try:
        assert wait_until(lambda: states[-1:] == ["online"])  # retained: arrives on subscribe
        gateway.kill()  # SIGKILL: no goodbye, only the Last Will
        assert wait_until(lambda: states[-1:] == ["offline"], timeout_s=10)
    finally:
        watcher.disconnect()
        watcher.loop_stop()


@pytest.mark.slow
def test_sigkill_mid_stream_every_job_still_completes_locally(
    gateway: GatewayProcess, wasm
) -> None:
    results: list[hearth.WasmRun] = []
    with gateway.client(placement="auto", timeout_s=5.0) as client:
        # Make sure the module is on the gateway and auto placement prefers it.
        first = client.run_wasm(wasm["mandelbrot"], args=["160", "120", "200"])
        assert first.where == "edge"
        futures = []
        for i in range(40):
            futures.append(
                client.run_wasm_async(wasm["mandelbrot"], args=["160", "120", "200"], where="auto")
            )
            if i == 10:
                gateway.kill()
        results = [f.result(timeout=60) for f in futures]
    expected = first.stdout
    assert all(r.stdout == expected and r.exit_code == 0 for r in results)
    local = [r for r in results if r.where == "local"]
    assert local, "after the SIGKILL some jobs must have run on the device"
    assert all(r.reason for r in local)
    assert any("fallback" in r.reason or "no gateway" in r.reason for r in local)


def test_no_gateway_runs_locally_and_says_so(wasm) -> None:
    with hearth.Client("127.0.0.1:1", placement="auto", timeout_s=1.0) as client:
        run = client.run_wasm(wasm["echo"], stdin=b"x")
    assert run.where == "local"
    assert run.reason == "no gateway reachable"
    assert run.stdout == b"x"


def test_where_edge_without_gateway_raises(wasm) -> None:
    with (
        hearth.Client("127.0.0.1:1", timeout_s=1.0) as client,
        pytest.raises(hearth.GatewayUnavailable),
    ):
        client.run_wasm(wasm["echo"], where="edge")


def test_auto_placement_measures_both_sides_then_decides(gateway: GatewayProcess, wasm) -> None:
    with gateway.client(placement="auto") as client:
        runs = [client.run_wasm(wasm["noop"]) for _ in range(7)]
    assert [r.where for r in runs[:4]] == ["edge", "edge", "local", "local"]
    assert [r.reason.split(":")[0] for r in runs[:4]] == [
        "warm-up",
        "measuring",
        "warm-up",
        "measuring",
    ]
    assert all("(measured)" in r.reason for r in runs[4:])


def test_async_calls_run_concurrently(gateway: GatewayProcess, wasm) -> None:
    with gateway.client(max_workers=8) as client:
        futures = [client.run_wasm_async(wasm["echo"], stdin=str(i).encode()) for i in range(16)]
        outputs = sorted(f.result(timeout=30).stdout for f in futures)
    assert outputs == sorted(str(i).encode() for i in range(16))


def _pgm(width: int, height: int) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    image = ((xx * 4 + yy * 2) % 256).astype(np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    return f"P5\n{width} {height}\n255\n".encode() + image.tobytes()


def test_a_large_model_is_uploaded_in_chunks_and_runs(
    gateway: GatewayProcess, broker, tmp_path: Path
) -> None:
    """A 4 MB model (over the SDK's 1 MiB chunk): several chunks, hash-checked on arrival."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = rng.standard_normal((1024, 1024)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1024])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    assert path.stat().st_size > 4_000_000
    chunks: list[BlobChunk] = []
    spy = make_client(f"spy-{uuid.uuid4().hex[:6]}")
    subscribed = threading.Event()
    spy.on_subscribe = lambda *_: subscribed.set()
    spy.on_message = lambda _c, _u, m: (
        chunks.append(r) if isinstance(r := decode_request(m.payload), BlobChunk) else None
    )
    connect(
        spy,
        broker.address,
        on_connected=lambda: spy.subscribe(f"hearth/v1/gw/{gateway.gateway_id}/req/+", 1),
    )
    assert subscribed.wait(5)
    try:
        x = rng.standard_normal((4, 1024)).astype(np.float32)
        with gateway.client() as client:
            result = client.infer(path, {"x": x})
        np.testing.assert_allclose(result.outputs["y"], x @ weights, rtol=1e-4, atol=1e-3)
        assert wait_until(lambda: sum(len(c.data) for c in chunks) == path.stat().st_size)
        assert len(chunks) == -(-path.stat().st_size // (1 << 20))  # 1 MiB each, in order
        assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
    finally:
        spy.disconnect()
        spy.loop_stop()


def test_private_work_is_never_offloaded_to_a_gateway_off_the_lan(wasm) -> None:
    """Decided before any connection: nothing is sent towards 198.51.100.7 (a documentation
    address, standing for a gateway on the Internet)."""
    with hearth.Client("198.51.100.7:1883", placement="auto", timeout_s=1.0) as client:
        run = client.run_wasm(wasm["echo"], stdin=b"private frame")
        assert run.where == "local"
        assert "private data stays on the LAN" in run.reason
        with pytest.raises(hearth.JobError) as refused:
            client.run_wasm(wasm["echo"], where="edge")
        assert refused.value.code == hearth.ErrorCode.FORBIDDEN
        assert client._link.current is None  # never connected
        assert client._link.last_failure == ""  # and never tried


def test_on_lan() -> None:
    from hearth._lan import on_lan

    for host in (
        "127.0.0.1",
        "::1",
        "192.168.1.20",
        "10.0.0.2",
        "172.16.5.4",
        "169.254.3.4",
        "fd00::1",
        "fe80::1",
        "localhost",
    ):
        assert on_lan(host), host
    for host in ("198.51.100.7", "8.8.8.8", "100.64.0.1", "2001:db8::1"):
        assert not on_lan(host), host


@pytest.mark.parametrize("where", ["edge", "local"])
def test_a_webassembly_text_module_is_refused_on_both_sides(
    gateway: GatewayProcess, tmp_path: Path, where: str
) -> None:
    # wasmtime would compile it; the protocol says binary only, on the gateway and the device.
    wat = tmp_path / "start.wat"
    wat.write_bytes(b'(module (func (export "_start")) (memory (export "memory") 1))')
    with gateway.client() as client, pytest.raises(hearth.JobError) as info:
        client.run_wasm(wat, where=where)
    assert info.value.code == hearth.ErrorCode.INVALID_MODULE
    assert info.value.where == where
    assert "WebAssembly text" in info.value.message


def test_describe_tells_a_model_s_inputs_and_outputs_and_a_module_s_imports_and_exports(
    gateway: GatewayProcess, examples: Path, wasm
) -> None:
    model = (examples / "models" / "digits.onnx").read_bytes()
    module = wasm["echo"].read_bytes()
    sha_model, sha_module = (hashlib.sha256(b).hexdigest() for b in (model, module))
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        asked = dev.request(Describe(job_id="d1", blob=sha_model))
        assert isinstance(asked, NeedBlob)
        assert asked.sha256 == sha_model
        dev.upload(model)
        dev.upload(module)
        described_model = dev.request(Describe(job_id="d2", blob=sha_model))
        described_module = dev.request(Describe(job_id="d3", blob=sha_module))
        dev.upload(b"neither a model nor a module")
        unknown = hashlib.sha256(b"neither a model nor a module").hexdigest()
        refused = dev.request(Describe(job_id="d4", blob=unknown))
    # What onnxruntime itself says of the model.
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert isinstance(described_model, Described)
    assert (described_model.job_id, described_model.kind) == ("d2", "onnx")
    assert described_model.inputs == [
        TensorInfo(i.name, "float32", [d if d is not None else "" for d in i.shape])
        for i in session.get_inputs()
    ]
    assert described_model.inputs[0].name == "input"
    assert [o.name for o in described_model.outputs] == ["label", "probabilities"]
    assert described_model.imports == described_model.exports == []
    assert isinstance(described_module, Described)
    assert described_module.kind == "wasm"
    assert WasmExport("_start", "func") in described_module.exports
    assert WasmExport("memory", "memory") in described_module.exports
    assert WasmImport("wasi_snapshot_preview1", "fd_write", "func") in described_module.imports
    assert described_module.inputs == described_module.outputs == []
    assert isinstance(refused, Error)
    assert refused.code == ErrorCode.INVALID_MODEL  # not binary WebAssembly: read as a model


def test_the_client_describes_a_model_and_a_module_uploading_them_first(
    gateway: GatewayProcess, examples: Path, wasm, tmp_path: Path
) -> None:
    model = examples / "models" / "digits.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"neither a model nor a module")
    with gateway.client() as client:
        described_model = client.describe(model)  # not on the gateway yet: uploaded
        described_module = client.describe(wasm["echo"].read_bytes())
        with pytest.raises(hearth.JobError) as info:
            client.describe(bad)
        after = client.describe(model)
    assert described_model.kind == "onnx"
    assert [i.name for i in described_model.inputs] == [i.name for i in session.get_inputs()]
    assert [o.name for o in described_model.outputs] == ["label", "probabilities"]
    assert described_module.kind == "wasm"
    assert WasmExport("_start", "func") in described_module.exports
    assert info.value.code == hearth.ErrorCode.INVALID_MODEL
    # Asked again: the same answer, under the new request's own job id.
    assert after == msgspec.structs.replace(described_model, job_id=after.job_id)
