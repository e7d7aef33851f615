"""Protocol v1 codec and topics: pure unit tests."""

from __future__ import annotations

import msgspec
import pytest

from hearth.errors import ErrorCode, ProtocolError
from hearth.protocol import (
    BlobChunk,
    Error,
    GatewayStatus,
    OnnxJob,
    Tensor,
    WasmJob,
    WasmResult,
    decode_reply,
    decode_request,
    decode_status,
    encode,
    parse_request_topic,
    reply_prefix,
    request_topic,
    status_topic,
)
from hearth.transport import BrokerAddress

SHA = "ab" * 32


def test_requests_round_trip_and_binary_stays_binary() -> None:
    job = WasmJob(job_id="j-1", module=SHA, args=["a"], stdin=b"\x00\xff" * 10)
    payload = encode(job)
    assert decode_request(payload) == job
    raw = msgspec.msgpack.decode(payload)
    assert raw["type"] == "wasm"
    assert raw["v"] == 1
    assert isinstance(raw["stdin"], bytes)  # msgpack bin, not base64 text
    assert b"\x00\xff" * 10 in payload


def test_replies_round_trip() -> None:
    for reply in (
        WasmResult(job_id="j", exit_code=3, stdout=b"o", stderr=b"e"),
        Error(code=ErrorCode.TRAP, message="boom", job_id="j"),
    ):
        assert decode_reply(encode(reply)) == reply


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    raw = {"type": "ping", "v": 1, "added_in_v1_1": True}
    assert type(decode_request(msgspec.msgpack.encode(raw))).__name__ == "Ping"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED),
        ({"type": "wasm", "v": 1, "job_id": "x"}, ErrorCode.MALFORMED),
        ({"type": "wasm", "v": 1, "job_id": "a/b", "module": SHA}, ErrorCode.MALFORMED),
        ({"type": "wasm", "v": 1, "job_id": "a", "module": "AB" * 32}, ErrorCode.MALFORMED),
        (
            {"type": "blob", "v": 1, "sha256": SHA, "size": -1, "offset": 0, "data": b""},
            ErrorCode.MALFORMED,
        ),
        (
            {
                "type": "onnx",
                "v": 1,
                "job_id": "a",
                "model": SHA,
                "inputs": [{"name": "x", "dtype": "complex128", "shape": [1], "data": b""}],
            },
            ErrorCode.MALFORMED,
        ),
        ({"type": "wasm", "v": 7, "job_id": "a", "module": SHA}, ErrorCode.UNSUPPORTED_VERSION),
        ({"type": "brand-new", "v": 2}, ErrorCode.UNSUPPORTED_VERSION),
    ],
)
def test_bad_requests_raise_the_right_code(raw: object, code: ErrorCode) -> None:
    payload = raw if isinstance(raw, bytes) else msgspec.msgpack.encode(raw)
    with pytest.raises(ProtocolError) as info:
        decode_request(payload)
    assert info.value.code == code


def test_status_decodes() -> None:
    status = GatewayStatus(gateway_id="g", state="offline")
    assert decode_status(encode(status)).state == "offline"


def test_topics() -> None:
    assert request_topic("gw", "dev") == "hearth/v1/gw/gw/req/dev"
    assert status_topic("gw") == "hearth/v1/gw/gw/status"
    assert reply_prefix("dev") == "hearth/v1/dev/dev/"
    assert parse_request_topic("hearth/v1/gw/gw/req/dev") == ("gw", "dev")
    for bad in (
        "hearth/v1/gw/gw/req/",
        "hearth/v2/gw/gw/req/dev",
        "hearth/v1/gw/gw/req/a/b",
        "hearth/v1/gw/g+w/req/dev",
    ):
        assert parse_request_topic(bad) is None
    for bad_id in ("", "a/b", "+", "#", "x" * 65):
        with pytest.raises(ValueError, match="invalid"):
            request_topic("gw", bad_id)


def test_broker_address_parsing() -> None:
    assert BrokerAddress.parse("10.0.0.2:1884") == BrokerAddress("10.0.0.2", 1884)
    assert BrokerAddress.parse("mqtt://gw.local") == BrokerAddress("gw.local", 1883)
    assert BrokerAddress.parse("[::1]:1999") == BrokerAddress("::1", 1999)
    assert str(BrokerAddress("::1", 1999)) == "[::1]:1999"
    for bad in ("", ":1883", "host:0", "host:99999", "host:port"):
        with pytest.raises(ValueError):
            BrokerAddress.parse(bad)


def test_structs_are_immutable() -> None:
    job = OnnxJob(job_id="a", model=SHA, inputs=[Tensor("x", "float32", [1], b"\0" * 4)])
    with pytest.raises(AttributeError):
        job.job_id = "b"  # type: ignore[misc]
    chunk = BlobChunk(sha256=SHA, size=1, offset=0, data=b"x")
    assert decode_request(encode(chunk)) == chunk


def test_retryable_codes() -> None:
    assert ErrorCode.WORKER_CRASHED.retryable
    assert ErrorCode.OVERLOADED.retryable
    assert not ErrorCode.TRAP.retryable
    assert not ErrorCode.BAD_TENSOR.retryable


@pytest.mark.parametrize("correlation", [b"", b"job-1", bytes(range(256)) * 2])
def test_hand_packed_publish_properties_equal_pahos(correlation: bytes) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from hearth.protocol import CONTENT_TYPE
    from hearth.transport import publish_properties, reply_properties

    topic = "hearth/v1/dev/dev-7/reply/" + "é" * 100  # multi-byte UTF-8, a long length
    request = Properties(PacketTypes.PUBLISH)
    request.ContentType = CONTENT_TYPE
    request.ResponseTopic = topic
    request.CorrelationData = correlation
    assert publish_properties(topic, correlation).pack() == request.pack()
    reply = Properties(PacketTypes.PUBLISH)
    reply.ContentType = CONTENT_TYPE
    reply.CorrelationData = correlation
    assert reply_properties(correlation).pack() == reply.pack()
    bare = Properties(PacketTypes.PUBLISH)
    bare.ContentType = CONTENT_TYPE
    assert reply_properties(None).pack() == bare.pack()
