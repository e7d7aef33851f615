"""A plain paho MQTT 5 client written from docs/protocol.md alone (not the SDK) submits a job and
reads the answer.

Everything on the wire here is built by hand as the document describes it: topics (§4), the
Response Topic, Correlation Data and Content Type (§2), message maps (§5, MessagePack through
msgspec used as a plain codec on dicts), the chunked blob upload and the need_blob dance (§6),
and a persistent task's install, events and cancel (§15). Nothing from ``hearth`` or
``hearth_gateway`` is imported here; the fixtures come from conftest.py.
"""

from __future__ import annotations

import hashlib
import queue
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# From docs/protocol.md, "At a glance" and §4.
CONTENT_TYPE = "application/vnd.hearth.v1+msgpack"
V = 1
WAIT_S = 30.0  # bounded waits for a reply; generous for a first ONNX model load


def request_topic(gateway: str, client: str) -> str:
    return f"hearth/v1/gw/{gateway}/req/{client}"


def status_topic(gateway: str) -> str:
    return f"hearth/v1/gw/{gateway}/status"


def reply_topic(client: str) -> str:
    return f"hearth/v1/dev/{client}/reply"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PlainClient:
    """One MQTT 5 connection speaking Hearth protocol v1 by hand."""

    def __init__(self, host: str, port: int, gateway: str) -> None:
        self.gateway = gateway
        self.client_id = f"plain-{uuid.uuid4().hex[:12]}"  # the {client} in topics (§4)
        self._replies: defaultdict[bytes, queue.Queue[dict[str, Any]]] = defaultdict(queue.Queue)
        self._lock = threading.Lock()
        self.status: queue.Queue[tuple[dict[str, Any], bool, str | None]] = queue.Queue()
        # Application topics (not Hearth's): raw payloads, by topic.
        self._plain: dict[str, queue.Queue[bytes]] = {}
        self.strays: list[str] = []
        self._connected: queue.Queue[bool] = queue.Queue()
        self._subacks: queue.Queue[int] = queue.Queue()
        self._counter = 0

        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        self.mqtt.on_socket_open = self._nodelay  # §2: set TCP_NODELAY
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message
        self.mqtt.connect(host, port, keepalive=15, clean_start=True)
        self.mqtt.loop_start()
        try:
            assert self._connected.get(timeout=10), "broker refused the connection"
            # §2: subscribe to our reply topics at QoS 1 *before* sending requests; and to the
            # gateway's retained status (§9).
            self.mqtt.subscribe(f"hearth/v1/dev/{self.client_id}/#", qos=1)
            self.mqtt.subscribe(status_topic(gateway), qos=1)
            for _ in range(2):
                assert self._subacks.get(timeout=10) < 128, "subscription refused"
        except BaseException:
            self.close()
            raise

    # -- paho callbacks (network thread) ---------------------------------------------------

    @staticmethod
    def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.put(not reason.is_failure)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        for reason in reasons:
            self._subacks.put(int(reason.value))

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            plain = self._plain.get(msg.topic)
        if plain is not None:
            plain.put(bytes(msg.payload))
            return
        props = msg.properties
        content_type = getattr(props, "ContentType", None)
        try:
            body = msgspec.msgpack.decode(bytes(msg.payload))
        except msgspec.DecodeError:
            self.strays.append(f"undecodable payload on {msg.topic}")
            return
        if msg.topic == status_topic(self.gateway):
            self.status.put((body, bool(msg.retain), content_type))
            return
        correlation = getattr(props, "CorrelationData", None)
        if msg.topic != reply_topic(self.client_id) or correlation is None:
            self.strays.append(f"{msg.topic}: {body!r}")
            return
        # What §2 promises about every reply, checked on each one.
        body["_content_type"] = content_type
        body["_qos"] = msg.qos
        body["_retain"] = bool(msg.retain)
        with self._lock:
            q = self._replies[bytes(correlation)]
        q.put(body)

    # -- requests ----------------------------------------------------------------------------

    def correlation(self) -> bytes:
        with self._lock:
            self._counter += 1
            return self._counter.to_bytes(4, "big")

    def send(self, message: dict[str, Any], correlation: bytes) -> None:
        """PUBLISH one request map: QoS 1, Response Topic, Correlation Data, Content Type."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic(self.client_id)
        props.CorrelationData = correlation
        props.ContentType = CONTENT_TYPE
        info = self.mqtt.publish(
            request_topic(self.gateway, self.client_id),
            msgspec.msgpack.encode(message),
            qos=1,
            properties=props,
        )
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed: {info.rc}"

    def reply(self, correlation: bytes, timeout_s: float = WAIT_S) -> dict[str, Any]:
        with self._lock:
            q = self._replies[correlation]
        try:
            body = q.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no reply for correlation {correlation.hex()} within {timeout_s} s")
        assert body.pop("_content_type") == CONTENT_TYPE, body
        assert body.pop("_qos") == 1, "a QoS 1 request is answered at QoS 1"
        assert body.pop("_retain") is False, "replies are not retained"
        assert body.get("v", V) == V, body
        return body

    def no_more_replies(self, correlation: bytes, wait_s: float = 0.5) -> None:
        with self._lock:
            q = self._replies[correlation]
        try:
            extra = q.get(timeout=wait_s)
        except queue.Empty:
            return
        pytest.fail(f"unexpected extra reply: {extra!r}")

    def call(self, message: dict[str, Any], timeout_s: float = WAIT_S) -> dict[str, Any]:
        correlation = self.correlation()
        self.send(message, correlation)
        return self.reply(correlation, timeout_s)

    def upload(self, data: bytes, max_chunk: int, chunk_size: int) -> dict[str, Any]:
        """§6: chunks in order from offset 0, every one carrying the blob's sha256 and total
        size, all under one Correlation Data; only the last one is answered."""
        size = min(chunk_size, max_chunk)
        sha = sha256_hex(data)
        correlation = self.correlation()
        offsets = list(range(0, len(data), size)) or [0]
        for offset in offsets:
            chunk = {
                "type": "blob",
                "sha256": sha,
                "size": len(data),
                "offset": offset,
                "data": data[offset : offset + size],
                "v": V,
            }
            self.send(chunk, correlation)
        answer = self.reply(correlation)
        self.no_more_replies(correlation, wait_s=0.2)
        return {**answer, "_chunks": len(offsets)}

    def run_job(self, job: dict[str, Any], blob: bytes, chunk_size: int) -> dict[str, Any]:
        """Send a job; on need_blob upload the blob and send the same job again (§1, §6)."""
        answer = self.call(job)
        if answer["type"] != "need_blob":
            return answer
        stored = self.upload(blob, answer["max_chunk"], chunk_size)
        assert stored["type"] == "blob_stored", stored
        return self.call(job)

    # -- application topics (what persistent tasks read and publish, §15) -----------------------

    def subscribe_plain(self, topic: str) -> None:
        with self._lock:
            self._plain[topic] = queue.Queue()
        self.mqtt.subscribe(topic, qos=1)
        assert self._subacks.get(timeout=10) < 128, "subscription refused"

    def publish_plain(self, topic: str, payload: bytes) -> None:
        info = self.mqtt.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed: {info.rc}"

    def plain_message(self, topic: str, timeout_s: float = WAIT_S) -> bytes:
        with self._lock:
            q = self._plain[topic]
        try:
            return q.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"nothing on {topic} within {timeout_s} s")

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def plain(gateway: Any) -> Any:
    client = PlainClient(gateway.listen.host, gateway.listen.port, gateway.gateway_id)
    try:
        yield client
    finally:
        client.close()
    assert not client.strays, f"messages nobody asked for: {client.strays}"


def wasm_job(job_id: str, module: str, args: list[str], stdin: bytes) -> dict[str, Any]:
    return {
        "type": "wasm",
        "job_id": job_id,
        "module": module,
        "args": args,
        "stdin": stdin,
        "data_class": "private",
        "v": V,
    }


def test_wasm_job_with_need_blob_and_chunked_upload(
    plain: PlainClient, wasm: dict[str, Path]
) -> None:
    module = wasm["echo"].read_bytes()
    sha = sha256_hex(module)
    assert len(module) > 3 * 1000, "the echo module should take several 1000-byte chunks"
    job = wasm_job("job-1", sha, ["hello", "world"], b"hi\n")

    # First send: the gateway does not hold the module.
    need = plain.call(job)
    assert need == {
        "type": "need_blob",
        "job_id": "job-1",
        "sha256": sha,
        "max_chunk": need["max_chunk"],
        "v": V,
    }
    assert isinstance(need["max_chunk"], int)
    assert need["max_chunk"] >= 1000

    stored = plain.upload(module, need["max_chunk"], chunk_size=1000)
    assert stored.pop("_chunks") >= 4
    assert stored == {"type": "blob_stored", "sha256": sha, "size": len(module), "v": V}

    # Same job id again: journaled, run, answered.
    result = plain.call(job)
    assert result["type"] == "wasm_result", result
    assert result["job_id"] == "job-1"
    assert result["exit_code"] == 0
    assert result["stdout"] == b"hi\nhello world\n"
    assert isinstance(result["stdout"], bytes), "binary fields are bin, not str"
    assert result["stderr"] == b"echo: done\n"
    timing = result.get("timing", {})
    assert set(timing) <= {"queue_ms", "run_ms", "upstream"}
    assert timing.get("upstream", "") == ""  # this gateway ran it
    assert all(
        isinstance(timing[key], float) and timing[key] >= 0 for key in ("queue_ms", "run_ms")
    )

    # A second job with the same module: one request, one reply, no need_blob.
    second = plain.call(wasm_job("job-2", sha, ["--exit", "3", "bye"], b""))
    assert second["type"] == "wasm_result", second
    assert second["job_id"] == "job-2"
    assert second["exit_code"] == 3, "a non-zero exit code is a normal result"
    assert second["stdout"] == b"bye\n"

    # §8: the first job id re-sent is answered from the journal, under the new correlation.
    again = plain.call(job)
    assert again == result


def test_onnx_job_on_digits(plain: PlainClient, examples: Path) -> None:
    model = (examples / "models" / "digits.onnx").read_bytes()
    x = np.load(examples / "models" / "digits_test_X.npy")
    y = np.load(examples / "models" / "digits_test_y.npy")
    rows = x.shape[0]
    tensor = {
        "name": "input",
        "dtype": "float32",
        "shape": [rows, 64],
        "data": np.ascontiguousarray(x, dtype="<f4").tobytes(),  # little-endian, C order
    }
    job = {
        "type": "onnx",
        "job_id": "digits-1",
        "model": sha256_hex(model),
        "inputs": [tensor],
        "outputs": ["label"],
        "data_class": "private",
        "v": V,
    }
    result = plain.run_job(job, model, chunk_size=8192)
    assert result["type"] == "onnx_result", result
    assert result["job_id"] == "digits-1"
    assert isinstance(result["provider"], str)
    assert result["provider"].endswith("ExecutionProvider")
    [label] = result["outputs"]
    assert label["name"] == "label"
    assert label["dtype"] == "int64"
    assert label["shape"] == [rows]
    assert len(label["data"]) == rows * 8
    labels = np.frombuffer(label["data"], dtype="<i8")
    accuracy = float((labels == y).mean())
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f}"


def test_ping_pong(plain: PlainClient) -> None:
    pong = plain.call({"type": "ping", "v": V})
    assert pong["type"] == "pong", pong
    assert pong["gateway_id"] == plain.gateway
    assert isinstance(pong["workers"], int)
    assert pong["workers"] >= 1
    assert isinstance(pong["queue_depth"], int)
    assert pong["queue_depth"] >= 0
    assert isinstance(pong["load"], float)
    assert pong["load"] == pytest.approx(pong["queue_depth"] / pong["workers"])


def test_retained_status_is_online(plain: PlainClient) -> None:
    try:
        status, retained, content_type = plain.status.get(timeout=10)
    except queue.Empty:
        pytest.fail("no retained status on the status topic")
    assert retained, "the status is retained"
    assert content_type == CONTENT_TYPE
    assert status["type"] == "status"
    assert status["state"] == "online"
    assert status["gateway_id"] == plain.gateway
    assert status.get("v", V) == V
    # §5.3: the runners a gateway may enable; all five by default.
    assert set(status.get("runners", [])) <= {"wasm", "onnx", "task", "vision", "migrate"}
    assert "wasm" in status["runners"]
    assert status["max_message_bytes"] > 0


def test_persistent_task_install_events_cancel(plain: PlainClient, examples: Path) -> None:
    """§15: install the counter task, feed it two messages, read its two publishes, cancel it.
    (counter.wasm publishes 1, 2, ... as ASCII to its kv key ``out_topic``.)"""
    path = examples / "tasks" / "counter.wasm"
    if not path.exists():
        pytest.skip(f"{path} not built (scripts/build_examples.py builds it)")
    module = path.read_bytes()
    status, _, _ = plain.status.get(timeout=10)
    if "task" not in status.get("runners", []):
        pytest.fail(f"§13: send task requests only where runners include task: {status}")
    base = f"test/{uuid.uuid4().hex[:12]}"
    topic_in, topic_out = f"{base}/in", f"{base}/out"
    plain.subscribe_plain(topic_out)

    install = {
        "type": "task_install",
        "name": "counter-1",
        "module": sha256_hex(module),
        "triggers": [{"topic": topic_in, "every_s": None}],
        "read": [],  # §5.1: empty means the trigger topics
        "publish": [topic_out],
        "expires_at": None,
        "idle_timeout_s": None,
        "config": {"out_topic": topic_out},
        "checkpoint_every": 1,
        "checkpoint_every_s": None,
        "v": V,
    }
    answer = plain.call(install)
    if answer["type"] == "need_blob":  # §15.2: job_id is the task's name; upload, send again
        assert answer["job_id"] == "counter-1", answer
        assert answer["sha256"] == install["module"], answer
        stored = plain.upload(module, answer["max_chunk"], chunk_size=answer["max_chunk"])
        assert stored["type"] == "blob_stored", stored
        answer = plain.call(install)
    assert answer["type"] == "task", answer
    task = answer["task"]
    task_id = task["task_id"]
    assert re.fullmatch(r"t-[0-9a-f]{12}", task_id), task_id
    assert task["state"] == "running"
    assert task["name"] == "counter-1"
    assert task["owner"] == plain.client_id
    assert task["read"] == [topic_in], "the read grants default to the trigger topics"
    assert task["publish"] == [topic_out]
    assert [trigger["topic"] for trigger in task["triggers"]] == [topic_in]

    # The gateway subscribed to the trigger filter at install; give that a moment.
    time.sleep(0.3)
    plain.publish_plain(topic_in, b"first")
    assert plain.plain_message(topic_out) == b"1"
    plain.publish_plain(topic_in, b"second")
    assert plain.plain_message(topic_out) == b"2"

    shown = plain.call({"type": "task_control", "task_id": task_id, "action": "show", "v": V})
    assert shown["type"] == "task", shown
    assert shown["task"]["events"] == 2
    assert shown["task"]["publishes"] == 2

    cancelled = plain.call({"type": "task_control", "task_id": task_id, "action": "cancel", "v": V})
    assert cancelled["type"] == "task", cancelled
    assert cancelled["task"]["task_id"] == task_id
    assert cancelled["task"]["state"] == "cancelled"

    listed = plain.call({"type": "task_list", "v": V})
    assert listed["type"] == "task_list_result", listed
    assert task_id not in [t["task_id"] for t in listed["tasks"]]

    # §15.3: a removed task is gone for task_control too.
    gone = plain.call({"type": "task_control", "task_id": task_id, "action": "show", "v": V})
    assert gone["type"] == "error", gone
    assert gone["code"] == "forbidden"
    assert gone.get("job_id") is None
