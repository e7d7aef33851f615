"""Data labels decide where work runs: private work stays on the home gateway, public work may
overflow to a cloud-tier gateway (placement.py, upstream.py, upstream_link.py).

Three layers: pure tests of the placement rules and of the egress check; a loopback test with a
home gateway (one worker) whose public jobs overflow to a cloud tier while a private job keeps
its worker busy; and the must-show, the same in two network namespaces with a packet capture on
the link between them, searched for the private payloads' marker bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from hearth._task_options import task_install_request
from hearth._tasks_cli import add_task_commands, format_task, install_options
from hearth.errors import ErrorCode, JobError
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    CallJob,
    Error,
    NeedBlob,
    OnnxJob,
    Ping,
    Task,
    TaskInfo,
    TaskInstall,
    Timing,
    Trigger,
    WasmJob,
    WasmResult,
    decode_reply,
    decode_request,
    encode,
    reply_prefix,
    request_topic,
    status_topic,
)
from hearth.transport import BrokerAddress
from hearth_gateway.blobs import BlobStore
from hearth_gateway.crypto import Sealer
from hearth_gateway.dispatch import Dispatcher
from hearth_gateway.errors import ConfigError
from hearth_gateway.loop import Loop
from hearth_gateway.placement import (
    Action,
    Load,
    Placer,
    UpstreamState,
    connection_refusal,
    decide,
    decide_task,
    egress_refusal,
)
from hearth_gateway.policy import Admission, PlacementPolicy, Policy
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.status import read_snapshot
from hearth_gateway.store import Store
from hearth_gateway.upstream import Forwarder, upstream_job_id
from hearth_gateway.upstream_link import EgressRefused, UpstreamLink, UpstreamTarget
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

SHA = "ab" * 32
UP = "gw-cloud"  # the upstream gateway's id in the pure tests
ME = "gw-home"  # our {client} there
POLICY = PlacementPolicy(upstream_when_queue_over=2, upstream_max_in_flight=8)
IDLE = Load(workers=2, busy=0, waiting=0)
DEV_7 = ReplyTo("dev-7", reply_prefix("dev-7") + "r", b"c", 1)  # where dev-7 is answered
BUSY = Load(workers=2, busy=2, waiting=1)  # every worker busy, a job waiting: not yet over 2
SATURATED = Load(workers=2, busy=2, waiting=3)
READY = UpstreamState(target="10.0.0.2:1883", ready=True)


def _decide(
    data_class: str = "public",
    *,
    tier: str = "home",
    runner_here: bool = True,
    can_forward: bool = True,
    load: Load = IDLE,
    upstream: UpstreamState = READY,
    policy: PlacementPolicy = POLICY,
    blob_class: str | None = None,
) -> Any:
    return decide(
        data_class=data_class,
        tier=tier,
        runner="wasm",
        runner_here=runner_here,
        can_forward=can_forward,
        load=load,
        upstream=upstream,
        policy=policy,
        blob_class=blob_class,
    )


# --- placement rules (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("load", [IDLE, BUSY, SATURATED], ids=["idle", "busy", "saturated"])
def test_private_work_stays_here_whatever_the_load(load: Load) -> None:
    decision = _decide("private", load=load)
    assert decision.action in (Action.HERE, Action.QUEUE)
    assert decision.where == "here"
    assert decision.action is (Action.HERE if load is IDLE else Action.QUEUE)


def test_public_work_goes_upstream_only_when_saturated() -> None:
    assert _decide(load=IDLE).action is Action.HERE
    assert _decide(load=BUSY).action is Action.QUEUE  # 1 waiting is not over 2
    decision = _decide(load=SATURATED)
    assert decision.action is Action.UPSTREAM
    assert decision.target == READY.target
    assert decision.where == f"upstream {READY.target}"
    assert "saturated" in decision.reason


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("no upstream", {"upstream": UpstreamState()}),
        ("upstream down", {"upstream": UpstreamState(target="10.0.0.2:1883", ready=False)}),
        ("forwarding off", {"policy": PlacementPolicy(upstream_max_in_flight=0)}),
        ("a stream frame", {"can_forward": False}),
        ("a cloud tier", {"tier": "cloud"}),
    ],
)
def test_saturated_public_work_queues_when_it_may_not_go_upstream(
    why: str, kwargs: dict[str, Any]
) -> None:
    assert _decide(load=SATURATED, **kwargs).action is Action.QUEUE, why


def test_public_work_goes_upstream_for_a_runner_this_gateway_lacks() -> None:
    assert _decide(runner_here=False).action is Action.UPSTREAM
    refused = _decide(runner_here=False, upstream=UpstreamState())
    assert (refused.action, refused.code) == (Action.DENY, ErrorCode.UNSUPPORTED)
    assert refused.reason == "runner 'wasm' is not enabled on this gateway"  # as before


def test_private_work_this_gateway_cannot_run_is_denied_never_forwarded() -> None:
    denied = _decide("private", runner_here=False, load=SATURATED)
    assert (denied.action, denied.code) == (Action.DENY, ErrorCode.POLICY_DENIED)
    assert "never forwarded" in denied.reason
    # Without an upstream there is nowhere it could have gone: the old answer.
    plain = _decide("private", runner_here=False, upstream=UpstreamState())
    assert plain.code is ErrorCode.UNSUPPORTED


def test_a_cloud_tier_refuses_every_private_job() -> None:
    for load in (IDLE, SATURATED):
        denied = _decide("private", tier="cloud", load=load)
        assert (denied.action, denied.code) == (Action.DENY, ErrorCode.POLICY_DENIED)
        assert denied.where == "-"
    assert _decide("public", tier="cloud").action is Action.HERE


def test_no_private_decision_ever_names_the_upstream() -> None:
    """Every combination of inputs: a private job never gets an upstream target."""
    loads = [Load(w, b, q) for w in (1, 2) for b in range(w + 1) for q in (0, 1, 5)]
    upstreams = [READY, UpstreamState(), UpstreamState(target="x:1", ready=False)]
    for load in loads:
        for upstream in upstreams:
            for tier in ("home", "cloud"):
                for runner_here in (True, False):
                    for can_forward in (True, False):
                        for blob_class in (None, "private", "public"):
                            decision = _decide(
                                "private",
                                tier=tier,
                                runner_here=runner_here,
                                can_forward=can_forward,
                                load=load,
                                upstream=upstream,
                                blob_class=blob_class,
                            )
                            assert decision.action is not Action.UPSTREAM
                            assert not decision.target
                        # Nor a public job naming a private blob: the blob would go too.
                        decision = _decide(
                            "public",
                            tier=tier,
                            runner_here=runner_here,
                            can_forward=can_forward,
                            load=load,
                            upstream=upstream,
                            blob_class="private",
                        )
                        assert decision.action is not Action.UPSTREAM
                        assert not decision.target


def test_a_public_job_naming_a_private_blob_runs_here() -> None:
    for load in (IDLE, SATURATED):
        decision = _decide(load=load, blob_class="private")
        assert decision.action is (Action.HERE if load is IDLE else Action.QUEUE)
        assert "blob is private" in decision.reason
    # A runner this gateway lacks: refused, as a private job would be; never forwarded.
    denied = _decide(runner_here=False, blob_class="private")
    assert (denied.action, denied.code) == (Action.DENY, ErrorCode.POLICY_DENIED)
    assert "blob is private" in denied.reason
    assert (
        _decide(runner_here=False, blob_class="private", upstream=UpstreamState()).code
        is ErrorCode.UNSUPPORTED
    )
    # No upstream to keep it from, or a cloud tier: nothing to say about the blob.
    assert "blob" not in _decide(blob_class="private", upstream=UpstreamState()).reason
    assert _decide(tier="cloud", blob_class="private").action is Action.HERE


def test_a_public_job_naming_a_public_blob_may_go_upstream() -> None:
    assert _decide(load=SATURATED, blob_class="public").action is Action.UPSTREAM
    assert _decide(runner_here=False, blob_class="public").action is Action.UPSTREAM
    # Not stored yet: the job is answered need_blob first, then decided again with its label.
    assert _decide(load=SATURATED, blob_class=None).action is Action.UPSTREAM


def test_tasks_run_where_installed_and_a_cloud_tier_takes_only_public_ones() -> None:
    denied = decide_task(data_class="private", tier="cloud")
    assert (denied.action, denied.code, denied.where) == (Action.DENY, ErrorCode.POLICY_DENIED, "-")
    for data_class, tier in (("public", "cloud"), ("private", "home"), ("public", "home")):
        decision = decide_task(data_class=data_class, tier=tier)  # type: ignore[arg-type]
        assert (decision.action, decision.where) == (Action.HERE, "here"), (data_class, tier)


def test_connection_check() -> None:
    assert connection_refusal(tier="home", policy=POLICY, will=None) is None
    assert connection_refusal(tier="cloud", policy=POLICY, will=None)
    assert connection_refusal(
        tier="home", policy=PlacementPolicy(upstream_max_in_flight=0), will=None
    )
    assert connection_refusal(tier="home", policy=POLICY, will=b"offline")


# --- the egress check (pure) ----------------------------------------------------------------------

TOPIC = request_topic(UP, ME)


def _egress(message: Any, topic: str = TOPIC, blobs: dict[str, Any] | None = None) -> str | None:
    payload = message if isinstance(message, bytes) else encode(message)
    return egress_refusal(topic, payload, upstream_id=UP, client_id=ME, blobs=blobs or {})


def test_egress_allows_public_jobs_on_our_request_topic() -> None:
    assert _egress(WasmJob(job_id="j", module=SHA, stdin=b"x", data_class="public")) is None
    assert _egress(OnnxJob(job_id="j", model=SHA, inputs=[], data_class="public")) is None
    assert _egress(CallJob(job_id="j", capability="vision.faces", data_class="public")) is None


def test_egress_refuses_anything_private() -> None:
    assert _egress(WasmJob(job_id="j", module=SHA, stdin=b"x"))  # the default label
    assert _egress(WasmJob(job_id="j", module=SHA, data_class="private"))
    assert _egress(OnnxJob(job_id="j", model=SHA, inputs=[], data_class="private"))
    # Hand-made bytes, whatever their origin: the label inside is what counts.
    raw = encode(WasmJob(job_id="j", module=SHA, data_class="public"))
    assert _egress(raw.replace(b"\xa6public", b"\xa7private")) is not None


@pytest.mark.parametrize(
    "topic",
    [
        request_topic(UP, "dev-7"),  # as another device
        request_topic("gw-other", ME),  # to another gateway
        status_topic(ME),  # a status of ours
        "hearth/v1/dev/dev-7/reply",  # a reply
        "home/lights",  # an ordinary topic
    ],
)
def test_egress_refuses_every_other_topic(topic: str) -> None:
    assert _egress(WasmJob(job_id="j", module=SHA, data_class="public"), topic=topic)


def test_egress_refuses_other_messages() -> None:
    assert _egress(Ping())
    assert _egress(TaskInstall(name="t", module=SHA, triggers=[Trigger(every_s=1.0)]))
    frame = CallJob(job_id="j", capability="vision.motion", stream="cam", data_class="public")
    assert _egress(frame)  # state lives on a worker here: never forwarded
    assert _egress(b"\x00not msgpack")
    assert egress_refusal(TOPIC, b"", upstream_id="", client_id=ME, blobs={}) is not None


def test_egress_uploads_only_public_blobs_a_public_job_in_flight_names() -> None:
    chunk = BlobChunk(sha256=SHA, size=3, offset=0, data=b"abc", data_class="public")
    assert _egress(chunk)
    assert _egress(chunk, blobs={SHA: "public"}) is None
    # Stored here as private: refused, whatever the chunk says of itself.
    assert "private" in (_egress(chunk, blobs={SHA: "private"}) or "")
    # A chunk labelled private, or left at the default: refused even for a public blob.
    assert _egress(BlobChunk(sha256=SHA, size=3, offset=0, data=b"abc"), blobs={SHA: "public"})
    private = BlobChunk(sha256=SHA, size=3, offset=0, data=b"abc", data_class="private")
    assert _egress(private, blobs={SHA: "public"})


def test_the_upstream_link_cannot_publish_a_private_job() -> None:
    """By construction: ``send`` is the link's only way out, and it checks the bytes it is
    about to hand to paho. Here the link is made to look connected and paho's publish is
    replaced by a recorder, so anything that got past the check would be seen."""
    audit: list[tuple[str, ...]] = []
    loop = Loop()
    link = UpstreamLink(
        loop,
        UpstreamTarget(BrokerAddress("127.0.0.1", 1), gateway_id=UP),
        "home",
        policy=POLICY,
        audit=lambda *row: audit.append(row),
        cleared_blobs=lambda: {SHA: "private"},
        on_reply=lambda *_: None,
        on_refused=lambda *_: None,
        on_lost=lambda: None,
    )
    published: list[tuple[str, bytes]] = []

    def record(topic: str, payload: bytes, **_: object) -> Any:
        published.append((topic, payload))
        return type("Info", (), {"rc": 0, "mid": len(published)})()

    link._client.publish = record  # type: ignore[method-assign]
    link.connected = link.upstream_online = True
    try:
        with pytest.raises(EgressRefused):
            link.send(WasmJob(job_id="p", module=SHA, stdin=b"secret"), b"c")
        with pytest.raises(EgressRefused):  # a blob held here as private
            link.send(BlobChunk(sha256=SHA, size=1, offset=0, data=b"s", data_class="public"), b"c")
        with pytest.raises(EgressRefused):  # a blob no public job in flight names
            link.send(
                BlobChunk(sha256="cd" * 32, size=1, offset=0, data=b"s", data_class="public"), b"c"
            )
        assert published == []
        assert [row[1:4] for row in audit] == [("egress", TOPIC, "refused")] * 3
        link.send(WasmJob(job_id="u", module=SHA, stdin=b"fine", data_class="public"), b"c")
        assert [topic for topic, _ in published] == [request_topic(UP, "gw-home")]
        assert decode_request(published[0][1]).data_class == "public"  # type: ignore[union-attr]
    finally:
        link.close()
        loop.close()


# --- blob labels and task installs on a gateway (no broker) -------------------------------------


def _chunks(data: bytes, data_class: str = "private", size: int = 4) -> list[BlobChunk]:
    sha = hashlib.sha256(data).hexdigest()
    return [
        BlobChunk(
            sha256=sha,
            size=len(data),
            offset=o,
            data=data[o : o + size],
            data_class=data_class,  # type: ignore[arg-type]
        )
        for o in range(0, len(data), size)
    ]


def test_a_blob_keeps_the_label_of_its_first_upload(tmp_path: Path) -> None:
    limits = Policy().limits
    store = Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))
    blobs = BlobStore(tmp_path / "blobs", store, limits)
    private, public, mixed = b"private module", b"public module", b"mixed labels"
    for data, label in ((private, "private"), (public, "public"), (private, "public")):
        assert [blobs.receive("dev-7", c) for c in _chunks(data, label)][-1]
    mixed_chunks = _chunks(mixed, "public")
    mixed_chunks[1] = msgspec.structs.replace(mixed_chunks[1], data_class="private")
    assert [blobs.receive("dev-8", c) for c in mixed_chunks][-1]
    sha = {d: hashlib.sha256(d).hexdigest() for d in (private, public, mixed)}
    assert blobs.data_class(sha[private]) == "private"  # the later public upload changed nothing
    assert blobs.data_class(sha[public]) == "public"
    assert blobs.data_class(sha[mixed]) == "private"  # one private chunk: a private blob
    assert blobs.data_class("00" * 32) is None
    store.close()
    store = Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))
    assert BlobStore(tmp_path / "blobs", store, limits).data_class(sha[public]) == "public"
    blobs = BlobStore(tmp_path / "blobs", store, limits)
    blobs.discard(sha[public])  # failed a hash check: a new upload labels it afresh
    assert [blobs.receive("dev-7", c) for c in _chunks(public, "private")][-1]
    assert blobs.data_class(sha[public]) == "private"
    store.close()


def test_blobs_stored_before_labels_count_as_private(tmp_path: Path) -> None:
    """A database from before blob labels gets the column; its blobs are private."""
    path = tmp_path / "db.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, size INTEGER,"
            " stored_at FLOAT, last_used FLOAT)"
        )
        db.execute("INSERT INTO blobs VALUES (?, 3, 0, 0)", (SHA,))
        db.commit()
    blob = tmp_path / "blobs" / SHA[:2] / SHA
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"old")
    store = Store(path, Sealer(os.urandom(32)))
    try:
        blobs = BlobStore(tmp_path / "blobs", store, Policy().limits)
        assert blobs.data_class(SHA) == "private"
        store.add_blob(SHA, 3, "public")  # as a public upload would: the first label stays
        assert store.public_blobs() == set()
        rows = store._conn.execute("SELECT sha256, data_class FROM blobs").fetchall()
        assert rows == [(SHA, "private")]
    finally:
        store.close()


class _Tasks:
    """Stands in for the task manager: installs whatever reaches it."""

    def __init__(self) -> None:
        self.installed: list[TaskInstall] = []

    def owner_seen(self, client_id: str) -> None:
        pass

    def install(self, owner: str, request: TaskInstall) -> Any:
        self.installed.append(request)
        return Task(
            task=TaskInfo(
                task_id="t-000000000001",
                name=request.name,
                owner=owner,
                state="running",
                data_class=request.data_class,
            )
        )

    def control(self, client_id: str, request: Any) -> Any:
        raise AssertionError

    def list_tasks(self, client_id: str, request: Any = None) -> Any:
        raise AssertionError


@pytest.mark.parametrize("tier", ["cloud", "home"])
def test_a_cloud_tier_installs_public_tasks_only(tier: str, tmp_path: Path) -> None:
    policy = Policy()
    store = Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))
    blobs = BlobStore(tmp_path / "blobs", store, policy.limits)
    published: list[bytes] = []
    tasks = _Tasks()
    placer = Placer(
        tier=tier,
        policy=policy.placement,
        runners={"wasm", "task"},  # type: ignore[arg-type]
        load=lambda: IDLE,
        store=store,
        blob_class=blobs.data_class,
    )
    dispatcher = Dispatcher(
        gateway_id="gw",
        policy=policy,
        store=store,
        blobs=blobs,
        admission=Admission(policy.limits),
        pool=None,  # type: ignore[arg-type]
        runners=["wasm", "task"],
        publish=lambda _to, payload: published.append(payload),
        placer=placer,
        tasks=tasks,
    )
    try:
        for label in ("private", "public"):
            install = TaskInstall(
                name=f"t-{label}", module=SHA, triggers=[Trigger(every_s=1.0)], data_class=label
            )  # type: ignore[arg-type]
            dispatcher.handle(request_topic("gw", "dev-7"), encode(install), DEV_7)
        private_reply, public_reply = map(decode_reply, published)
        assert isinstance(public_reply, Task)
        assert public_reply.task.data_class == "public"
        if tier == "cloud":
            assert isinstance(private_reply, Error)
            assert private_reply.code is ErrorCode.POLICY_DENIED
            assert [t.name for t in tasks.installed] == ["t-public"]
        else:  # a home gateway installs both; neither is ever forwarded
            assert isinstance(private_reply, Task)
            assert private_reply.task.data_class == "private"
        rows = store._conn.execute("SELECT action, target, decision FROM audit").fetchall()
        assert rows == [
            (
                "place:private",
                "-" if tier == "cloud" else "here",
                "refused" if tier == "cloud" else "allowed",
            ),
            ("place:public", "here", "allowed"),
        ]
    finally:
        store.close()


@pytest.mark.parametrize("tier", ["cloud", "home"])
def test_a_cloud_tier_keeps_no_private_blob(tier: str, tmp_path: Path) -> None:
    policy = Policy()
    store = Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))
    blobs = BlobStore(tmp_path / "blobs", store, policy.limits)
    published: list[bytes] = []
    placer = Placer(
        tier=tier,
        policy=policy.placement,
        runners={"wasm"},  # type: ignore[arg-type]
        load=lambda: IDLE,
        store=store,
        blob_class=blobs.data_class,
    )
    dispatcher = Dispatcher(
        gateway_id="gw",
        policy=policy,
        store=store,
        blobs=blobs,
        admission=Admission(policy.limits),
        pool=None,  # type: ignore[arg-type]
        runners=["wasm"],
        publish=lambda _to, payload: published.append(payload),
        placer=placer,
    )
    try:
        for label in ("private", "public"):
            data = f"{label} module bytes".encode()
            chunk = BlobChunk(
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                offset=0,
                data=data,
                data_class=label,
            )  # type: ignore[arg-type]
            dispatcher.handle(request_topic("gw", "dev-7"), encode(chunk), DEV_7)
        private_reply, public_reply = map(decode_reply, published)
        assert isinstance(public_reply, BlobStored)
        if tier == "cloud":
            assert isinstance(private_reply, Error)
            assert private_reply.code is ErrorCode.POLICY_DENIED
            assert not blobs.has(hashlib.sha256(b"private module bytes").hexdigest())
        else:
            assert isinstance(private_reply, BlobStored)
    finally:
        store.close()


def test_the_task_clis_label_with_public() -> None:
    parser = argparse.ArgumentParser()
    add_task_commands(parser, lambda _sub: None)
    for argv, label in ((["--public"], "public"), ([], "private")):
        args = parser.parse_args(["install", "t.wasm", "--name", "t", "--every", "5", *argv])
        request = task_install_request(SHA, "t", **install_options(args))
        assert request.data_class == label
    info = TaskInfo(
        task_id="t-000000000001", name="t", owner="dev-7", state="running", data_class="public"
    )
    assert "data class  public" in format_task(info)


def test_upstream_urls() -> None:
    plain = UpstreamTarget.parse("mqtt://10.0.0.2")
    assert (str(plain.address), plain.tls) == ("10.0.0.2:1883", False)
    tls = UpstreamTarget.parse("mqtts://cloud.example:9883", ca_file="ca.pem")
    assert (str(tls.address), tls.tls, tls.ca_file) == ("cloud.example:9883", True, "ca.pem")
    assert UpstreamTarget.parse("mqtts://cloud.example").address.port == 8883
    with pytest.raises(ConfigError):
        UpstreamTarget.parse("mqtt://10.0.0.2", cert_file="me.pem")  # TLS files, plain link


class _FakeLink:
    """Stands in for UpstreamLink: records what the forwarder sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, bytes]] = []
        self.ready = True
        self.upstream_id = UP
        self.target = UpstreamTarget(BrokerAddress("10.0.0.2", 1883))
        self.members: set[str] = set()  # pool members named by the upstream (test_pool.py)

    def send(self, message: Any, correlation: bytes, to: str = "") -> None:
        self.sent.append((message, correlation))

    def close(self) -> None:
        pass


def test_the_forwarder_relays_uploads_and_falls_back(tmp_path: Path) -> None:
    """Answers go back under the device's job id with ``timing.upstream``; a need_blob is
    answered from the blob store; refusals, silence and a lost link send the job home."""
    module = b"\0asm-module"
    sha = hashlib.sha256(module).hexdigest()
    (tmp_path / sha).write_bytes(module)
    labels = {sha: "public"}
    blobs = type(
        "Blobs",
        (),
        {"path": lambda _self, s: tmp_path / s, "data_class": lambda _self, s: labels.get(s)},
    )()
    relayed: list[tuple[str, bytes]] = []
    home: list[tuple[str, str]] = []
    loop = Loop()
    forwarder = Forwarder(
        loop,
        UpstreamTarget(BrokerAddress("10.0.0.2", 1883)),
        "home",
        policy=PlacementPolicy(upstream_timeout_s=0.2),
        blobs=blobs,  # type: ignore[arg-type]
        audit=lambda *_: None,
        relay=lambda item, reply: relayed.append((item.job.job_id, reply)),
        fallback=lambda item, why: home.append((item.job.job_id, why)),
    )
    link = _FakeLink()
    forwarder.link = link  # type: ignore[assignment]

    def forward(job_id: str) -> bytes:
        job = WasmJob(job_id=job_id, module=sha, stdin=b"in", data_class="public")
        forwarder.forward(job, ReplyTo("dev-7", "hearth/v1/dev/dev-7/reply", b"corr", 1))
        message, token = link.sent[-1]
        assert message.job_id == upstream_job_id("dev-7", job_id) != job_id
        return token

    try:
        assert upstream_job_id("dev-7", "j") != upstream_job_id("dev-8", "j")
        token = forward("ok")
        forwarder._reply(token, encode(NeedBlob(job_id="x", sha256=sha, max_chunk=5)))
        chunks = [m for m, c in link.sent if isinstance(m, BlobChunk)]
        assert b"".join(c.data for c in chunks) == module
        assert len(chunks) == 3  # 12 bytes in chunks of 5
        assert {c.data_class for c in chunks} == {"public"}
        assert forwarder._cleared_blobs() == {sha: "public"}
        forwarder._reply(b"blob:" + sha.encode(), encode(BlobStored(sha256=sha, size=12)))
        assert isinstance(link.sent[-1][0], WasmJob)  # sent again once the blob is there
        result = WasmResult(
            job_id="x", exit_code=0, stdout=b"out", stderr=b"", timing=Timing(1.0, 2.0)
        )
        forwarder._reply(token, encode(result))
        job_id, reply = relayed[-1]
        answer = decode_reply(reply)
        assert isinstance(answer, WasmResult)
        assert (job_id, answer.job_id, answer.stdout) == ("ok", "ok", b"out")
        assert answer.timing == Timing(1.0, 2.0, upstream=UP)

        trapped = forward("trap")  # the job's own fault: its answer
        forwarder._reply(trapped, encode(Error(code=ErrorCode.TRAP, message="boom")))
        assert decode_reply(relayed[-1][1]) == Error(
            code=ErrorCode.TRAP, message="boom", job_id="trap"
        )
        busy = forward("busy")  # the upstream's state: runs here
        forwarder._reply(busy, encode(Error(code=ErrorCode.OVERLOADED, message="full")))
        assert home[-1][0] == "busy"
        assert "overloaded" in home[-1][1]
        forward("silent")
        assert loop.run_until(lambda: len(home) == 2, 5)
        assert home[-1][0] == "silent"
        assert "no answer" in home[-1][1]
        forward("cut")
        forwarder._lost()
        assert home[-1][0] == "cut"
        assert forwarder.idle
        forwarder._reply(busy, encode(result))  # late answers are dropped
        assert len(relayed) == 2
        private = WasmJob(job_id="p", module=sha, stdin=b"secret")
        sent_before = len(link.sent)
        forwarder.forward(private, DEV_7)
        assert len(link.sent) == sent_before  # never handed to the link
        assert home[-1] == ("p", "a private job is never forwarded")

        # A public job naming a private blob is not forwarded either (placement keeps it here;
        # this is the forwarder's own check), and a private blob is never uploaded.
        secret = hashlib.sha256(b"private module").hexdigest()
        labels[secret] = "private"
        forwarder.forward(WasmJob(job_id="pb", module=secret, data_class="public"), DEV_7)
        assert len(link.sent) == sent_before
        assert home[-1][0] == "pb"
        assert "private" in home[-1][1]
        token = forward("relabelled")  # public when forwarded, private by the time it is asked
        labels[sha] = "private"
        forwarder._reply(token, encode(NeedBlob(job_id="x", sha256=sha, max_chunk=5)))
        assert not [m for m, _ in link.sent[sent_before + 1 :] if isinstance(m, BlobChunk)]
        assert home[-1][0] == "relabelled"
        assert "private" in home[-1][1]
    finally:
        forwarder.close()
        loop.close()


# --- loopback: a home gateway overflowing to a cloud tier -----------------------------------------


def _config(path: Path, **values: object) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# The home gateway: one worker, which a private "spin" job keeps busy until the wall-clock limit
# kills it; public jobs overflow as soon as one job waits behind it.
_HOME_POLICY = """
[wasm]
fuel = 10_000_000_000_000
wall_timeout_s = {spin_s}
[placement]
upstream_when_queue_over = 0
"""


def _audit(gw_state: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "audit",
            "--json",
            "--limit",
            "10000",
            "--state-dir",
            str(gw_state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_public_work_overflows_to_the_cloud_tier_private_work_never_does(
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
    examples: Path,
) -> None:
    cloud = make_gateway(
        "--workers",
        "1",
        "--tier",
        "cloud",
        "--config",
        _config(tmp_path / "cloud.toml", runners=["wasm", "onnx"]),
        managed=True,
    )
    policy = tmp_path / "home-policy.toml"
    policy.write_text(_HOME_POLICY.format(spin_s=6.0))
    home = make_gateway(
        "--workers",
        "1",
        "--policy",
        str(policy),
        "--upstream",
        f"mqtt://{cloud.address}",
        "--config",
        _config(tmp_path / "home.toml", runners=["wasm"]),
        managed=True,
    )
    assert wait_until(lambda: home.snapshot().upstream_connected, 15), home.log()
    spin, echo = wasm["spin"].read_bytes(), wasm["echo"].read_bytes()
    echo_sha = hashlib.sha256(echo).hexdigest()
    # The same program under another hash (a custom section appended), uploaded as private.
    echo_private = echo + b"\x00\x05\x04hrth"
    echo_private_sha = hashlib.sha256(echo_private).hexdigest()
    private = {f"p{i}": os.urandom(16) for i in range(3)}
    public = {f"u{i}": os.urandom(16) for i in range(3)}
    sdk = home.client(placement="auto")
    sdk.ping()  # connected before the clock starts
    try:
        with RawDevice(home.listen, home.gateway_id) as dev:
            assert isinstance(dev.upload(spin), BlobStored)
            assert isinstance(dev.upload(echo, data_class="public"), BlobStored)
            assert isinstance(dev.upload(echo_private), BlobStored)
            # A public upload of the same bytes later does not make them public.
            assert isinstance(dev.upload(echo_private, data_class="public"), BlobStored)
            started = time.monotonic()
            spinning = dev.send(WasmJob(job_id="spin", module=hashlib.sha256(spin).hexdigest()))
            sent = {
                job_id: dev.send(
                    WasmJob(
                        job_id=job_id,
                        module=echo_sha,
                        stdin=marker,
                        data_class="public" if job_id in public else "private",
                    )
                )
                for job_id, marker in (private | public).items()
            }
            # Public, saturated, but its module is a private blob: it runs here, after the spin.
            sent["u-privblob"] = dev.send(
                WasmJob(
                    job_id="u-privblob", module=echo_private_sha, stdin=b"pb", data_class="public"
                )
            )
            # The SDK's own path, while the box is still saturated: comes back as a WasmRun.
            run = sdk.run_wasm(echo, stdin=b"sdk public", data_class="public")
            answers = {job_id: dev.reply(c, timeout_s=40) for job_id, c in sent.items()}
            spun = dev.reply(spinning, timeout_s=40)
            done_at = time.monotonic() - started
        # Public: ran upstream, answered under the device's own job id, while the one worker
        # here was still spinning.
        for job_id, marker in public.items():
            answer = answers[job_id]
            assert isinstance(answer, WasmResult), answer
            assert (answer.job_id, answer.stdout, answer.timing.upstream) == (
                job_id,
                marker,
                cloud.gateway_id,
            )
        assert (run.where, run.stdout, run.timing and run.timing.upstream) == (
            "edge",
            b"sdk public",
            cloud.gateway_id,
        )
        assert run.latency_ms < 6000, "the public job waited for the private spin"
        # Private: queued behind the spin and ran here.
        assert isinstance(spun, Error)
        assert spun.code is ErrorCode.TIMEOUT
        for job_id, marker in private.items():
            answer = answers[job_id]
            assert isinstance(answer, WasmResult), answer
            assert (answer.stdout, answer.timing.upstream) == (marker, "")
        answer = answers["u-privblob"]
        assert isinstance(answer, WasmResult), answer
        assert (answer.stdout, answer.timing.upstream) == (b"pb", "")
        assert done_at >= 6.0

        # A runner this gateway lacks: public work goes up, private work is refused (and the
        # SDK in auto mode then runs it on the device).
        model = examples / "models" / "digits.onnx"
        x = np.load(examples / "models" / "digits_test_X.npy")[:4]
        remote = sdk.infer(model, {"input": x}, data_class="public")
        assert remote.where == "edge"
        assert remote.timing is not None
        assert remote.timing.upstream == cloud.gateway_id
        local = sdk.infer(model, {"input": x})
        assert local.where == "local"
        assert "policy_denied" in local.reason
        np.testing.assert_array_equal(local.outputs["label"], remote.outputs["label"])
        with RawDevice(home.listen, home.gateway_id) as dev:
            model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
            denied = dev.request(OnnxJob(job_id="priv-onnx", model=model_sha, inputs=[]))
            assert isinstance(denied, Error)
            assert denied.code is ErrorCode.POLICY_DENIED

        # The cloud tier itself refuses private work, and private tasks (the default label).
        with RawDevice(cloud.listen, cloud.gateway_id) as dev:
            refused = dev.request(WasmJob(job_id="direct", module=echo_sha, stdin=b"x"))
            assert isinstance(refused, Error)
            assert refused.code is ErrorCode.POLICY_DENIED
            task = dev.request(
                TaskInstall(name="t", module=echo_sha, triggers=[Trigger(every_s=1.0)])
            )
            assert isinstance(task, Error)
            assert task.code is ErrorCode.POLICY_DENIED
        # The SDK does not even send a private task install to a cloud tier (its config would
        # travel with it).
        with cloud.client() as cloud_sdk, pytest.raises(JobError) as forbidden:
            cloud_sdk.install_task(echo, "t", every_s=1.0)
        assert forbidden.value.code is ErrorCode.FORBIDDEN
        assert "cloud tier" in forbidden.value.message
    finally:
        sdk.close()

    # What reached the cloud tier from the home gateway (its {client} there is gw-{id}): the
    # five public jobs, each placed there as public; not one private job. (The broker's ACL
    # keeps a spy off the request topics; the capture test below checks the bytes.)
    cloud_rows = _audit(cloud.state_dir)
    from_home = [r for r in cloud_rows if r["actor"] == f"gw-{home.gateway_id}"]
    assert [r["action"] for r in from_home] == ["place:public"] * (len(public) + 2)
    assert wait_until(lambda: cloud.snapshot().jobs_completed == len(public) + 2, 10)

    # Every decision is in the audit table, with device, label, target and reason.
    rows = _audit(home.state_dir)
    placed = {
        r["reason"].split(":")[0].removeprefix("job "): r
        for r in rows
        if r["action"].startswith("place:")
    }
    for job_id in private:
        assert placed[job_id]["action"] == "place:private"
        assert (placed[job_id]["target"], placed[job_id]["decision"]) == ("here", "allowed")
    for job_id in public:
        assert placed[job_id]["action"] == "place:public"
        assert placed[job_id]["target"] == f"upstream {cloud.address}"
        assert "saturated" in placed[job_id]["reason"]
    assert (placed["u-privblob"]["action"], placed["u-privblob"]["target"]) == (
        "place:public",
        "here",
    )
    assert "blob is private" in placed["u-privblob"]["reason"]
    assert (placed["priv-onnx"]["decision"], placed["priv-onnx"]["target"]) == ("refused", "-")
    assert not [r for r in rows if r["action"] == "place:private" and "upstream" in r["target"]]
    assert any(r["action"] == "egress:connect" and r["decision"] == "allowed" for r in rows)
    assert any(
        r["action"] == "place:private" and r["decision"] == "refused" and "direct" in r["reason"]
        for r in cloud_rows
    )
    assert wait_until(lambda: home.snapshot().jobs_forwarded >= len(public) + 2, 10)
    assert cloud.snapshot().tier == "cloud"


# --- the must-show: two network namespaces, a capture on the link between them ----------------


@dataclass
class _Net:
    lan: str  # namespace: the home gateway, its broker, the device
    wan: str  # namespace: the cloud-tier gateway and its broker
    lan_if: str  # the LAN end of the veth pair: the only way out of the LAN namespace
    lan_ip: str
    wan_ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, ns: str, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT
        )
        if log is not None:
            out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def net() -> Iterator[_Net]:
    """Two fresh namespaces joined by a veth pair whose ends are created inside them (so the
    host's interfaces and routes are never touched), with 10.x addresses that exist only in
    them. The teardown kills what runs in them and deletes them, whatever the test did."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces (CI runs this as root)")
    for tool in ("ip", "tcpdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool!r} (iproute2, tcpdump)")
    suffix = uuid.uuid4().hex[:6]
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    net = _Net(
        f"hearth-lan-{suffix}", f"hearth-wan-{suffix}", f"hl{suffix}", f"{subnet}.1", f"{subnet}.2"
    )
    created: list[str] = []
    try:
        for ns in (net.lan, net.wan):
            result = _ip("netns", "add", ns)
            if result.returncode != 0:
                pytest.skip(f"`ip netns add` does not work here: {result.stderr.strip()}")
            created.append(ns)
        wan_if = f"hw{suffix}"
        # A table of ip(8) commands, one a line as they would be typed (left as written: the
        # formatter would spread the first over twelve lines).
        for argv in (
            (
                "-n",
                net.lan,
                "link",
                "add",
                net.lan_if,
                "type",
                "veth",
                "peer",
                "name",
                wan_if,
                "netns",
                net.wan,
            ),
            ("-n", net.lan, "addr", "add", f"{net.lan_ip}/24", "dev", net.lan_if),
            ("-n", net.wan, "addr", "add", f"{net.wan_ip}/24", "dev", wan_if),
            ("-n", net.lan, "link", "set", net.lan_if, "up"),
            ("-n", net.wan, "link", "set", wan_if, "up"),
            ("-n", net.lan, "link", "set", "lo", "up"),
            ("-n", net.wan, "link", "set", "lo", "up"),
        ):
            result = _ip(*argv)
            assert result.returncode == 0, f"ip {' '.join(argv)}: {result.stderr}"
        yield net
    finally:
        for proc in net.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for ns in created:
            # Anything still in the namespace was started by this test (a broker, a worker).
            for pid in _ip("netns", "pids", ns).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns)


def _start_gateway(net: _Net, ns: str, tmp_path: Path, *args: str) -> tuple[str, Path]:
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    state = tmp_path / gateway_id / "state"
    state.mkdir(parents=True)
    net.run(
        ns,
        sys.executable,
        "-m",
        "hearth_gateway.cli",
        "run",
        "--gateway-id",
        gateway_id,
        "--state-dir",
        str(state),
        "--no-mdns",
        *args,
        log=tmp_path / f"{gateway_id}.log",
    )
    return gateway_id, state


def _online(state: Path, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"gateway exited {proc.returncode}:\n{log.read_text(errors='replace')}")
    snap = read_snapshot(state)
    return snap is not None and snap.state == "online" and snap.pid == proc.pid


def _tcpdump(net: _Net, iface: str, pcap: Path) -> subprocess.Popen[bytes]:
    """A capture in the LAN namespace; returns once tcpdump says it is listening. ``-Z root``:
    it would otherwise drop to a user that cannot write into the test's directory."""
    log = pcap.with_suffix(".log")
    proc = net.run(
        net.lan,
        "tcpdump",
        "-i",
        iface,
        "-w",
        str(pcap),
        "-U",
        "-n",
        "-s",
        "0",
        "-Z",
        "root",
        log=log,
    )
    assert wait_until(lambda: b"listening on" in log.read_bytes(), 10), log.read_text()
    return proc


def _tcp_payloads(pcap: bytes) -> tuple[int, dict[tuple[str, int, str, int], bytes]]:
    """(packets, the TCP byte stream of each direction of each connection) of an Ethernet
    pcap: segments in sequence order, retransmissions once. Searching these as well as the
    raw file catches a marker that a segment boundary splits in two."""
    endian = "<" if pcap[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    (link_type,) = struct.unpack(endian + "I", pcap[20:24])
    assert link_type == 1, f"expected an Ethernet capture, got link type {link_type}"
    segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    offset, packets = 24, 0
    while offset + 16 <= len(pcap):
        _, _, length, _ = struct.unpack(endian + "IIII", pcap[offset : offset + 16])
        frame = pcap[offset + 16 : offset + 16 + length]
        offset += 16 + length
        packets += 1
        if frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[23] != 6:
            continue  # not IPv4/TCP (ARP, IPv6 neighbour discovery)
        ip = frame[14:]
        header, (total,) = (ip[0] & 15) * 4, struct.unpack(">H", ip[2:4])
        tcp = ip[header:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            key = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
            segments.setdefault(key, {})[seq] = payload
    return packets, {k: b"".join(v[s] for s in sorted(v)) for k, v in segments.items()}


# Runs in the LAN namespace: a device on the home gateway's broker (the namespace's loopback).
# One private job keeps the home gateway's only worker busy; then private and public echo jobs
# whose stdin is a marker. Prints every answer as JSON.
_DEVICE = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from helpers import RawDevice
from hearth.protocol import BlobStored, WasmJob, WasmResult
from hearth.transport import BrokerAddress

spec = json.loads(sys.argv[2])
modules = {name: open(path, "rb").read() for name, path in spec["modules"].items()}
sha = {name: hashlib.sha256(data).hexdigest() for name, data in modules.items()}
with RawDevice(BrokerAddress.parse(spec["broker"]), spec["gateway"]) as dev:
    for name, data in modules.items():  # echo serves public jobs: a public blob
        label = "public" if name == "echo" else "private"
        assert isinstance(dev.upload(data, data_class=label), BlobStored)
    sent = {"spin": dev.send(WasmJob(job_id="spin", module=sha["spin"]))}
    for job_id, (label, marker) in spec["jobs"].items():
        job = WasmJob(job_id=job_id, module=sha["echo"], stdin=bytes.fromhex(marker),
                      data_class=label)
        sent[job_id] = dev.send(job)
    answers = {}
    for job_id, correlation in sent.items():
        reply = dev.reply(correlation, timeout_s=60)
        if isinstance(reply, WasmResult):
            answers[job_id] = {"stdout": reply.stdout.hex(), "upstream": reply.timing.upstream}
        else:
            answers[job_id] = {"error": str(getattr(reply, "code", type(reply).__name__))}
print(json.dumps(answers))
"""


@pytest.mark.root
def test_no_private_byte_crosses_the_link_to_the_cloud_tier(
    net: _Net, tmp_path: Path, wasm: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The home gateway and a device in a LAN namespace, a cloud-tier gateway in a WAN
    namespace, tcpdump on the only link between them. The upstream link is plaintext MQTT on
    purpose: over TLS a marker search would find nothing either way and prove nothing."""
    spin_s = 5.0
    policy = tmp_path / "home-policy.toml"
    policy.write_text(_HOME_POLICY.format(spin_s=spin_s))
    runners = _config(tmp_path / "runners.toml", runners=["wasm"])
    cloud_id, cloud_state = _start_gateway(
        net,
        net.wan,
        tmp_path,
        "--tier",
        "cloud",
        "--workers",
        "1",
        "--config",
        runners,
        "--listen",
        f"{net.wan_ip}:1883",
    )
    cloud_proc = net.procs[-1]
    wan_pcap, lo_pcap = tmp_path / "lan-to-wan.pcap", tmp_path / "lan-loopback.pcap"
    captures = [_tcpdump(net, net.lan_if, wan_pcap), _tcpdump(net, "lo", lo_pcap)]
    assert wait_until(lambda: _online(cloud_state, cloud_proc, tmp_path / f"{cloud_id}.log"), 45)
    home_id, home_state = _start_gateway(
        net,
        net.lan,
        tmp_path,
        "--workers",
        "1",
        "--config",
        runners,
        "--policy",
        str(policy),
        "--listen",
        "127.0.0.1:1883",
        "--upstream",
        f"mqtt://{net.wan_ip}:1883",
    )
    home_proc = net.procs[-1]
    home_log = tmp_path / f"{home_id}.log"
    assert wait_until(lambda: _online(home_state, home_proc, home_log), 45)
    assert wait_until(lambda: read_snapshot(home_state).upstream_connected, 30), (  # type: ignore[union-attr]
        home_log.read_text()
    )

    private = {f"private-{i}": os.urandom(16) for i in range(4)}
    public = {f"public-{i}": os.urandom(16) for i in range(4)}
    spec = {
        "broker": "127.0.0.1:1883",
        "gateway": home_id,
        "modules": {"spin": str(wasm["spin"]), "echo": str(wasm["echo"])},
        "jobs": {
            job_id: [("private" if job_id in private else "public"), marker.hex()]
            for job_id, marker in (private | public).items()
        },
    }
    device = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            net.lan,
            sys.executable,
            "-c",
            _DEVICE,
            str(Path(__file__).parent),
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert device.returncode == 0, device.stderr + home_log.read_text()
    answers = json.loads(device.stdout)

    for proc in captures:  # stop capturing; tcpdump writes out what it has on SIGINT
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    for proc in (home_proc, cloud_proc):
        proc.send_signal(signal.SIGTERM)
    assert (home_proc.wait(timeout=60), cloud_proc.wait(timeout=60)) == (0, 0)

    # Every job succeeded; public ones ran on the cloud tier, private ones here.
    assert answers["spin"] == {"error": "timeout"}  # kept the one worker busy for spin_s
    for job_id, marker in private.items():
        assert answers[job_id] == {"stdout": marker.hex(), "upstream": ""}, job_id
    for job_id, marker in public.items():
        assert answers[job_id] == {"stdout": marker.hex(), "upstream": cloud_id}, job_id

    raw = wan_pcap.read_bytes()
    packets, streams = _tcp_payloads(raw)
    wire = list(streams.values())
    # Only the upstream connection crossed the link (the reachability probe included).
    assert streams
    assert {(k[0], k[2], 1883 in (k[1], k[3])) for k in streams} <= {
        (net.lan_ip, net.wan_ip, True),
        (net.wan_ip, net.lan_ip, True),
    }
    leaked = [job_id for job_id, m in private.items() if m in raw or any(m in s for s in wire)]
    crossed = [job_id for job_id, m in public.items() if m in raw and any(m in s for s in wire)]
    assert leaked == [], f"private payloads on the link to the WAN: {leaked}"
    assert crossed == sorted(public), "every public payload crossed the link"
    # The control: the same private markers are in the clear on the LAN namespace's loopback,
    # between the device and the home gateway, so the search would have found them.
    loopback = lo_pcap.read_bytes()
    assert all(m in loopback for m in private.values())

    rows = _audit(home_state)
    for job_id in private:
        row = next(r for r in rows if r["reason"].startswith(f"job {job_id}:"))
        assert (row["action"], row["target"]) == ("place:private", "here")
    for job_id in public:
        row = next(r for r in rows if r["reason"].startswith(f"job {job_id}:"))
        assert (row["action"], row["target"]) == ("place:public", f"upstream {net.wan_ip}:1883")
    assert not [r for r in _audit(cloud_state) if r["action"] == "place:private"]
    with capsys.disabled():
        print(
            f"\ncapture on {net.lan_if}: {len(raw)} bytes, {packets} packets, "
            f"{sum(map(len, wire))} TCP payload bytes in {len(wire)} directions; "
            f"public markers found {len(crossed)}/{len(public)}, "
            f"private markers found {len(leaked)}/{len(private)} "
            f"(on the LAN loopback: {sum(m in loopback for m in private.values())}"
            f"/{len(private)})"
        )
