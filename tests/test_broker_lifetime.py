"""The managed Mosquitto never outlives the processes that watch it (docs/systemd.md, "The
managed broker's lifetime"): SIGKILL its watcher, the broker or the daemon, and no Mosquitto of
that state directory is left behind; the gateway comes back on the same port; a broker that a
killed predecessor left behind is ended at start, and only one of this state directory; a
revocation made after the broker was replaced reaches the broker that runs.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Broker, GatewayProcess, free_port, wait_for_port, wait_until
from hearth.errors import HearthError
from hearth.transport import BrokerAddress
from hearth_gateway._process import ProcessHandle
from hearth_gateway.broker import find_mosquitto
from test_pairing import SecureGateway, _connects, secure  # noqa: F401 - `secure` is a fixture

GONE_WITHIN_S = 5.0  # nothing of the broker may be left 5 s after a kill


@pytest.fixture(params=["root", "mosquitto"])
def managed(
    request: pytest.FixtureRequest, make_gateway: Callable[..., GatewayProcess]
) -> Iterator[Callable[[], GatewayProcess]]:
    """Gateways with their managed Mosquitto, which runs as root (a state directory its own
    user cannot reach: pytest's) or as its own user (a state directory it can reach, as under
    /var/lib): the case where a Mosquitto left to itself would have cleared its parent-death
    signal."""
    if request.param == "root":
        yield lambda: make_gateway(managed=True)
        return
    if os.geteuid() != 0:
        pytest.skip("only root can run Mosquitto as its own user")
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user")
    top = Path(tempfile.mkdtemp(prefix="hearth-lifetime-"))
    top.chmod(0o711)  # traversable, as /var/lib is
    started: list[GatewayProcess] = []

    def make() -> GatewayProcess:
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        work = top / gateway_id
        (work / "state").mkdir(parents=True)
        work.chmod(0o711)
        listen = BrokerAddress("127.0.0.1", free_port())
        gw = GatewayProcess(listen, work, gateway_id=gateway_id, managed=True, supervised=False)
        started.append(gw)
        gw.start()
        assert _uid(_mosquitto(gw)) == user.pw_uid
        return gw

    yield make
    for gw in started:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(timeout=10)
    shutil.rmtree(top, ignore_errors=True)


def _conf(gw: GatewayProcess) -> str:
    return str(gw.state_dir / "mosquitto" / "mosquitto.conf")


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def _of_state_dir(gw: GatewayProcess) -> list[int]:
    """Every live process started for this state directory's broker: Mosquitto (``mosquitto -c
    CONF``) and its watcher (whose argv ends the same way). Found by configuration path, as the
    gateway does, never by name."""
    conf = _conf(gw)
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _argv(int(entry.name))[-2:] == ["-c", conf]
    ]


def _mosquitto(gw: GatewayProcess) -> int:
    [pid] = [p for p in _of_state_dir(gw) if _argv(p)[1:] == ["-c", _conf(gw)]]
    return pid


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _alive(pid: int) -> bool:
    return bool(_argv(pid))  # a zombie has no command line and holds no port


def _serves(gw: GatewayProcess, wasm: dict[str, Path]) -> bool:
    """One job through the gateway: its broker runs and the daemon is connected to it."""
    try:
        with gw.client(timeout_s=5.0) as client:
            return client.run_wasm(wasm["echo"], stdin=b"hi").stdout == b"hi"
    except HearthError:
        return False


def _replaced(gw: GatewayProcess, old: int, wasm: dict[str, Path]) -> int:
    """The new broker's pid, once the gateway serves through it."""
    assert wait_until(lambda: not _alive(old), timeout_s=GONE_WITHIN_S), "the old broker lives on"
    assert wait_until(lambda: _serves(gw, wasm), timeout_s=30), gw.log()
    new = _mosquitto(gw)
    assert new != old
    return new


def _stops_clean_and_comes_back(gw: GatewayProcess, wasm: dict[str, Path]) -> None:
    assert gw.stop() == 0
    assert wait_until(lambda: not _of_state_dir(gw), timeout_s=GONE_WITHIN_S), _of_state_dir(gw)
    _comes_back(gw, wasm)


def _comes_back(gw: GatewayProcess, wasm: dict[str, Path]) -> None:
    gw.start()  # the same state directory and --listen port
    assert _serves(gw, wasm)
    assert _parent(_parent(_mosquitto(gw))) == gw.proc.pid  # type: ignore[union-attr]


# -- kills ---------------------------------------------------------------------------------------


def test_sigkill_of_the_watcher_takes_the_broker_and_a_new_one_serves(
    managed: Callable[[], GatewayProcess], wasm: dict[str, Path]
) -> None:
    gw = managed()
    old = _mosquitto(gw)
    watcher = _parent(old)
    assert gw.snapshot().broker_pid == old
    assert watcher != gw.proc.pid  # type: ignore[union-attr]
    assert _parent(watcher) == gw.proc.pid  # type: ignore[union-attr]
    os.kill(watcher, signal.SIGKILL)
    _replaced(gw, old, wasm)
    assert len([p for p in _of_state_dir(gw) if _argv(p)[1:] == ["-c", _conf(gw)]]) == 1
    assert "mosquitto's watcher was killed by SIGKILL" in gw.log()
    _stops_clean_and_comes_back(gw, wasm)


def test_sigkill_of_the_broker_gets_a_new_one(
    managed: Callable[[], GatewayProcess], wasm: dict[str, Path]
) -> None:
    gw = managed()
    old = _mosquitto(gw)
    os.kill(old, signal.SIGKILL)
    _replaced(gw, old, wasm)
    assert f"mosquitto (pid {old}) was killed by SIGKILL" in gw.log()
    _stops_clean_and_comes_back(gw, wasm)


def test_sigkill_of_the_daemon_takes_watcher_and_broker(
    managed: Callable[[], GatewayProcess], wasm: dict[str, Path]
) -> None:
    gw = managed()
    assert len(_of_state_dir(gw)) == 2  # watcher and broker
    gw.kill()
    assert wait_until(lambda: not _of_state_dir(gw), timeout_s=GONE_WITHIN_S), _of_state_dir(gw)
    _comes_back(gw, wasm)
    assert "ending a stale" not in gw.log()  # nothing was left to end


def test_sigkill_of_daemon_and_watcher_together_takes_the_broker(
    managed: Callable[[], GatewayProcess], wasm: dict[str, Path]
) -> None:
    """Nobody is left to end the broker but the kernel: its own parent-death signal."""
    gw = managed()
    broker = _mosquitto(gw)
    watcher = _parent(broker)
    os.kill(watcher, signal.SIGSTOP)  # so that it cannot pass the daemon's death on first
    gw.kill()
    os.kill(watcher, signal.SIGKILL)
    assert wait_until(lambda: not _of_state_dir(gw), timeout_s=GONE_WITHIN_S), _of_state_dir(gw)
    _comes_back(gw, wasm)
    assert "ending a stale" not in gw.log()


# -- a broker left behind ------------------------------------------------------------------------


def test_a_stale_broker_of_this_state_directory_is_ended_at_start(
    make_gateway: Callable[..., GatewayProcess], wasm: dict[str, Path]
) -> None:
    """Left by a gateway from before the watcher's guard, or by a daemon and watcher killed
    together while Mosquitto had dropped its privileges itself (a listener below 1024): a
    Mosquitto of this state directory's config, named by its pid file, on our port."""
    gw = make_gateway(managed=True)
    assert gw.stop() == 0
    stale = subprocess.Popen([find_mosquitto(), "-c", _conf(gw)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(gw.listen.port)
        (gw.state_dir / "mosquitto" / "mosquitto.pid").write_text(f"{stale.pid}\n")
        _comes_back(gw, wasm)
        assert stale.wait(timeout=GONE_WITHIN_S) == 0  # SIGTERM: it saved its state and left
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()
    said = [line for line in gw.log().splitlines() if "ending a stale" in line]
    assert len(said) == 1
    assert f"ending a stale mosquitto (pid {stale.pid}) of {gw.state_dir}" in said[0]


def test_a_pid_file_naming_another_process_ends_nothing(
    make_gateway: Callable[..., GatewayProcess], broker: Broker, wasm: dict[str, Path]
) -> None:
    """The pid file names a Mosquitto, but one of another configuration (the tests' own
    broker): not ours to end."""
    gw = make_gateway(managed=True, start=False)
    (gw.state_dir / "mosquitto").mkdir()
    theirs = broker.pid
    (gw.state_dir / "mosquitto" / "mosquitto.pid").write_text(f"{theirs}\n")
    gw.start()
    assert _serves(gw, wasm)
    assert _argv(theirs)[:1] == [find_mosquitto()], "the tests' broker was ended"
    assert "ending a stale" not in gw.log()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "by-pid"])
def test_a_process_is_held_by_its_exact_arguments(pidfd: bool, tmp_path: Path) -> None:
    """The daemon's handle on its broker, with pidfds and without (an old kernel, a seccomp
    filter answering EPERM): a pid counts only with exactly the expected arguments, and ending
    it ends that process."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # Popen returns while the exec is still setting up the new argv (vfork).
        assert wait_until(lambda: _argv(sleeper.pid) == ["sleep", "60"])
        pid_file = tmp_path / "x.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        assert ProcessHandle.from_pid_file(pid_file, ["61"]) is None
        assert ProcessHandle.from_pid_file(pid_file, ["-c", "60"]) is None
        found = ProcessHandle.from_pid_file(pid_file, ["60"])
        assert found is not None
        held = found if pidfd else ProcessHandle(sleeper.pid, None, ["60"])
        other = ProcessHandle(sleeper.pid, None, ["61"])
        assert held.alive()
        assert not other.alive()
        assert not other.signal(signal.SIGTERM)
        assert sleeper.poll() is None
        assert held.end(timeout_s=5)
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
        assert not held.alive()
        assert not held.signal(signal.SIGKILL)
        for handle in (found, held, other):
            handle.close()
            handle.close()  # idempotent
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


# -- revocation --------------------------------------------------------------------------------


def test_a_revocation_after_the_broker_was_replaced_reaches_the_running_broker(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    gw = secure()
    paired = gw.pair("cam-1", tmp_path / "cam")
    assert _connects(gw.lan, paired.tls())
    old = _mosquitto(gw.gw)
    os.kill(_parent(old), signal.SIGKILL)
    new = _replaced(gw.gw, old, wasm)
    assert _connects(gw.lan, paired.tls())  # the new broker has the same ACLs and CRL
    revoked = gw.admin("devices", "revoke", "cam-1")
    assert revoked.returncode == 0, revoked.stderr
    # Within the reload, without another restart: the running broker read the new CRL.
    assert wait_until(lambda: not _connects(gw.lan, paired.tls()), timeout_s=3)
    assert _mosquitto(gw.gw) == new
