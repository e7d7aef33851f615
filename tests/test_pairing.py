"""Pairing, mutual TLS and the broker's ACLs, against a real gateway and its managed Mosquitto
(docs/security.md): an unpaired device cannot connect; a code works once and expires; wrong
codes are refused and counted; device A can neither submit as B nor read B's replies; a revoked
device is locked out at once, without a restart; each of these decisions is audited.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import queue
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hearth import Client
from hearth.errors import ErrorCode, GatewayUnavailable, JobError
from hearth.pairing import Pairing, PairingError, pair
from hearth.protocol import Error, Ping, encode, reply_prefix, request_topic
from hearth.protocol.pairing import (
    PairCa,
    PairHello,
    PairRequest,
    PairResult,
    new_code,
    normalize_code,
    pair_request_topic,
)
from hearth.transport import BrokerAddress, TlsFiles, make_client, publish_properties
from hearth_gateway.acl import lan_acl, local_acl
from hearth_gateway.crypto import Sealer
from hearth_gateway.pki import LocalCA, fingerprint
from hearth_gateway.policy import Admission, Policy
from hearth_gateway.store import Store
from testkit.gateway import GatewayProcess
from testkit.net import free_port

NOT_AUTHORIZED = 0x87


@dataclass
class SecureGateway:
    gw: GatewayProcess
    lan: BrokerAddress
    pairing: BrokerAddress

    @property
    def state_dir(self) -> Path:
        return self.gw.state_dir

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hearth_gateway.cli", *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def code(self) -> dict[str, Any]:
        result = self.admin("pair", "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def pair(self, device_id: str, directory: Path, code: dict[str, Any] | None = None) -> Pairing:
        issued = code or self.code()
        return pair(
            issued["code"],
            str(self.pairing),
            ca_fingerprint=issued["ca_fingerprint"],
            device_id=device_id,
            directory=directory,
            timeout_s=10,
        )

    def audit(self) -> list[dict[str, Any]]:
        result = self.admin("audit", "--json", "--limit", "1000")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def secure(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> Callable[..., SecureGateway]:
    """A gateway with its device (TLS) and pairing listeners; keyword arguments go into its
    configuration file."""

    def make(*, mdns: bool = False, **config: object) -> SecureGateway:
        lan = BrokerAddress("127.0.0.1", free_port())
        pairing = BrokerAddress("127.0.0.1", free_port())
        conf = tmp_path / f"{uuid.uuid4().hex[:8]}.toml"
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        gw = make_gateway(
            "--lan-listen",
            str(lan),
            "--pairing-listen",
            str(pairing),
            "--config",
            str(conf),
            *(["--mdns-interface", "127.0.0.1"] if mdns else []),
            managed=True,
        )
        return SecureGateway(gw, lan, pairing)

    return make


@pytest.fixture
def device_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """A configuration directory per device; ``use(name)`` makes it the SDK's current one."""

    def use(name: str) -> Path:
        directory = tmp_path / "devices" / name
        monkeypatch.setenv("HEARTH_CONFIG_DIR", str(directory))
        return directory

    return use


class TlsDevice:
    """A raw MQTT 5 connection with a paired device's certificate: reason codes, not the SDK's
    interpretation of them."""

    def __init__(self, address: BrokerAddress, tls: TlsFiles | None, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, Any] = {}
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.client = make_client(client_id, tls=tls)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.__setitem__(mid, reason)
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: self.subacks.put(reasons)
        self.client.on_connect = self._on_connect
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused.append(str(reason))
        else:
            self.connected.set()

    def subscribe(self, topic: str) -> list[Any]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, response_topic: str = "") -> int:
        """The PUBACK's reason code."""
        props = publish_properties(response_topic or topic, uuid.uuid4().bytes)
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.01)
        return int(self.acks[info.mid].value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connects(address: BrokerAddress, tls: TlsFiles | None, timeout_s: float = 3.0) -> bool:
    client = make_client(f"probe-{uuid.uuid4().hex[:8]}", tls=tls)
    connected = threading.Event()
    over = threading.Event()  # CONNACK or the connection closed, whichever first
    client.on_connect = lambda _c, _u, _f, reason, _p: (
        over.set() if reason.is_failure else (connected.set(), over.set())
    )
    client.on_disconnect = lambda *_: over.set()
    try:
        client.connect(address.host, address.port)
    except (OSError, ssl.SSLError):
        return False
    client.loop_start()
    try:
        over.wait(timeout_s)
        return connected.is_set()
    finally:
        client.disconnect()
        client.loop_stop()


# -- connecting --------------------------------------------------------------------------------


def test_an_unpaired_device_cannot_connect(secure, device_dir, tmp_path: Path, wasm) -> None:
    gw = secure()
    issued = gw.code()
    ca = tmp_path / "ca.pem"
    ca.write_text((gw.state_dir / "pki" / "ca.pem").read_text())
    # Without a certificate, with one from another CA, in plain MQTT: no session.
    assert not _connects(gw.lan, TlsFiles(str(ca)))
    stranger = LocalCA(tmp_path / "other-ca", "elsewhere")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .sign(key, hashes.SHA256())
    )
    cert = stranger.sign_device(csr.public_bytes(serialization.Encoding.DER), "intruder")
    (tmp_path / "intruder.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "intruder.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert not _connects(
        gw.lan, TlsFiles(str(ca), str(tmp_path / "intruder.pem"), str(tmp_path / "intruder.key"))
    )
    assert not _connects(gw.lan, None)
    # The SDK has no pairing for it either: no gateway for this device there.
    device_dir("unpaired")
    with (
        pytest.raises(GatewayUnavailable),
        Client(str(gw.lan), placement="edge", timeout_s=3) as client,
    ):
        client.run_wasm(wasm["echo"], stdin=b"x")
    # Once paired, the same device gets in.
    device_dir("paired")
    paired = gw.pair("cam-1", Path(os.environ["HEARTH_CONFIG_DIR"]), issued)
    assert _connects(gw.lan, paired.tls())
    with Client(str(gw.lan), placement="edge", timeout_s=20) as client:
        run = client.run_wasm(wasm["echo"], stdin=b"over mutual TLS")
    assert (run.where, run.stdout, run.gateway_id) == ("edge", b"over mutual TLS", gw.gw.gateway_id)


def test_mdns_carries_the_tls_port_and_the_ca_fingerprint(secure) -> None:
    from hearth.discovery import discover

    gw = secure(mdns=True)
    found = [
        g
        for g in discover(3.0, interface="127.0.0.1", measure=False)
        if g.gateway_id == gw.gw.gateway_id
    ]
    assert found, "the gateway was not discovered"
    info = found[0]
    ca = x509.load_pem_x509_certificate((gw.state_dir / "pki" / "ca.pem").read_bytes())
    assert info.tls
    assert (info.broker.port, info.pairing_port) == (gw.lan.port, gw.pairing.port)
    assert info.ca_fingerprint == fingerprint(ca)


# -- codes -------------------------------------------------------------------------------------


def test_a_code_works_once_and_expires(secure, tmp_path: Path) -> None:
    gw = secure(pairing_code_ttl_s=2.0)
    issued = gw.code()
    assert len(normalize_code(issued["code"])) == 12
    # Through the command line, as a person would.
    env = {**os.environ, "HEARTH_CONFIG_DIR": str(tmp_path / "a")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth.cli",
            "pair",
            issued["code"].lower(),
            "--gateway",
            str(gw.pairing),
            "--ca-fingerprint",
            issued["ca_fingerprint"],
            "--id",
            "cam-a",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "paired with" in result.stdout
    stored = tmp_path / "a" / "gateways" / gw.gw.gateway_id
    assert {p.name for p in stored.iterdir()} == {
        "pairing.json",
        "ca.pem",
        "device.pem",
        "device.key",
    }
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in stored.iterdir())
    assert (gw.state_dir / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    # Used: a second device cannot pair with it.
    with pytest.raises(PairingError) as used:
        gw.pair("cam-b", tmp_path / "b", issued)
    assert used.value.code is ErrorCode.FORBIDDEN
    # Expired: a fresh code, unused past its TTL.
    late = gw.code()
    time.sleep(2.5)
    with pytest.raises(PairingError) as expired:
        gw.pair("cam-b", tmp_path / "b", late)
    assert expired.value.code is ErrorCode.FORBIDDEN
    # A device id that is taken (another key) is refused, and the code stays good for another.
    fresh = gw.code()
    with pytest.raises(PairingError, match="paired with another key"):
        gw.pair("cam-a", tmp_path / "c", fresh)
    assert gw.pair("cam-c", tmp_path / "c", fresh).device_id == "cam-c"
    entries = gw.audit()
    assert [
        e["target"] for e in entries if e["action"] == "pair" and e["decision"] == "allowed"
    ] == ["cam-a", "cam-c"]
    refused = [e["reason"] for e in entries if e["action"] == "pair" and e["decision"] == "refused"]
    assert refused.count("wrong, used or expired code") == 2
    assert any("another key" in r for r in refused)


def test_wrong_codes_are_refused_counted_and_end_the_pending_codes(secure, tmp_path: Path) -> None:
    gw = secure(pairing_max_failures=3)
    good = gw.code()
    wrong = {**good, "code": next(c for c in iter(new_code, None) if c != good["code"])}
    for attempt in range(3):
        with pytest.raises(PairingError) as refused:
            gw.pair(f"guess-{attempt}", tmp_path / "guess", wrong)
        assert refused.value.code is ErrorCode.FORBIDDEN
    # Three failures while it was pending: the good code is gone too.
    with pytest.raises(PairingError):
        gw.pair("owner", tmp_path / "owner", good)
    # A device pinning the wrong CA sends nothing at all.
    before = len(gw.audit())
    with pytest.raises(PairingError, match="fingerprint"):
        gw.pair("owner", tmp_path / "owner", {**gw.code(), "ca_fingerprint": "ab" * 32})
    entries = gw.audit()
    assert not [e for e in entries[before:] if e["action"] == "pair"]
    assert sum(e["action"] == "pair" and e["decision"] == "refused" for e in entries) == 4
    assert "invalidated after 3 failed attempts" in gw.gw.log()


# -- isolation ---------------------------------------------------------------------------------


def test_device_a_can_neither_submit_as_b_nor_read_b_replies(secure, tmp_path: Path) -> None:
    gw = secure()
    a = gw.pair("dev-a", tmp_path / "a")
    b = gw.pair("dev-b", tmp_path / "b")
    gw_id = gw.gw.gateway_id
    dev_a = TlsDevice(gw.lan, a.tls(), "dev-a-1")
    dev_b = TlsDevice(gw.lan, b.tls(), "dev-b-1")
    try:
        assert dev_a.connected.wait(5)
        assert dev_b.connected.wait(5)
        dev_a.subscribe(f"{reply_prefix('dev-a')}#")
        dev_b.subscribe(f"{reply_prefix('dev-b')}#")
        # Subscribing to B's replies is granted by the broker but delivers nothing (read ACL).
        dev_a.subscribe(f"{reply_prefix('dev-b')}#")
        dev_a.subscribe("hearth/v1/gw/+/req/#")
        ping = encode(Ping())
        # Submitting as B: the broker refuses the publish itself (MQTT 5 reason code).
        as_b = request_topic(gw_id, "dev-b")
        assert dev_a.publish(as_b, ping, reply_prefix("dev-b") + "r") == NOT_AUTHORIZED
        assert dev_a.publish(as_b, ping, reply_prefix("dev-a") + "r") == NOT_AUTHORIZED
        # Its own requests go through and are answered to it alone.
        assert dev_a.publish(request_topic(gw_id, "dev-a"), ping, reply_prefix("dev-a") + "r") == 0
        topic, _ = dev_a.messages.get(timeout=10)
        assert topic == reply_prefix("dev-a") + "r"
        # B's answer reaches B, never A.
        assert dev_b.publish(request_topic(gw_id, "dev-b"), ping, reply_prefix("dev-b") + "r") == 0
        assert dev_b.messages.get(timeout=10)[0] == reply_prefix("dev-b") + "r"
        time.sleep(0.5)
        assert dev_a.messages.empty(), "A received someone else's message"
        # Nor can it speak for the gateway.
        assert dev_a.publish(reply_prefix("dev-b") + "r", ping) == NOT_AUTHORIZED
        assert dev_a.publish(f"hearth/v1/gw/{gw_id}/status", ping) == NOT_AUTHORIZED
    finally:
        dev_a.close()
        dev_b.close()


def test_local_clients_cannot_act_as_a_paired_device(secure, tmp_path: Path) -> None:
    gw = secure()
    gw.pair("dev-a", tmp_path / "a")
    local = TlsDevice(gw.gw.listen, None, "dev-a")  # plain MQTT on the loopback listener
    try:
        assert local.connected.wait(5)
        local.subscribe(f"{reply_prefix('dev-a')}#")
        ping = encode(Ping())
        gw_id = gw.gw.gateway_id
        assert (
            local.publish(request_topic(gw_id, "dev-a"), ping, reply_prefix("dev-a") + "r")
            == NOT_AUTHORIZED
        )
        # An id never paired is the local processes' own: served as before.
        assert (
            local.publish(request_topic(gw_id, "local-1"), ping, reply_prefix("local-1") + "r") == 0
        )
        # The pairing topics belong to the pairing listener and the daemon.
        assert local.publish(pair_request_topic("dev-a"), ping) == NOT_AUTHORIZED
    finally:
        local.close()


# -- revocation --------------------------------------------------------------------------------


def test_a_revoked_device_is_locked_out_at_once(secure, device_dir, wasm) -> None:
    gw = secure()
    directory = device_dir("cam")
    gw.pair("cam-9", directory)
    pids = (gw.gw.snapshot().pid, gw.gw.snapshot().broker_pid)
    with Client(str(gw.lan), placement="edge", timeout_s=5) as client:
        assert client.run_wasm(wasm["echo"], stdin=b"before").stdout == b"before"
        revoked = gw.admin("devices", "revoke", "cam-9")
        assert revoked.returncode == 0, revoked.stderr
        # The open connection: its next job is refused by the broker (0x87 on the PUBACK). A
        # request the broker took just before it reloaded is refused by the gateway instead,
        # an answer the reloaded broker no longer delivers: that one call times out (5 s).
        refused = _first_refusal(lambda: client.run_wasm(wasm["echo"], stdin=b"after"))
        assert refused.code is ErrorCode.FORBIDDEN
        assert "not authorized" in refused.message
    # A new connection fails the TLS handshake (CRL).
    with (
        pytest.raises(GatewayUnavailable),
        Client(str(gw.lan), placement="edge", timeout_s=3) as client,
    ):
        client.run_wasm(wasm["echo"], stdin=b"x")
    # No restart: same daemon, same broker.
    assert (gw.gw.snapshot().pid, gw.gw.snapshot().broker_pid) == pids
    listing = gw.admin("devices", "list", "--json")
    [row] = [json.loads(line) for line in listing.stdout.splitlines()]
    assert row["device_id"] == "cam-9"
    assert row["revoked_at"] is not None
    again = gw.admin("devices", "revoke", "cam-9")
    assert again.returncode == 1
    assert "already revoked" in again.stderr
    entries = gw.audit()
    assert any(
        e["action"] == "device_revoke" and e["decision"] == "allowed" and e["target"] == "cam-9"
        for e in entries
    )


def _first_refusal(job: Callable[[], object], grace_s: float = 0.5) -> JobError:
    """The JobError of the first refused ``job``. The broker applies the reloaded ACL within
    milliseconds of the revocation, not within zero: a job may still be served in ``grace_s``,
    never after."""
    revoked_at = time.monotonic()
    while True:
        try:
            job()
        except JobError as exc:
            return exc
        assert time.monotonic() - revoked_at < grace_s, "served after the revocation"


def test_the_dispatcher_refuses_a_revoked_id_whichever_way_it_came(tmp_path: Path) -> None:
    """Defence in depth behind the broker's ACL: a request naming a revoked id that reaches
    the daemon at all (an ACL not yet reloaded, another broker) gets ``forbidden``, audited."""
    from hearth_gateway.blobs import BlobStore
    from hearth_gateway.dispatch import Dispatcher
    from hearth_gateway.pairing import RESERVED_IDS
    from hearth_gateway.placement import Load, Placer
    from hearth_gateway.reply_to import ReplyTo

    assert "admin" in RESERVED_IDS
    policy = Policy()
    store = Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))
    published: list[tuple[str, bytes]] = []
    blobs = BlobStore(tmp_path / "blobs", store, policy.limits)
    dispatcher = Dispatcher(
        gateway_id="gw",
        policy=policy,
        store=store,
        blobs=blobs,
        admission=Admission(policy.limits),
        pool=None,  # type: ignore[arg-type]
        runners=["wasm"],
        publish=lambda to, payload: published.append((to.topic, payload)),
        placer=Placer(
            tier="home",
            policy=policy.placement,
            runners={"wasm"},
            load=lambda: Load(workers=1, busy=0, waiting=0),
            store=store,
            blob_class=blobs.data_class,
        ),
        locked=frozenset({"cam-9"}),
    )
    reply_to = ReplyTo("cam-9", reply_prefix("cam-9") + "r", b"c", 1)
    dispatcher.handle(request_topic("gw", "cam-9"), encode(Ping()), reply_to)
    [(topic, payload)] = published
    from hearth.protocol import decode_reply

    reply = decode_reply(payload)
    assert topic == reply_prefix("cam-9") + "r"
    assert isinstance(reply, Error)
    assert reply.code is ErrorCode.FORBIDDEN
    rows = store._conn.execute("SELECT actor, decision, reason FROM audit").fetchall()
    assert rows == [("cam-9", "refused", "device revoked")]
    store.close()


# -- generated files ---------------------------------------------------------------------------


def test_acls_name_each_device_alone() -> None:
    lan = lan_acl("gw", ["b", "a"])
    assert lan.index("user a") < lan.index("user b")
    assert "topic write hearth/v1/gw/gw/req/a\n" in lan
    assert "topic read hearth/v1/dev/a/#\n" in lan
    assert "+" not in lan.replace("# Written", "")  # no wildcard grants for devices
    local = local_acl("gw", ["a"])
    assert local.splitlines()[2:4] == [
        "topic deny hearth/v1/gw/gw/req/a",
        "topic deny hearth/v1/dev/a/#",
    ]


@pytest.mark.parametrize(
    "cls", [PairHello, PairCa, PairRequest, PairResult], ids=lambda cls: cls.__name__
)
def test_pairing_messages_are_documented(cls: type[msgspec.Struct]) -> None:
    """docs/protocol.md §16 lists every field of every pairing message, as §5 does for the
    others (tests/test_protocol_doc.py's reading of the document)."""
    from test_protocol_doc import DOC, _keyed_rows, _section, _sections

    tag = str(cls.__struct_config__.tag)
    rows = _keyed_rows(_section(_sections(DOC.read_text()), backticked=tag).body)
    fields = msgspec.structs.fields(cls)
    assert set(rows) == {f.encode_name for f in fields} | {"type"}
    for field in fields:
        assert (rows[field.encode_name][2] == "required") == field.required, field.name
    assert f'`"{tag}"`' in rows["type"][3]
