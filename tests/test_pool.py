"""A pool of cloud-tier gateways: members share one gateway id through the broker's shared
subscription (docs/protocol.md §19; gateway/src/hearth_gateway/pool.py, dispatch.py, and the
submitter's side in upstream.py).

Real parts: a Mosquitto of its own (the broker fixture), ``hearth-gateway run`` processes,
wasmtime. The must-show (3 members, one SIGKILLed mid-stream, through a home gateway that
uses the pool as its upstream) streams 600 jobs here; benchmarks/pool.py streams 3000 per
configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hearth.errors import ErrorCode
from hearth.protocol import (
    Accepted,
    BlobChunk,
    BlobStored,
    Error,
    GatewayStatus,
    NeedBlob,
    Timing,
    WasmJob,
    WasmResult,
    decode_reply,
    decode_status,
    encode,
    request_topic,
)
from hearth.protocol.topics import pool_filter
from hearth.transport import BrokerAddress
from hearth_gateway.config import Config
from hearth_gateway.errors import ConfigError
from hearth_gateway.loop import Loop
from hearth_gateway.placement import egress_refusal
from hearth_gateway.policy import PlacementPolicy
from hearth_gateway.pool import pool_link_options
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.upstream import Forwarder
from hearth_gateway.upstream_link import UpstreamTarget
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.mosquitto import Mosquitto
from testkit.pool import PoolRig, stream_jobs
from testkit.wait import wait_until

JOBS = 600  # benchmarks/pool.py does 3000 per configuration


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """The pool's own broker, not the session's: a pool's retained status stays online after
    its members are gone (no member marks it offline, docs/pool.md), and on the session's
    broker the clients of later tests, named only by HOST:PORT, could take the pool for their
    gateway (a full CI run caught exactly that)."""
    with Mosquitto(tmp_path_factory.mktemp("pool-broker")) as b:
        yield b


@pytest.fixture(scope="module")
def echo() -> bytes:
    return (Path(__file__).resolve().parents[1] / "build/examples/wasm/echo.wasm").read_bytes()


@contextlib.contextmanager
def _pool(broker: Mosquitto, work: Path) -> Iterator[tuple[str, list[GatewayProcess]]]:
    """Three members (one worker each) of a new pool, no home gateway: (pool id, members)."""
    pool_id = f"pool-{uuid.uuid4().hex[:6]}"
    gateways = [
        GatewayProcess(
            broker.address,
            work / f"m{i}",
            gateway_id=f"{pool_id}-m{i}",
            workers=1,
            extra_args=("--tier", "cloud", "--pool", pool_id),
            supervised=False,
        )
        for i in range(3)
    ]
    try:
        for gateway in gateways:
            gateway.start()
        yield pool_id, gateways
    finally:
        for gateway in gateways:
            gateway.close(grace_s=2.0)


@pytest.fixture(scope="module")
def members(
    broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[GatewayProcess]]]:
    """A pool the tests below speak to directly, shared by them (none kills a member)."""
    with _pool(broker, tmp_path_factory.mktemp("pool")) as pool:
        yield pool


def test_three_members_share_the_jobs_and_one_killed_mid_stream_loses_none(
    broker: Mosquitto, tmp_path: Path, echo: bytes
) -> None:
    with PoolRig(broker.address, tmp_path, 3) as rig:
        victim = rig.members[1]

        def kill_a_third_of_the_way(answered: int) -> None:
            if answered == JOBS // 3:
                victim.kill()  # SIGKILL: only its Last Will says it went

        report = stream_jobs(
            broker.address, rig.home.gateway_id, echo, JOBS, on_progress=kill_a_third_of_the_way
        )
        home_log = rig.home.log()
    assert victim.proc is None or victim.proc.returncode is not None, "it was killed"
    assert report.sent == JOBS
    assert report.errors == {}
    assert report.lost == 0
    assert report.answered_twice_differently == 0
    assert report.wrong == 0, "each answer is its own job's output"
    # Spread over all three: the broker's shared subscription, not the home gateway, chose.
    assert set(report.ran_on) == {m.gateway_id for m in rig.members}, report.ran_on
    assert all(count > 0 for count in report.ran_on.values())
    # What the dead member held went to the pool again, on its Last Will.
    assert f"pool member {victim.gateway_id} is gone" in home_log


def test_the_member_that_took_a_job_is_named_and_answers_its_resends(
    broker: Mosquitto, members: tuple[str, list[GatewayProcess]], echo: bytes
) -> None:
    pool_id, gateways = members
    sha = hashlib.sha256(echo).hexdigest()
    ids = {g.gateway_id for g in gateways}
    with RawDevice(broker.address, pool_id) as device:
        job = WasmJob(job_id="once", module=sha, stdin=b"hello pool", data_class="public")
        first = device.request(job)
        # No member holds the module yet: whoever got the job asks for it, naming itself.
        assert isinstance(first, NeedBlob), first
        assert first.gateway_id in ids
        device.gateway_id = first.gateway_id  # the upload and the job again go to it
        assert isinstance(device.upload(echo, data_class="public"), BlobStored)
        sent_direct = device.request(job)
        assert isinstance(sent_direct, WasmResult)
        assert sent_direct.stdout == b"hello pool"
        member = next(g for g in gateways if g.gateway_id == first.gateway_id)
        # The same job id again, at the member: answered from its journal, not run again.
        again = device.request(job)
        assert isinstance(again, WasmResult)
        assert again.stdout == sent_direct.stdout
        # (its status snapshot is written every second)
        assert wait_until(lambda: member.snapshot().jobs_duplicate >= 1, 10.0)

        # A job sent to the pool and taken: `accepted` names the member, then the answer.
        for gateway in gateways:  # every member holds the module now
            device.gateway_id = gateway.gateway_id
            assert isinstance(device.upload(echo, data_class="public"), BlobStored)
        device.gateway_id = pool_id
        correlation = device.send(
            WasmJob(job_id="pooled", module=sha, stdin=b"to the pool", data_class="public")
        )
        accepted = device.reply(correlation)
        assert isinstance(accepted, Accepted), accepted
        assert accepted.gateway_id in ids
        result = device.reply(correlation)
        assert isinstance(result, WasmResult)
        assert result.stdout == b"to the pool"


def test_a_member_shares_jobs_only_and_refuses_private_ones(
    broker: Mosquitto, members: tuple[str, list[GatewayProcess]]
) -> None:
    pool_id, _gateways = members
    with RawDevice(broker.address, pool_id) as device:
        # A chunk sent to the pool would reach one member at random: refused, with the reason.
        data = b"\x00asm\x01\x00\x00\x00"
        chunk = BlobChunk(
            sha256=hashlib.sha256(data).hexdigest(), size=len(data), offset=0, data=data,
            data_class="public",
        )  # fmt: skip
        refused = device.request(chunk)
        assert isinstance(refused, Error)
        assert refused.code is ErrorCode.UNSUPPORTED
        assert "member's own id" in refused.message
        # A pool is a cloud tier: private work is refused there as on any cloud tier.
        private = WasmJob(job_id="p1", module="0" * 64, data_class="private")
        denied = device.request(private)
        assert isinstance(denied, Error)
        assert denied.code is ErrorCode.POLICY_DENIED


def test_the_pool_announces_itself_online_with_a_retained_status(
    broker: Mosquitto, members: tuple[str, list[GatewayProcess]]
) -> None:
    pool_id, _gateways = members
    import paho.mqtt.subscribe as subscribe

    from hearth.protocol import status_topic

    msg = subscribe.simple(
        status_topic(pool_id), hostname=broker.address.host, port=broker.address.port
    )
    status = decode_status(msg.payload)
    assert status.gateway_id == pool_id
    assert status.state == "online"
    assert status.tier == "cloud"


def test_a_device_sends_to_the_pool_itself_and_a_dead_members_jobs_run_on_another(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The SDK names the pool by ``POOL@HOST:PORT``: each member that takes a job and lacks
    the module asks for it naming itself, and gets it; a member SIGKILLed while it holds jobs
    loses none: on its Last Will the client sends them to the pool again, and every answer is
    its own job's, naming the member that ran it."""
    import hearth

    primes = Path(__file__).resolve().parents[1] / "build/examples/wasm/primes.wasm"
    limits = [1_000_000 + 7 * i for i in range(24)]  # about 0.15 s each: a queue per member
    with hearth.Client(placement="local") as here:
        expected = {n: here.run_wasm(primes, args=[str(n)]).stdout for n in limits}
    assert len(set(expected.values())) == len(limits)
    with _pool(broker, tmp_path) as (pool_id, gateways):
        ids = {g.gateway_id for g in gateways}
        victim = gateways[1]
        with hearth.Client(f"{pool_id}@{broker.address}", placement="edge", timeout_s=30) as c:
            calls = {
                n: c.run_wasm_async(primes, args=[str(n)], data_class="public") for n in limits
            }
            # Killed once the jobs are spread out and queued: it holds some of them then.
            assert wait_until(lambda: sum(f.done() for f in calls.values()) >= 3, 30)
            victim.kill()
            runs = {n: f.result(timeout=60) for n, f in calls.items()}
            resent = c.stats.resent
    assert {n: r.stdout for n, r in runs.items()} == expected, "each answer is its own job's"
    assert all(r.where == "edge" for r in runs.values())
    ran_on = {r.gateway_id for r in runs.values()}
    assert ran_on <= ids, ran_on  # the member that ran it, never the pool's id
    assert len(ran_on - {victim.gateway_id}) == 2, ran_on
    assert resent >= 1, "the dead member held jobs: they went to the pool again"


def test_the_cli_sends_public_work_to_a_pool_and_keeps_private_work_off_it(
    broker: Mosquitto, members: tuple[str, list[GatewayProcess]], echo: bytes, tmp_path: Path
) -> None:
    import subprocess
    import sys

    pool_id, gateways = members
    module = tmp_path / "echo.wasm"
    module.write_bytes(echo)
    env = {"PATH": "/usr/bin:/bin", "HEARTH_CONFIG_DIR": str(tmp_path / "device")}

    def hearth_run(*flags: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "hearth.cli", "run", "--gateway", f"{pool_id}@{broker.address}",
             "--where", "edge", "--explain", *flags, str(module)],
            input=b"through the shell", capture_output=True, timeout=60, env=env, check=False,
        )  # fmt: skip

    public = hearth_run("--public")
    assert public.returncode == 0, public.stderr
    assert public.stdout == b"through the shell"
    ran_on = {
        g.gateway_id for g in gateways if f"ran on edge ({g.gateway_id})" in public.stderr.decode()
    }
    assert len(ran_on) == 1, public.stderr  # a member, named; not the pool

    def seen() -> int:  # every job any member took or refused
        return sum(g.snapshot().jobs_accepted + g.snapshot().jobs_refused for g in gateways)

    time.sleep(2.5)  # the members' status snapshots are written every 2 s
    before = seen()
    private = hearth_run()  # private by default: never to a cloud tier
    assert private.returncode != 0
    assert b"private data stays on the LAN" in private.stderr, private.stderr
    assert private.stdout == b""
    described = subprocess.run(  # what a file holds is private too
        [sys.executable, "-m", "hearth.cli", "describe", "--gateway", f"{pool_id}@{broker.address}",
         str(module)],
        capture_output=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert described.returncode != 0
    assert b"private data stays on the LAN" in described.stderr, described.stderr
    time.sleep(2.5)
    assert seen() == before, "nothing private reached a member, not even to be refused"


# --- pure: configuration and the egress check ----------------------------------------------


def _status() -> GatewayStatus:
    return GatewayStatus(gateway_id="m1", state="online", tier="cloud")


def test_only_a_cloud_tier_with_a_pool_id_of_its_own_joins_a_pool() -> None:
    with pytest.raises(ConfigError, match="cloud-tier"):
        pool_link_options(Config(pool="p"), "m1", _status())
    with pytest.raises(ConfigError, match="must differ"):
        pool_link_options(Config(tier="cloud", pool="m1"), "m1", _status())
    with pytest.raises(ConfigError, match="invalid pool id"):
        pool_link_options(Config(tier="cloud", pool="a/b"), "m1", _status())
    assert pool_link_options(Config(tier="cloud"), "m1", _status()) == {}
    options = pool_link_options(Config(tier="cloud", pool="p"), "m1", _status())
    assert options["shared_filter"] == pool_filter("p") == "$share/p/hearth/v1/gw/p/req/+"
    assert options["session_expiry_s"] == 0, "a dead member's share must not queue up"
    topic, payload = options["extra_status"]
    assert decode_status(payload).gateway_id == "p"
    assert topic.endswith("/gw/p/status")


def test_egress_allows_a_members_topic_only_once_the_pool_named_that_member() -> None:
    job = encode(WasmJob(job_id="h1", module="a" * 64, data_class="public"))
    member_topic = request_topic("m1", "gw-home")
    kwargs = {"upstream_id": "pool", "client_id": "gw-home", "blobs": {}}
    assert egress_refusal(request_topic("pool", "gw-home"), job, **kwargs) is None  # type: ignore[arg-type]
    assert egress_refusal(member_topic, job, **kwargs) is not None  # type: ignore[arg-type]
    assert egress_refusal(member_topic, job, members={"m1"}, **kwargs) is None  # type: ignore[arg-type]
    # Never another client's topic at a member, nor anything private.
    other = request_topic("m1", "gw-other")
    assert egress_refusal(other, job, members={"m1"}, **kwargs) is not None  # type: ignore[arg-type]
    private = encode(
        msgspec.structs.replace(msgspec.msgpack.decode(job, type=WasmJob), data_class="private")
    )
    assert egress_refusal(member_topic, private, members={"m1"}, **kwargs) is not None  # type: ignore[arg-type]


class _Link:
    """Stands in for UpstreamLink: records what the forwarder sends, and to whom."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, bytes, str]] = []
        self.ready = True
        self.upstream_id = "pool"
        self.members: set[str] = set()
        self.client_id = "gw-home"
        self.target = UpstreamTarget(BrokerAddress("10.0.0.2", 1883))

    def send(self, message: Any, correlation: bytes, to: str = "") -> None:
        self.sent.append((message, correlation, to))

    def close(self) -> None:
        pass


def test_the_forwarder_follows_the_member_that_took_a_job_and_resubmits_on_its_will(
    tmp_path: Path,
) -> None:
    module = b"\0asm-module"
    sha = hashlib.sha256(module).hexdigest()
    (tmp_path / sha).write_bytes(module)
    blobs = type(
        "Blobs",
        (),
        {"path": lambda _self, s: tmp_path / s, "data_class": lambda _self, _s: "public"},
    )()
    relayed: list[tuple[str, bytes]] = []
    home: list[str] = []
    loop = Loop()
    forwarder = Forwarder(
        loop,
        UpstreamTarget(BrokerAddress("10.0.0.2", 1883)),
        "home",
        policy=PlacementPolicy(),
        blobs=blobs,  # type: ignore[arg-type]
        audit=lambda *_: None,
        relay=lambda item, reply: relayed.append((item.job.job_id, reply)),
        fallback=lambda item, _why: home.append(item.job.job_id),
    )
    link = _Link()
    forwarder.link = link  # type: ignore[assignment]

    def forward(job_id: str) -> bytes:
        job = WasmJob(job_id=job_id, module=sha, stdin=job_id.encode(), data_class="public")
        forwarder.forward(job, ReplyTo("dev-7", "hearth/v1/dev/dev-7/reply", b"c", 1))
        assert link.sent[-1][2] == "", "a first submission goes to the pool"
        return link.sent[-1][1]

    try:
        a, b, c = forward("a"), forward("b"), forward("c")
        # a: taken by m1, which lacks the module: the upload and the job again go to m1.
        forwarder._reply(a, encode(Accepted(job_id="x", gateway_id="m1")))
        forwarder._reply(a, encode(NeedBlob(job_id="x", sha256=sha, max_chunk=5, gateway_id="m1")))
        chunks = [(m, to) for m, _, to in link.sent if isinstance(m, BlobChunk)]
        assert chunks
        assert {to for _, to in chunks} == {"m1"}
        forwarder._reply(b"blob:m1:" + sha.encode(), encode(BlobStored(sha256=sha, size=11)))
        assert isinstance(link.sent[-1][0], WasmJob)
        assert link.sent[-1][1:] == (a, "m1"), "re-sent to the member that took it"
        assert link.members == {"m1"}
        # b: taken by m2; c: taken by nobody yet.
        forwarder._reply(b, encode(Accepted(job_id="x", gateway_id="m2")))
        sent_before = len(link.sent)
        forwarder._member_lost("m1")  # its Last Will
        again = {(token, to) for _, token, to in link.sent[sent_before:]}
        assert again == {(a, ""), (c, "")}, "what m1 held and what nobody took, to the pool"
        assert forwarder.resubmitted == 2
        # a runs on m3; m1's late answer (had it come) is dropped: one answer per job.
        forwarder._reply(a, encode(Accepted(job_id="x", gateway_id="m3")))
        done = WasmResult(job_id="x", exit_code=0, stdout=b"a", stderr=b"", timing=Timing(1, 2))
        forwarder._reply(a, encode(done))
        forwarder._reply(a, encode(done))
        assert [job_id for job_id, _ in relayed] == ["a"]
        answer = decode_reply(relayed[0][1])
        assert isinstance(answer, WasmResult)
        assert answer.timing.upstream == "m3", "the answer names the member that ran it"
        assert home == [], "nothing fell back: the pool ran everything"
    finally:
        forwarder.close()
        loop.close()
