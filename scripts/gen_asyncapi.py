"""Generate docs/asyncapi.yaml, the machine-readable form of protocol v1 (AsyncAPI 3.0).

The types come from the msgspec definitions in ``hearth.protocol`` (``msgspec.json`` gives the
JSON Schema of every struct), the topics from ``hearth.protocol.topics`` and the words from
docs/protocol.md: each message's and nested map's prose and each field's "Meaning" cell, read
from the sections tests/test_protocol_doc.py already holds in step with the code. So the one
definition of the protocol stays the Python one, and this file only translates it.

    python scripts/gen_asyncapi.py            # (re)write docs/asyncapi.yaml
    python scripts/gen_asyncapi.py --check    # exit 1 if the checked-in file is stale

tests/test_asyncapi.py regenerates it and validates it with the real AsyncAPI parser
(``@asyncapi/parser``, pinned in scripts/asyncapi/package.json).

The document describes the *gateway* (AsyncAPI 3 operations are from the point of view of the
application described): it receives requests and sends their replies, its status and its tasks'
notifications. A device does the opposite of each operation.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import msgspec

from hearth.protocol import CONTENT_TYPE, PROTOCOL_VERSION, topics, vision
from hearth.protocol.messages import GatewayStatus, Notification, Reply, Request
from hearth.protocol.pairing import (
    PairCa,
    PairHello,
    PairRequest,
    PairResult,
    pair_reply_topic,
    pair_request_topic,
)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "protocol.md"
OUT = REPO / "docs" / "asyncapi.yaml"

REQUESTS: tuple[type[msgspec.Struct], ...] = typing.get_args(Request)
REPLIES: tuple[type[msgspec.Struct], ...] = typing.get_args(Reply)
PAIRING_REQUESTS: tuple[type[msgspec.Struct], ...] = (PairHello, PairRequest)
PAIRING_REPLIES: tuple[type[msgspec.Struct], ...] = (PairCa, PairResult)
# What each request may be answered with, on its Response Topic (docs/protocol.md §5.5, §6,
# §7, §15, §16, §18). Any request may also be answered `error` (``malformed`` at least), which
# is added to each. A tag missing here fails the generator, so a new request is not forgotten.
ANSWERS: dict[str, tuple[str, ...]] = {
    "ping": ("pong",),
    "wasm": ("wasm_result", "need_blob", "accepted"),
    "onnx": ("onnx_result", "need_blob", "accepted"),
    "call": ("call_result", "frame_dropped", "accepted"),
    "pipeline": ("pipeline_result", "need_blob", "accepted"),
    "session_close": ("session_closed",),
    "blob": ("blob_stored",),
    "task_install": ("task", "need_blob"),
    "task_control": ("task",),
    "task_list": ("task_list_result",),
    # run_round and run_chunk: pre-copy rounds and the pieces of a large snapshot (§18).
    "run_start": (
        "run_checkpoint",
        "run_result",
        "run_moved",
        "run_round",
        "run_chunk",
        "need_blob",
    ),
    "run_resume": (
        "run_checkpoint",
        "run_result",
        "run_moved",
        "run_round",
        "run_chunk",
        "need_blob",
    ),
    "run_control": ("run_ack",),
    "describe": ("described", "need_blob"),
    "usage": ("usage_result",),
    "pair_hello": ("pair_ca",),
    "pair_request": ("pair_result",),
}
# The gateway's own MQTT session (docs/protocol.md §2, §9; hearth_gateway/link.py).
GATEWAY_KEEPALIVE_S = 15
GATEWAY_SESSION_EXPIRY_S = 3600
BINDING_VERSION = "0.2.0"
ID_PATTERN = "^[A-Za-z0-9_.-]{1,64}$"

# Placeholders that pass the topic functions' id checks, replaced by AsyncAPI parameters.
_GATEWAY, _CLIENT, _CONNECTION = "GATEWAYxID", "CLIENTxID", "CONNECTIONxID"


def tag_of(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), cls
    return tag


# --- the words: docs/protocol.md ---------------------------------------------------------------


class DocSection(msgspec.Struct, frozen=True):
    prose: str  # the text between the heading and the first table
    fields: dict[str, str]  # field name -> its "Meaning" cell


def _unescape(cell: str) -> str:
    return re.sub(r"\\([|<>])", r"\1", cell)


def read_doc(text: str) -> dict[str, DocSection]:
    """Every ``#### `name` — ...`` section of the document, by ``name`` (a message's tag or a
    nested map's struct name)."""
    found: dict[str, DocSection] = {}
    for block in re.split(r"^(?=#{1,4} )", text, flags=re.MULTILINE):
        head, _, body = block.partition("\n")
        match = re.match(r"^#### `([^`]+)` — ", head)
        if not match:
            continue
        prose_lines: list[str] = []
        fields: dict[str, str] = {}
        in_table = False
        for line in body.splitlines():
            if line.startswith("|"):
                in_table = True
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
                name = re.fullmatch(r"`([^`]+)`", cells[0])
                if name and len(cells) == 4:
                    fields[name.group(1)] = _unescape(cells[3])
            elif not in_table:
                prose_lines.append(line)
        prose = "\n".join(prose_lines).strip()
        found[match.group(1)] = DocSection(re.sub(r"\n{3,}", "\n\n", prose), fields)
    return found


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    match = re.match(r"(.+?[.:])(\s|$)", flat)
    return (match.group(1) if match else flat).rstrip(":.") + "."


# --- the types: msgspec -----------------------------------------------------------------------


def _fix_schema(node: Any) -> Any:
    """msgspec's JSON Schema, made to say what the MessagePack wire carries and to fit the
    AsyncAPI Schema Object (JSON Schema draft 07)."""
    if isinstance(node, list):
        return [_fix_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    fixed = {key: _fix_schema(value) for key, value in node.items()}
    if fixed.get("contentEncoding") == "base64":
        # bytes travel as MessagePack bin, never base64 (docs/protocol.md §3).
        del fixed["contentEncoding"]
        fixed["format"] = "binary"
        fixed["x-msgpack-type"] = "bin"
    if "prefixItems" in fixed:  # draft 2020-12 tuples -> draft 07
        fixed["items"] = fixed.pop("prefixItems")
        fixed["additionalItems"] = False
    return fixed


def _describe(schema: dict[str, Any], section: DocSection | None) -> dict[str, Any]:
    """The struct's schema with the document's words on it, the docstring's otherwise."""
    if section is None:
        return schema
    # The description right after the title, where a reader looks for it.
    described = {key: value for key, value in schema.items() if key == "title"}
    if section.prose:
        described["description"] = section.prose
    described.update((k, v) for k, v in schema.items() if k not in described)
    properties: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        meaning = section.fields.get(name)
        if meaning is None:
            properties[name] = prop
        elif "$ref" in prop:
            # Siblings of $ref are ignored in draft 07: wrap it to carry a description.
            properties[name] = {"allOf": [prop], "description": meaning}
        else:
            properties[name] = {**prop, "description": meaning}
    described["properties"] = properties
    return described


def schemas(doc: dict[str, DocSection]) -> dict[str, Any]:
    structs: tuple[type[msgspec.Struct], ...] = (
        *REQUESTS,
        *REPLIES,
        GatewayStatus,
        Notification,
        *PAIRING_REQUESTS,
        *PAIRING_REPLIES,
        *vision.CAPABILITIES.values(),
    )
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    out: dict[str, Any] = {}
    for name, schema in sorted(components.items()):
        cls = next((c for c in structs if c.__name__ == name), None)
        key = tag_of(cls) if cls is not None and cls.__struct_config__.tag else name
        out[name] = _describe(_fix_schema(schema), doc.get(key))
    # call_result.result is a plain map on the wire; it has the shape of the capability's
    # result struct.
    result = out["CallResult"]["properties"]["result"]
    result["anyOf"] = [
        {"$ref": f"#/components/schemas/{cls.__name__}"} for cls in vision.CAPABILITIES.values()
    ]
    result["description"] += (
        " ("
        + ", ".join(f"`{name}`: `{cls.__name__}`" for name, cls in vision.CAPABILITIES.items())
        + ")"
    )
    return out


# --- the document -----------------------------------------------------------------------------


def _address(topic: str) -> str:
    return (
        topic.replace(_GATEWAY, "{gateway}")
        .replace(_CLIENT, "{client}")
        .replace(_CONNECTION, "{connection}")
    )


PARAMETERS = {
    "gateway": {
        "description": f"The gateway id ({ID_PATTERN}): its retained status's `gateway_id`, "
        "mDNS TXT `id`, or `pair_ca.gateway_id`."
    },
    "client": {
        "description": f"The device's id ({ID_PATTERN}), chosen by the device (on the device "
        "listener: its certificate's CN). Job ids, uploads and stored answers are scoped to it."
    },
    "connection": {
        "description": f"The pairing connection's MQTT Client Identifier ({ID_PATTERN})."
    },
}

_CORRELATION = {
    "type": "string",
    "format": "binary",
    "minLength": 1,
    "description": "Opaque, non-empty bytes chosen by the device; echoed unchanged on every "
    "reply to the request. The only way to match replies to requests (error replies to "
    "undecodable messages and all replies to blob chunks carry no job id).",
}


def _request_binding() -> dict[str, Any]:
    return {
        "mqtt": {
            "contentType": CONTENT_TYPE,
            "payloadFormatIndicator": 0,
            "correlationData": _CORRELATION,
            "responseTopic": {
                "type": "string",
                "pattern": "^hearth/v1/dev/[A-Za-z0-9_.-]{1,64}/",
                "description": "Required: a topic under `hearth/v1/dev/{client}/` (the same "
                "`{client}` as the request topic's), normally `hearth/v1/dev/{client}/reply`. "
                "A request without one, or with one outside that prefix, is dropped without "
                "a reply.",
            },
            "bindingVersion": BINDING_VERSION,
        }
    }


def _reply_binding() -> dict[str, Any]:
    return {
        "mqtt": {
            "contentType": CONTENT_TYPE,
            "payloadFormatIndicator": 0,
            "correlationData": {
                **_CORRELATION,
                "description": "The request's Correlation Data, copied.",
            },
            "bindingVersion": BINDING_VERSION,
        }
    }


def _plain_binding(*, content_type: bool) -> dict[str, Any]:
    binding: dict[str, Any] = {"payloadFormatIndicator": 0, "bindingVersion": BINDING_VERSION}
    if content_type:
        binding["contentType"] = CONTENT_TYPE
    return {"mqtt": binding}


def _message(
    cls: type[msgspec.Struct], doc: dict[str, DocSection], bindings: dict[str, Any]
) -> dict[str, Any]:
    tag = tag_of(cls)
    section = doc.get(tag)
    prose = section.prose if section and section.prose else (cls.__doc__ or "").strip()
    message: dict[str, Any] = {"name": tag, "title": cls.__name__}
    if prose:
        message["summary"] = _first_sentence(prose)
        message["description"] = prose
    message["contentType"] = CONTENT_TYPE
    message["payload"] = {"$ref": f"#/components/schemas/{cls.__name__}"}
    message["bindings"] = bindings
    return message


def _channel(address: str, description: str, tags: list[str], servers: list[str]) -> dict[str, Any]:
    params = re.findall(r"\{(\w+)\}", address)
    return {
        "address": address,
        "description": description,
        "servers": [{"$ref": f"#/servers/{name}"} for name in servers],
        "parameters": {name: {"$ref": f"#/components/parameters/{name}"} for name in params},
        "messages": {tag: {"$ref": f"#/components/messages/{tag}"} for tag in tags},
    }


def _ref(channel: str, tag: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{channel}/messages/{tag}"}


def _answer_operation(
    request: str, channel: str, reply_channel: str, doc: dict[str, DocSection]
) -> dict[str, Any]:
    if request not in ANSWERS:
        raise SystemExit(f"gen_asyncapi: ANSWERS does not say what answers `{request}`")
    answers = [*ANSWERS[request], "error"]
    section = doc.get(request)
    summary = _first_sentence(section.prose) if section and section.prose else request
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel}"},
        "title": f"Handle `{request}`",
        "summary": summary,
        "description": f"A device publishes `{request}`; the gateway answers on the request's "
        "Response Topic with the request's Correlation Data, with "
        + ", ".join(f"`{a}`" for a in answers)
        + (
            " (only the last chunk of an upload is answered on success)"
            if request == "blob"
            else ""
        )
        + ".",
        "messages": [_ref(channel, request)],
        "bindings": {"mqtt": {"qos": 1, "retain": False, "bindingVersion": BINDING_VERSION}},
        "reply": {
            "channel": {"$ref": f"#/channels/{reply_channel}"},
            "messages": [_ref(reply_channel, a) for a in answers],
        },
    }


INFO_DESCRIPTION = f"""\
The wire contract between devices and a Hearth gateway: MQTT 5 request/response with \
MessagePack payloads (`{CONTENT_TYPE}`). docs/protocol.md is the same contract in prose, with \
the rules this document cannot carry (blob upload, idempotency, limits, error codes).

Generated by `scripts/gen_asyncapi.py` from the msgspec definitions in \
`device-sdk/src/hearth/protocol/`; do not edit by hand.

Operations are the gateway's: it *receives* requests and answers each on the request's MQTT 5 \
Response Topic with the request's Correlation Data, and *sends* its retained status and its \
persistent tasks' notifications. A device does the opposite: it subscribes to \
`hearth/v1/dev/{{client}}/#` at QoS 1, then publishes requests at QoS 1 with a Response Topic, \
Correlation Data and the Content Type. MQTT 3.1.1 cannot carry these properties.

Payloads are one MessagePack map each: `type` names the message, `v` is the schema version \
({PROTOCOL_VERSION}). Schemas are JSON Schema over the decoded map; `format: binary` \
(`x-msgpack-type: bin`) marks MessagePack bin, never base64. Unknown keys are ignored, except \
in `Preprocess` and `Postprocess`. Section numbers (§) refer to docs/protocol.md."""


def build(doc_text: str) -> dict[str, Any]:
    doc = read_doc(doc_text)
    requests, replies = [tag_of(c) for c in REQUESTS], [tag_of(c) for c in REPLIES]
    pair_requests = [tag_of(c) for c in PAIRING_REQUESTS]
    pair_replies = [*(tag_of(c) for c in PAIRING_REPLIES), "error"]
    messages: dict[str, Any] = {}
    for cls in REQUESTS:
        messages[tag_of(cls)] = _message(cls, doc, _request_binding())
    for cls in REPLIES:
        messages[tag_of(cls)] = _message(cls, doc, _reply_binding())
    messages["status"] = _message(GatewayStatus, doc, _plain_binding(content_type=True))
    messages["notify"] = _message(Notification, doc, _plain_binding(content_type=False))
    for cls in PAIRING_REQUESTS:
        messages[tag_of(cls)] = _message(cls, doc, _request_binding())
    for cls in PAIRING_REPLIES:
        messages[tag_of(cls)] = _message(cls, doc, _reply_binding())
    messages["notify"]["description"] += (
        "\n\nPublished with no Correlation Data and no Content Type property."
    )

    status = _address(topics.status_topic(_GATEWAY))
    channels = {
        "requests": _channel(
            _address(topics.request_topic(_GATEWAY, _CLIENT)),
            "Every request of device `{client}` to gateway `{gateway}`. The gateway subscribes "
            f"to `{_address(topics.request_filter(_GATEWAY))}` at QoS 1 in a persistent session; "
            "a message whose ids are invalid or name another gateway is ignored.",
            requests,
            ["loopback", "devices"],
        ),
        "replies": _channel(
            _address(topics.reply_topic(_CLIENT)),
            "The usual Response Topic of device `{client}`; any topic under "
            f"`{_address(topics.reply_prefix(_CLIENT))}` may be named instead. Replies are "
            "published not retained, at the QoS the request arrived with (1 at most), with the "
            "request's Correlation Data.",
            replies,
            ["loopback", "devices"],
        ),
        "status": _channel(
            status,
            "The gateway's status, retained, QoS 1: `online` on every (re)connect and whenever "
            "it changes; `offline` on a clean shutdown and as its Last Will. Subscribe to "
            "`hearth/v1/gw/+/status` to learn the gateway ids on a broker.",
            ["status"],
            ["loopback", "devices"],
        ),
        "notifications": _channel(
            _address(topics.notify_topic(_CLIENT)),
            "Messages from the persistent tasks device `{client}` owns; QoS 1, not retained.",
            ["notify"],
            ["loopback", "devices"],
        ),
        "pairingRequests": _channel(
            _address(pair_request_topic(_CONNECTION)),
            "Pairing requests on the pairing listener (docs/protocol.md §16.3), with a Response "
            "Topic of `hearth/v1/pair/reply/{connection}` and Correlation Data.",
            pair_requests,
            ["pairing"],
        ),
        "pairingReplies": _channel(
            _address(pair_reply_topic(_CONNECTION)),
            "Answers to pairing requests.",
            pair_replies,
            ["pairing"],
        ),
    }
    operations: dict[str, Any] = {}
    for tag in requests:
        operations[f"handle_{tag}"] = _answer_operation(tag, "requests", "replies", doc)
    for tag in pair_requests:
        operations[f"handle_{tag}"] = _answer_operation(
            tag, "pairingRequests", "pairingReplies", doc
        )
    operations["publishStatus"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/status"},
        "title": "Publish the gateway's status",
        "messages": [_ref("status", "status")],
        "bindings": {"mqtt": {"qos": 1, "retain": True, "bindingVersion": BINDING_VERSION}},
    }
    operations["notifyOwner"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/notifications"},
        "title": "Notify a task's owner",
        "messages": [_ref("notifications", "notify")],
        "bindings": {"mqtt": {"qos": 1, "retain": False, "bindingVersion": BINDING_VERSION}},
    }
    gateway_session = {
        "mqtt": {
            "cleanSession": False,
            "keepAlive": GATEWAY_KEEPALIVE_S,
            "sessionExpiryInterval": GATEWAY_SESSION_EXPIRY_S,
            "lastWill": {
                "topic": status,
                "qos": 1,
                "retain": True,
                "message": "a `status` message with `state` `offline` (MessagePack)",
            },
            "bindingVersion": BINDING_VERSION,
        }
    }
    return {
        "asyncapi": "3.0.0",
        "id": "urn:hearth:protocol:v1",
        "info": {
            "title": "Hearth protocol",
            "version": str(PROTOCOL_VERSION),
            "description": INFO_DESCRIPTION,
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "loopback": {
                "host": "127.0.0.1:1883",
                "protocol": "mqtt",
                "protocolVersion": "5",
                "title": "The managed broker's loopback listener",
                "description": "Plain TCP, anonymous, under an ACL; for processes on the "
                "gateway's host. Also the shape of an external broker the gateway was pointed "
                "at. The bindings are the gateway's own session.",
                "bindings": gateway_session,
            },
            "devices": {
                "host": "{host}:{port}",
                "protocol": "secure-mqtt",
                "protocolVersion": "5",
                "title": "The device listener",
                "description": "Mutual TLS for paired devices only (docs/protocol.md §16); "
                "`{client}` is the certificate's CN. Advertised over mDNS as "
                "`_hearth._tcp.local.` with TXT `tls=1`.",
                "variables": {
                    "host": {"description": "The gateway's LAN address (from mDNS)."},
                    "port": {"default": "8883", "description": "`lan_listen`'s port."},
                },
                "security": [{"$ref": "#/components/securitySchemes/deviceCertificate"}],
                "bindings": gateway_session,
            },
            "pairing": {
                "host": "{host}:{port}",
                "protocol": "secure-mqtt",
                "protocolVersion": "5",
                "title": "The pairing listener",
                "description": "TLS without a client certificate; only the pairing topics. "
                "The device checks the CA it receives against the fingerprint it was given.",
                "variables": {
                    "host": {"description": "The gateway's LAN address."},
                    "port": {
                        "default": "8884",
                        "description": "`pairing_listen`'s port; default: the device "
                        "listener's + 1 (mDNS TXT `pport`).",
                    },
                },
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas(doc),
            "messages": messages,
            "parameters": PARAMETERS,
            "securitySchemes": {
                "deviceCertificate": {
                    "type": "X509",
                    "description": "The client certificate pairing gave (docs/protocol.md "
                    "§16), issued by the gateway's CA; its CN is the device id.",
                }
            },
        },
    }


# --- YAML, by hand (no YAML library in the project; the output is plain enough) -------------

_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_.$-]*$")
# Plain scalars that YAML 1.1 readers take for booleans or null: always quoted.
_AMBIGUOUS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=False)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            plain = _PLAIN_KEY.match(key) and key.lower() not in _AMBIGUOUS
            name = key if plain else json.dumps(key)
            out.extend(_entry(f"{pad}{name}:", item, indent))
    else:
        for item in value:
            if isinstance(item, dict) and item:
                # "- key: value" with the map's other keys under the first one.
                first, *rest = _lines(item, indent + 2)
                out.extend([f"{pad}- {first[indent + 2 :]}", *rest])
            else:
                out.extend(_entry(f"{pad}-", item, indent))
    return out


def _entry(head: str, item: Any, indent: int) -> list[str]:
    if isinstance(item, dict | list) and item:
        return [head, *_lines(item, indent + 2)]
    if isinstance(item, dict | list):
        return [f"{head} {'{}' if isinstance(item, dict) else '[]'}"]
    if isinstance(item, str) and "\n" in item and not item.startswith((" ", "\n")):
        chomp = "" if item.endswith("\n") else "-"
        body = [" " * (indent + 2) + line if line else "" for line in item.splitlines()]
        return [f"{head} |{chomp}", *body]
    return [f"{head} {_scalar(item)}"]


def render(document: dict[str, Any]) -> str:
    header = "# Generated by scripts/gen_asyncapi.py from hearth.protocol; do not edit.\n"
    return header + "\n".join(_lines(document, 0)) + "\n"


def generate() -> str:
    return render(build(DOC.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is stale: run scripts/gen_asyncapi.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
