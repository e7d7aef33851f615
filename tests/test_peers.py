"""Peer gateways (docs/peers.md): pairing with a peer code, the peer identity kept apart from
devices', and a saturated gateway forwarding work, private work included, to a paired LAN peer.
The selection and egress rules are pure and tested as such; the rest against real gateways and
their managed Mosquitto on 127.0.0.1 (the network-namespace must-show is test_peers_netns.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from hearth._identity import Pairing, pairings
from hearth.errors import ErrorCode
from hearth.pairing import PairingError
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    Error,
    OnnxJob,
    Ping,
    Pong,
    RunControl,
    TaskInstall,
    Trigger,
    WasmJob,
    WasmResult,
    decode_reply,
    encode,
    reply_topic,
    request_topic,
)
from hearth_gateway.peer_ids import peer_request_refusal, peer_role_refusal
from hearth_gateway.peers import (
    PeerView,
    choose_peer,
    peer_credentials_refusal,
    peer_egress_refusal,
    peers_dir,
)
from hearth_gateway.pki import LocalCA, is_peer_cert
from hearth_gateway.placement import Action, Decision, Load, Placer
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.store import Store
from helpers import RawDevice
from test_pairing import NOT_AUTHORIZED, SecureGateway, TlsDevice, secure  # noqa: F401 - fixture
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

POLICY = PlacementPolicy(upstream_when_queue_over=0, upstream_max_in_flight=4)


def _view(gateway_id: str, **kw: Any) -> PeerView:
    values: dict[str, Any] = {
        "ready": True,
        "in_flight": 0,
        "runners": ("wasm", "onnx"),
        "workers": 2,
        "queue_depth": 0,
        "run_ms": 10.0,
    }
    return PeerView(gateway_id, **(values | kw))


# --- selection, placement and egress: pure -----------------------------------------------------


def test_the_peer_with_the_shortest_expected_wait_is_chosen() -> None:
    busy = _view("busy", queue_depth=2, workers=2, run_ms=10.0)
    slow = _view("slow", run_ms=500.0)
    fast = _view("fast", run_ms=5.0)
    chosen = choose_peer("wasm", [busy, slow, fast], POLICY)
    assert chosen is not None
    assert chosen[0].gateway_id == "fast"
    assert "~5 ms a run" in chosen[1]


def test_a_peer_that_cannot_take_the_job_is_skipped() -> None:
    skipped = [
        _view("down", ready=False),
        _view("no-runner", runners=("onnx",)),
        _view("saturated", queue_depth=5, workers=2),  # 3 waiting > upstream_when_queue_over
        _view("full", in_flight=POLICY.upstream_max_in_flight),
    ]
    assert choose_peer("wasm", skipped, POLICY) is None
    chosen = choose_peer("wasm", [*skipped, _view("ok", run_ms=None)], POLICY)
    assert chosen is not None
    assert chosen[0].gateway_id == "ok"
    assert "not yet measured" in chosen[1]


def test_a_box_with_a_gpu_attracts_onnx_work_not_wasm_work() -> None:
    cpu = _view("cpu", run_ms=5.0, providers=("CPUExecutionProvider",))
    gpu = _view("gpu", run_ms=50.0, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    onnx = choose_peer("onnx", [cpu, gpu], POLICY)
    assert onnx is not None
    assert onnx[0].gateway_id == "gpu"
    assert "cuda" in onnx[1]
    assert "accelerator" in onnx[1]
    wasm = choose_peer("wasm", [cpu, gpu], POLICY)
    assert wasm is not None
    assert wasm[0].gateway_id == "cpu"


def _placer(load: Load, peer: Decision | None) -> tuple[Placer, list[Any]]:
    asked: list[Any] = []

    def peers(job: Any, decision: Decision, at: Load, runner_here: bool) -> Decision | None:
        asked.append((job.job_id, decision.action, runner_here))
        return peer

    placer = Placer(
        tier="home",
        policy=POLICY,
        runners={"wasm"},
        load=lambda: load,
        store=cast(Store, None),  # place() writes nothing; audit() is not called here
        blob_class=lambda _sha: None,
        peers=peers,
    )
    return placer, asked


def test_placement_asks_peers_only_for_jobs_not_from_a_peer() -> None:
    to_b = Decision(Action.PEER, "to paired LAN peer b", "b")
    placer, asked = _placer(Load(workers=1, busy=1, waiting=1), to_b)
    job = WasmJob(job_id="j", module="0" * 64)  # private
    assert placer.place(job, "cam-1") == to_b
    assert placer.place(job, "peer.a").action is Action.QUEUE  # never forwarded again
    assert asked == [("j", Action.QUEUE, True)]
    assert to_b.where == "peer b"


def test_peer_consideration_needs_saturation_or_a_missing_runner() -> None:
    from hearth_gateway.peers import Peers

    class _Link:
        gateway_id = "b"

        def view(self) -> PeerView:
            return _view("b")

    peers = Peers([_Link()], POLICY)  # type: ignore[list-item]
    job = WasmJob(job_id="j", module="0" * 64)
    queued = Decision(Action.QUEUE, "private: stays on this gateway; 0 jobs ahead")
    idle = Load(workers=2, busy=1, waiting=0)
    assert peers.consider(job, Decision(Action.HERE, "free"), idle, True) is None
    assert peers.consider(job, queued, Load(workers=1, busy=1, waiting=0), True) is None
    moved = peers.consider(job, queued, Load(workers=1, busy=1, waiting=1), True)
    assert moved is not None
    assert (moved.action, moved.target) == (Action.PEER, "b")
    assert "private, this gateway is saturated (1/1 workers busy, 1 jobs waiting)" in moved.reason
    denied = Decision(Action.DENY, "no runner", code=ErrorCode.UNSUPPORTED)
    moved = peers.consider(job, denied, idle, False)
    assert moved is not None
    assert "has no 'wasm' runner" in moved.reason


def test_the_peer_egress_check_allows_private_jobs_on_our_topic_only() -> None:
    topic = request_topic("b", "peer.a")
    job = WasmJob(job_id="j", module="1" * 64, stdin=b"secret")
    check = {"upstream_id": "b", "client_id": "peer.a", "blobs": {"1" * 64: "private"}}
    assert peer_egress_refusal(topic, encode(job), **check) is None  # type: ignore[arg-type]
    chunk = BlobChunk(sha256="1" * 64, size=1, offset=0, data=b"x")
    assert peer_egress_refusal(topic, encode(chunk), **check) is None  # type: ignore[arg-type]
    other = BlobChunk(sha256="2" * 64, size=1, offset=0, data=b"x")
    assert "named by no job" in (peer_egress_refusal(topic, encode(other), **check) or "")  # type: ignore[arg-type]
    elsewhere = request_topic("c", "peer.a")
    assert "not this gateway's request topic" in (
        peer_egress_refusal(elsewhere, encode(job), **check) or ""  # type: ignore[arg-type]
    )
    task = TaskInstall(name="t", module="1" * 64, triggers=[Trigger(every_s=1.0)])
    assert "never forwarded" in (peer_egress_refusal(topic, encode(task), **check) or "")  # type: ignore[arg-type]


def test_what_a_peer_may_ask() -> None:
    assert peer_request_refusal(Ping()) is None
    assert peer_request_refusal(WasmJob(job_id="j", module="1" * 64)) is None
    assert peer_request_refusal(OnnxJob(job_id="j", model="1" * 64, inputs=[])) is None
    task = TaskInstall(name="t", module="1" * 64, triggers=[Trigger(every_s=1.0)])
    assert "only submit jobs" in (peer_request_refusal(task) or "")
    assert peer_request_refusal(RunControl(run_id="r", action="cancel")) is not None


def test_codes_pair_only_their_own_kind() -> None:
    assert peer_role_refusal("cam-1", peer=False) is None
    assert peer_role_refusal("peer.attic", peer=True) is None
    assert "peer code" in (peer_role_refusal("cam-1", peer=True) or "")
    assert "cannot pair as" in (peer_role_refusal("peer.attic", peer=False) or "")


def test_a_peer_certificate_is_marked_and_a_device_one_is_not(tmp_path: Path) -> None:
    from hearth.pairing import _key_and_csr

    ca = LocalCA(tmp_path / "pki", "b")
    _, csr = _key_and_csr("peer.a")
    assert is_peer_cert(ca.sign_device(csr, "peer.a", peer=True))
    assert not is_peer_cert(ca.sign_device(csr, "cam-1"))


# --- real gateways on loopback -----------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hearth_gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def peer_code(gw: SecureGateway) -> dict[str, Any]:
    result = gw.admin("pair", "--peer", "--json")
    assert result.returncode == 0, result.stderr
    issued = dict(json.loads(result.stdout))
    assert issued["peer"] is True
    return issued


def peers_pair(
    code: dict[str, Any], pairing: str, own_id: str, state_dir: Path
) -> subprocess.CompletedProcess[str]:
    return _cli(
        "peers",
        "pair",
        code["code"],
        "--gateway",
        pairing,
        "--ca-fingerprint",
        code["ca_fingerprint"],
        "--gateway-id",
        own_id,
        "--state-dir",
        str(state_dir),
    )


def audit(state_dir: Path) -> list[dict[str, Any]]:
    result = _cli("audit", "--json", "--limit", "10000", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_peer_and_device_identities_do_not_mix(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    b = secure()
    a_state = tmp_path / "a-state"
    # A device code does not pair a peer; a peer code does not pair a device; no device may
    # take a peer.* id. Each refused with a clear error, and nothing is admitted.
    refused = peers_pair(b.code(), str(b.pairing), "a", a_state)
    assert refused.returncode == 1
    assert "forbidden" in refused.stderr
    assert "peer" in refused.stderr
    assert pairings(peers_dir(a_state)) == []
    with pytest.raises(PairingError) as as_device:
        b.pair("cam-1", tmp_path / "cam", peer_code(b))
    assert as_device.value.code is ErrorCode.FORBIDDEN
    assert "peer code" in as_device.value.message
    with pytest.raises(PairingError) as posing:
        b.pair("peer.sneaky", tmp_path / "sneaky")
    assert posing.value.code is ErrorCode.FORBIDDEN
    assert "cannot pair as 'peer.sneaky'" in posing.value.message
    listed = b.admin("devices", "list", "--json")
    assert listed.stdout.strip() == ""

    # Now a real device and a real peer.
    cam = b.pair("cam-1", tmp_path / "cam")
    paired = peers_pair(peer_code(b), str(b.pairing), "a", a_state)
    assert paired.returncode == 0, paired.stderr
    [peer] = pairings(peers_dir(a_state))
    assert peer.device_id == "peer.a"
    assert is_peer_cert(
        x509.load_pem_x509_certificate(Path(peer.directory, "device.pem").read_bytes())
    )
    assert peer_credentials_refusal(peer, "a") is None

    # Device credentials stored as a peer's are not used as one.
    fake = tmp_path / "fake"
    shutil.copytree(cam.directory, fake)
    as_peer = Pairing(**{**json.loads(Path(cam.directory, "pairing.json").read_text()),
                         "directory": str(fake)})  # fmt: skip
    assert "device certificate" in (peer_credentials_refusal(as_peer, "a") or "")

    # A device's certificate cannot act as the peer: the broker refuses its publishes on the
    # peer's topic and delivers it none of the peer's answers. The peer may submit jobs and
    # receive answers, nothing else.
    dev = TlsDevice(b.lan, cam.tls(), "cam-1")
    link = TlsDevice(b.lan, peer.tls(), "peer.a")
    try:
        assert dev.connected.wait(5)
        assert link.connected.wait(5)
        job = encode(WasmJob(job_id="x", module="1" * 64))
        topic = request_topic(b.gw.gateway_id, "peer.a")
        assert dev.publish(topic, job, reply_topic("peer.a")) == NOT_AUTHORIZED
        dev.subscribe(reply_topic("peer.a"))  # granted, but the ACL delivers nothing
        [ok] = link.subscribe(reply_topic("peer.a"))
        assert not ok.is_failure
        task = TaskInstall(name="t", module="1" * 64, triggers=[Trigger(every_s=1.0)])
        assert link.publish(topic, encode(task), reply_topic("peer.a")) == 0
        _, payload = link.messages.get(timeout=10)
        answer = decode_reply(payload)
        assert isinstance(answer, Error)
        assert answer.code is ErrorCode.FORBIDDEN
        assert "only submit jobs" in answer.message
        assert link.publish(topic, encode(Ping()), reply_topic("peer.a")) == 0
        _, payload = link.messages.get(timeout=10)
        assert isinstance(decode_reply(payload), Pong)
        assert dev.messages.empty()
    finally:
        dev.close()
        link.close()
    # peers list / revoke, on both sides: A forgets B; B revokes peer.a at once.
    b_id = b.gw.gateway_id
    listed = [
        json.loads(x)
        for x in _cli("peers", "list", "--json", "--state-dir", str(a_state)).stdout.splitlines()
    ]
    assert [(r["peer"], r["direction"], r["marked_peer"]) for r in listed] == [(b_id, "to", True)]
    listed = [json.loads(x) for x in b.admin("peers", "list", "--json").stdout.splitlines()]
    assert [(r["peer"], r["direction"], r["state"]) for r in listed] == [("a", "from", "valid")]
    assert _cli("peers", "revoke", b_id, "--state-dir", str(a_state)).returncode == 0
    assert pairings(peers_dir(a_state)) == []
    revoked = b.admin("peers", "revoke", "a")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked peer.a" in revoked.stdout
    listed = [json.loads(x) for x in b.admin("peers", "list", "--json").stdout.splitlines()]
    assert [r["state"] for r in listed] == ["revoked"]
    assert b.admin("peers", "revoke", "nobody").returncode == 1

    rows = audit(b.state_dir)
    pairs = [(r["target"], r["decision"]) for r in rows if r["action"] == "pair"]
    assert ("peer.sneaky", "refused") in pairs
    assert ("cam-1", "refused") in pairs
    assert ("peer.a", "refused") in pairs
    assert [t for t, d in pairs if d == "allowed"] == ["cam-1", "peer.a"]
    assert any(r["action"] == "peer" and r["decision"] == "refused" for r in rows)
    assert not any(r["action"].startswith("place:") for r in rows)  # nothing admitted


_POLICY = """
[wasm]
fuel = 10_000_000_000_000
wall_timeout_s = {spin_s}
[placement]
upstream_when_queue_over = 0
"""


def test_a_saturated_gateway_runs_private_jobs_on_its_paired_peer(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    b = secure()
    policy = tmp_path / "a-policy.toml"
    policy.write_text(_POLICY.format(spin_s=4.0))
    a = make_gateway("--workers", "1", "--policy", str(policy), managed=True, start=False)
    paired = peers_pair(peer_code(b), str(b.pairing), a.gateway_id, a.state_dir)
    assert paired.returncode == 0, paired.stderr
    a.start()
    assert wait_until(
        lambda: any(
            r["action"] == "egress:connect" and r["decision"] == "allowed"
            for r in audit(a.state_dir)
        ),
        30,
    ), a.log()
    spin, echo = wasm["spin"].read_bytes(), wasm["echo"].read_bytes()
    markers = {f"p{i}": os.urandom(8) for i in range(3)}
    with RawDevice(a.listen, a.gateway_id) as dev:
        assert isinstance(dev.upload(spin), BlobStored)
        assert isinstance(dev.upload(echo), BlobStored)  # private: it goes to the peer too
        spinning = dev.send(WasmJob(job_id="spin", module=hashlib.sha256(spin).hexdigest()))
        sent = {
            job_id: dev.send(
                WasmJob(job_id=job_id, module=hashlib.sha256(echo).hexdigest(), stdin=m)
            )
            for job_id, m in markers.items()
        }
        answers = {job_id: dev.reply(c, timeout_s=40) for job_id, c in sent.items()}
        dev.reply(spinning, timeout_s=40)
    on_peer = []
    for job_id, answer in answers.items():
        assert isinstance(answer, WasmResult), answer
        assert answer.stdout == markers[job_id]
        if answer.timing.upstream:
            assert answer.timing.upstream == b.gw.gateway_id
            assert f"to paired LAN peer {b.gw.gateway_id}" in answer.timing.reason
            on_peer.append(job_id)
    # The first waits here (only then is the gateway saturated); the others went to the peer.
    assert on_peer == ["p1", "p2"], answers
    placed = {
        r["reason"].split(":")[0].removeprefix("job "): r
        for r in audit(a.state_dir)
        if r["action"] == "place:private"
    }
    for job_id in on_peer:
        assert placed[job_id]["target"] == f"peer {b.gw.gateway_id}"
        assert "saturated" in placed[job_id]["reason"]
    at_b = [r for r in audit(b.state_dir) if r["action"] == "place:private"]
    assert {r["actor"] for r in at_b} == {f"peer.{a.gateway_id}"}
    assert len(at_b) == len(on_peer)


def test_a_peer_paired_or_revoked_while_the_gateway_runs_is_followed_without_a_restart(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    """``peers pair`` on a running gateway: within a few seconds it connects, lists the peer
    in its status and forwards to it when saturated; ``peers revoke``: it drops the peer and
    runs its work itself again. No restart either time."""
    b = secure()
    policy = tmp_path / "a-policy.toml"
    policy.write_text(_POLICY.format(spin_s=3.0))
    a = make_gateway("--workers", "1", "--policy", str(policy), managed=True)
    b_id = b.gw.gateway_id
    assert a.snapshot().peers == {}
    spin, echo = wasm["spin"].read_bytes(), wasm["echo"].read_bytes()

    def saturated_echo(dev: RawDevice, job_id: str) -> WasmResult:
        """A spin fills the one worker and an echo waits behind it (only then is the gateway
        saturated); a second echo goes wherever placement says."""
        sha = hashlib.sha256(echo).hexdigest()
        spinning = dev.send(
            WasmJob(job_id=f"spin-{job_id}", module=hashlib.sha256(spin).hexdigest())
        )
        waiting = dev.send(WasmJob(job_id=f"wait-{job_id}", module=sha, stdin=b"w"))
        sent = dev.send(WasmJob(job_id=job_id, module=sha, stdin=b"x"))
        answer = dev.reply(sent, timeout_s=40)
        for other in (waiting, spinning):
            dev.reply(other, timeout_s=40)
        assert isinstance(answer, WasmResult), answer
        assert answer.stdout == b"x"
        return answer

    paired = peers_pair(peer_code(b), str(b.pairing), a.gateway_id, a.state_dir)
    assert paired.returncode == 0, paired.stderr
    assert "within seconds" in paired.stdout
    assert wait_until(lambda: a.snapshot().peers == {b_id: "ready"}, 20), a.log()
    status = _cli("status", "--state-dir", str(a.state_dir))
    assert f"peers       {b_id} (ready)" in status.stdout, status.stdout
    with RawDevice(a.listen, a.gateway_id) as dev:
        assert isinstance(dev.upload(spin), BlobStored)
        assert isinstance(dev.upload(echo), BlobStored)
        forwarded = saturated_echo(dev, "while-paired")
        assert forwarded.timing.upstream == b_id, forwarded
        assert f"to paired LAN peer {b_id}" in (forwarded.timing.reason or "")

        revoked = _cli("peers", "revoke", b_id, "--state-dir", str(a.state_dir))
        assert revoked.returncode == 0, revoked.stderr
        assert wait_until(lambda: a.snapshot().peers == {}, 20), a.log()
        here = saturated_echo(dev, "after-revoke")
        assert here.timing.upstream == "", here  # it waited for the worker here
    assert f"peer {b_id} no longer used" in a.log()
    assert a.proc is not None
    assert a.proc.poll() is None  # up throughout


# --- issue 9: a saturated gateway moves a migratable run to its paired peer ---------------------

_RUN_FUEL = 40_000_000_000
_ROUNDS = "4800"  # ~2 s of work over 256 KiB, as in test_migration_saturated.py


@pytest.mark.slow
def test_a_saturated_gateway_moves_a_private_run_to_its_paired_peer(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    make_gateway: Callable[..., GatewayProcess],
    examples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random
    import time

    from hearth.runtime.limits import WasmLimits
    from hearth.runtime.wasm import WasmRuntime

    migratable = examples / "wasm" / "hashchain.migratable.wasm"
    if not migratable.exists():
        pytest.skip("no instrumented examples: Binaryen's wasm-opt is not installed")
    plain = (examples / "wasm" / "hashchain.wasm").read_bytes()
    echo = examples / "wasm" / "echo.wasm"
    limits = WasmLimits(fuel=_RUN_FUEL)
    policy = tmp_path / "saturates.toml"
    # Two jobs waiting behind a busy worker: past the eviction policy (not yet past
    # upstream_when_queue_over, so those jobs wait here rather than going to the peer).
    policy.write_text(f"[wasm]\nfuel = {_RUN_FUEL}\n[migration]\nevict_when_queue_over = 1\n")
    b = secure(policies=[str(policy)])
    a = make_gateway("--workers", "1", "--policy", str(policy), managed=True, start=False)
    paired = peers_pair(peer_code(b), str(b.pairing), a.gateway_id, a.state_dir)
    assert paired.returncode == 0, paired.stderr
    a.start()
    assert wait_until(
        lambda: any(r["action"] == "egress:connect" for r in audit(a.state_dir)), 30
    ), a.log()
    # The device talks to A on its loopback listener and is paired with B too, so it can
    # resume the run where A sends it.
    device_dir = tmp_path / "device"
    monkeypatch.setenv("HEARTH_CONFIG_DIR", str(device_dir))
    b.pair("cam-1", device_dir)
    stdin = random.Random(10).randbytes(256 * 1024)
    reference = WasmRuntime(wasi_nn=None).run(
        hashlib.sha256(plain).hexdigest(), stdin=stdin, args=[_ROUNDS], wasm=plain, limits=limits
    )
    with a.client(placement="auto") as device:
        run = device.start_wasm(
            migratable.read_bytes(), stdin=stdin, args=[_ROUNDS], where="edge", limits=limits
        )
        assert wait_until(lambda: run.where == a.gateway_id, timeout_s=20)
        time.sleep(0.3)
        waiting = [device.run_wasm_async(echo, b"x", where="edge") for _ in range(3)]
        outcome = run.result(120)
        assert [w.result(60).stdout for w in waiting] == [b"x"] * 3
    assert (outcome.exit_code, outcome.stdout) == (reference.exit_code, reference.stdout)
    assert [h.where for h in outcome.hops] == [a.gateway_id, b.gw.gateway_id]
    reason = outcome.hops[-1].reason
    assert reason.startswith(f"gateway overloaded: to paired LAN peer {b.gw.gateway_id} at {b.lan}")
    moved = [
        r
        for r in audit(a.state_dir)
        if r["action"] == "place:private" and r["target"] == f"peer {b.lan}"
    ]
    assert len(moved) == 1
