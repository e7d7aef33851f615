"""``make demo``: a Hearth gateway on loopback, and an example device offloading real work to it.

1. Starts ``hearth_gateway.cli run`` as a subprocess on free loopback ports, with a managed
   Mosquitto (a mutual-TLS listener for devices, a pairing listener), mDNS on 127.0.0.1 only,
   and a temporary state directory; then pairs the camera device with a one-time code, as
   ``hearth-gateway pair`` and ``hearth pair CODE`` would (its certificate goes in the
   temporary directory too).
2. Runs the camera device (examples/camera_device.py): it discovers the gateway over mDNS and
   offloads an edge filter, a Mandelbrot render and a digits classifier with
   ``placement="auto"``, calling each a few times so the placement measures, then decides.
3. Stops the gateway (SIGTERM) and makes the same calls again: they run on the device.
4. Work that moves: starts the gateway again, then a migratable run of hashchain on the
   device; after about a second it moves the run to the gateway, then stops the gateway, which
   sends the run home; the run finishes on the device with the output of a run that never
   moved (docs/migration.md).
5. Prints what ran where and why; exits non-zero, with the gateway's log, if anything failed.

Nothing leaves loopback, nothing outside a temporary directory is written, and that directory
and the gateway go away however the demo ends (Ctrl-C included).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from camera_device import (
    BUILD_DIR,
    CameraDevice,
    Row,
    describe_gateway,
    format_row,
    missing_examples,
    table_header,
)
from hearth import Client, GatewayInfo, HearthError, JobError, discover
from hearth.migration import MigratableRun, RunOutcome
from hearth.pairing import Pairing, pair
from hearth.runtime.limits import WasmLimits
from hearth.runtime.wasm import WasmRuntime

# testkit/ (the rendered plate; shared with the tests) is imported from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INTERFACE = "127.0.0.1"
GATEWAY_ID = "demo-gateway"
READY_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 30.0  # the gateway drains in-flight jobs for up to 20 s
LOG_TAIL_LINES = 40

# Part 3: hashchain (examples/wasm/hashchain.c) over 2 MB, 700 rounds per 4 KiB chunk, ~3 s on
# the 2-core VM this is developed on: ~15e9 WebAssembly instructions, more than the default
# 2e9 per job, so the gateway gets a policy with more and the device's hops a limit with more.
CHAIN_INPUT_BYTES = 2_000_000
CHAIN_ROUNDS = 700
CHAIN_FUEL = 100_000_000_000
CHAIN_MODULES = (
    BUILD_DIR / "wasm" / "hashchain.wasm",
    BUILD_DIR / "wasm" / "hashchain.migratable.wasm",
)
MOVE_AFTER_S = 1.0  # on the device, then on the gateway; less where hashchain runs faster
RUN_TIMEOUT_S = 120.0


class DemoFailed(Exception):
    """Something the demo relies on did not happen; the message says what."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((INTERFACE, 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """The gateway daemon as a child process, in its own session so that a Ctrl-C meant for the
    demo reaches the gateway only as the demo's orderly SIGTERM."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.address = f"{INTERFACE}:{self.port}"  # local processes (plain MQTT)
        self.lan_address = f"{INTERFACE}:{free_port()}"  # devices: mutual TLS
        self.pairing_address = f"{INTERFACE}:{free_port()}"
        self.log_path = workdir / "gateway.log"
        self.state_dir = workdir / "state"
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    def start(self, *extra: str) -> None:
        """Start the daemon (again, after ``stop``: the same ports and state, so the device's
        pairing still holds); ``extra``: more command-line options."""
        self._terminated = False
        argv = [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "run",
            "--listen",
            self.address,
            "--lan-listen",
            self.lan_address,
            "--pairing-listen",
            self.pairing_address,
            "--mdns-interface",
            INTERFACE,
            "--state-dir",
            str(self.state_dir),
            "--gateway-id",
            GATEWAY_ID,
            *extra,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> GatewayInfo:
        """Until the gateway is advertised over mDNS, which it is once its broker, workers and
        MQTT link are up; returns what discovery found."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailed(f"the gateway exited with status {self.proc.returncode}")
            for gateway in discover(1.0, interface=INTERFACE, measure=False):
                if gateway.gateway_id == GATEWAY_ID and str(gateway.broker) == self.lan_address:
                    return gateway
        raise DemoFailed(f"the gateway was not discoverable within {timeout_s:.0f} s")

    def pair_device(self, config_dir: Path) -> Pairing:
        """What a person does with ``hearth-gateway pair`` on the gateway and ``hearth pair
        CODE`` on the device: a one-time code from the daemon, then the device's key and
        certificate, stored in ``config_dir``."""
        issued = subprocess.run(
            [
                sys.executable,
                "-m",
                "hearth_gateway.cli",
                "pair",
                "--json",
                "--state-dir",
                str(self.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if issued.returncode != 0:
            raise DemoFailed(f"hearth-gateway pair failed: {issued.stderr.strip()}")
        code = json.loads(issued.stdout)
        return pair(
            code["code"],
            self.pairing_address,
            ca_fingerprint=code["ca_fingerprint"],
            directory=config_dir,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL past the timeout. Returns the exit status (None if it had to
        be killed)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        self.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        except KeyboardInterrupt:  # asked twice: do not wait for the orderly shutdown
            proc.kill()
            proc.wait()
            raise

    def terminate(self) -> None:
        """SIGTERM, once, without waiting (``stop`` waits)."""
        if self.proc is not None and not self._terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no gateway log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the gateway log is empty)"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so that the cleanup runs when the demo is killed politely."""

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def show(row: Row) -> None:
    print(format_row(row), flush=True)


def check(phase1: list[Row], phase2: list[Row]) -> None:
    """What the demo promises: work was offloaded while the gateway was up, nothing reached it
    once it was stopped, and each job gave the same output wherever it ran."""
    if not any(r.where == "edge" for r in phase1):
        raise DemoFailed("no call was offloaded while the gateway was up")
    late = [r.job for r in phase2 if r.where == "edge" and r.gateway_id == GATEWAY_ID]
    if late:
        raise DemoFailed(f"{late[0]} ran on {GATEWAY_ID} after it had stopped")
    outputs: dict[str, set[str]] = {}
    for row in phase1 + phase2:
        outputs.setdefault(row.job, set()).add(row.digest)
    differing = sorted(job for job, digests in outputs.items() if len(digests) > 1)
    if differing:
        raise DemoFailed(f"different outputs on the gateway and here for {', '.join(differing)}")


def summary(phase1: list[Row], phase2: list[Row]) -> list[str]:
    offloaded = [r for r in phase1 if r.where == "edge"]
    local = sum(r.where == "local" for r in phase2)
    target = GATEWAY_ID if all(r.gateway_id == GATEWAY_ID for r in offloaded) else "a gateway"
    lines = [
        f"  Gateway up:    {len(offloaded)} of {len(phase1)} calls ran on {target}; the others "
        "measured the device or went",
        "                 where it was faster (here both share this machine's CPU).",
        f"  Gateway gone:  {local} of {len(phase2)} calls ran on the device instead.",
        "  Each job gave the same output on the gateway and on the device.",
    ]
    others = sorted(
        {str(r.gateway_id) for r in phase1 + phase2 if r.where == "edge"} - {GATEWAY_ID}
    )
    if others:
        lines.append(
            f"  Note: calls also went to {', '.join(others)}, another gateway on this machine; "
            "the SDK offloads to\n        the least loaded gateway it discovers."
        )
    return lines


def show_vision(client: Client) -> None:
    """Vision runs where the gateway's native code is: a face in a real photograph (the
    astronaut that scikit-image ships) and a rendered license plate."""
    import cv2
    import numpy as np
    from skimage import data as skdata

    from testkit.plates_synth import render_plate

    print("\n   Vision capabilities on the gateway (docs/vision.md):")
    photo = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    faces = client.faces(cv2.imencode(".jpg", photo)[1].tobytes())
    found = ", ".join(f"({f.x},{f.y}) {f.w}x{f.h}" for f in faces.result.faces) or "none"
    print(f"   vision.faces  {faces.latency_ms:6.1f} ms  astronaut photo: {found}")
    scene = render_plate("AB12 CDE", np.random.default_rng(7))
    plate = client.plate(cv2.imencode(".jpg", scene)[1].tobytes())
    print(
        f"   vision.plate  {plate.latency_ms:6.1f} ms  rendered plate AB12 CDE read as "
        f"{plate.result.text or '(nothing)'} ({plate.result.score:.2f})"
    )


def show_hop(run: MigratableRun, number: int, began: float) -> None:
    """Wait for the run's ``number``th hop and print it: when the demo saw it (seconds since
    ``began``), where, why."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(run.hops) < number:
        if run.done() or time.monotonic() > deadline:
            raise DemoFailed(f"hashchain made {len(run.hops)} hops, not {number}: {run.hops}")
        time.sleep(0.01)
    hop = run.hops[number - 1]
    print(f"   {time.monotonic() - began:4.1f} s  {hop.where:<13} {hop.reason}", flush=True)


def expected_chain(stdin: bytes, args: list[str], limits: WasmLimits) -> tuple[bytes, float]:
    """What hashchain prints run once, uninterrupted, on this device (the plain module, under
    wasmtime's own WASI), and how long that took."""
    plain = CHAIN_MODULES[0].read_bytes()
    runtime = WasmRuntime(wasi_nn=None)
    try:
        began = time.monotonic()
        outcome = runtime.run(
            hashlib.sha256(plain).hexdigest(), args=args, stdin=stdin, limits=limits, wasm=plain
        )
        return outcome.stdout, time.monotonic() - began
    finally:
        runtime.close()


def show_moving_run(gateway: GatewayProcess) -> str:
    """Part 3: a hashchain run starts here, moves to the gateway, and comes back by itself
    when the gateway stops; its output is compared with an uninterrupted run's. Returns a line
    for the summary."""
    print(
        "\n3) Work that moves. A migratable run (docs/migration.md) goes from this device to the\n"
        "   gateway and back while it runs, and prints what a run that never moved prints.\n"
        "   Starting the gateway again, with a policy for long runs ...",
        end="",
    )
    sys.stdout.flush()
    policy = gateway.state_dir.parent / "long-runs.toml"
    policy.write_text(f"[wasm]\nfuel = {CHAIN_FUEL}  # WebAssembly instructions per job\n")
    started = time.monotonic()
    gateway.start("--policy", str(policy))
    # Meanwhile, what the run must print: hashchain run once, uninterrupted, here.
    stdin = random.Random(7).randbytes(CHAIN_INPUT_BYTES)
    args, limits = [str(CHAIN_ROUNDS)], WasmLimits(fuel=CHAIN_FUEL)
    expected, plain_s = expected_chain(stdin, args, limits)
    gateway.wait_ready()
    print(f" ready in {time.monotonic() - started:.1f} s")
    print(
        f"   hashchain over {CHAIN_INPUT_BYTES / 1e6:.0f} MB of input, {CHAIN_ROUNDS} rounds per "
        f"4 KiB chunk, took {plain_s:.1f} s uninterrupted here\n"
        "   (the plain module, while the gateway started). Now as a migratable run:\n"
    )
    # Stopped at about half the run: the drain's pre-copy rounds (docs/migration.md) take a
    # few tenths of a second, and a run with less left than that ends on the gateway.
    move_after_s = min(MOVE_AFTER_S, plain_s / 4)
    with Client(None, interface=INTERFACE, placement="auto") as client:
        if not client.gateway_reachable():  # found and connected before the clock starts
            raise DemoFailed(f"{GATEWAY_ID} is not reachable after its restart")
        began = time.monotonic()
        run = client.start_wasm(CHAIN_MODULES[1], stdin, args, where="local", limits=limits)
        print("     AT    WHERE         WHY")
        show_hop(run, 1, began)  # after the module is compiled here: then it runs
        time.sleep(move_after_s)
        run.migrate("edge")
        show_hop(run, 2, began)
        time.sleep(move_after_s)
        print(
            f"   {time.monotonic() - began:4.1f} s  (the gateway is stopped: SIGTERM)", flush=True
        )
        stop_started = time.monotonic()
        gateway.terminate()
        show_hop(run, 3, began)
        status = gateway.stop()
        stop_s = time.monotonic() - stop_started
        outcome: RunOutcome = run.result(RUN_TIMEOUT_S)
    if status != 0:
        raise DemoFailed(f"the gateway did not exit cleanly (status {status})")
    home = outcome.hops[-1]
    if [h.where for h in outcome.hops] != ["local", GATEWAY_ID, "local"]:
        raise DemoFailed(f"hashchain went {[h.where for h in outcome.hops]}")
    if home.reason != "gateway stopping":
        raise DemoFailed(f"hashchain came back because {home.reason!r}, not 'gateway stopping'")
    print(
        f"   {time.monotonic() - began:4.1f} s  finished on {outcome.where}, exit "
        f"{outcome.exit_code} (the gateway exited 0 in {stop_s:.1f} s)"
    )
    print(f"   {outcome.stdout.decode().splitlines()[-1]}")
    identical = outcome.stdout == expected and outcome.exit_code == 0
    print(f"   identical output: {'yes' if identical else 'NO'} ({len(expected)} bytes)")
    if not identical:
        raise DemoFailed("the run that moved printed something else than the one that did not")
    return (
        f"  Work that moves: hashchain ran here, on {GATEWAY_ID} and here again, and printed\n"
        "                 byte for byte what an uninterrupted run prints."
    )


def run_demo(gateway: GatewayProcess) -> None:
    started = time.monotonic()
    print("Hearth demo: a gateway on loopback, and a camera device that offloads work to it\n")
    print(
        f"Starting gateway {GATEWAY_ID} (devices on {gateway.lan_address}, mutual TLS) ...", end=""
    )
    sys.stdout.flush()
    gateway.start()
    gateway.wait_ready()
    print(f" ready in {time.monotonic() - started:.1f} s")
    # The device keeps its key and certificate here, not in ~/.config/hearth.
    config_dir = gateway.state_dir.parent / "device"
    os.environ["HEARTH_CONFIG_DIR"] = str(config_dir)
    paired = gateway.pair_device(config_dir)
    print(
        f"Paired the camera with a one-time code: it is {paired.device_id} to the gateway, "
        "with a certificate from the gateway's own CA."
    )

    found = discover(interface=INTERFACE)
    if not any(g.gateway_id == GATEWAY_ID for g in found):
        raise DemoFailed(f"{GATEWAY_ID} vanished from mDNS")
    print(f"The device looks for gateways over mDNS on {INTERFACE} and finds:")
    for gw in found:
        print(f"  {describe_gateway(gw)}")
    others = sorted({g.gateway_id for g in found} - {GATEWAY_ID})
    if others:
        print(
            f"  ({', '.join(others)} also answers: the SDK offloads to the least "
            "loaded gateway, which may not be the demo's)"
        )

    with Client(None, interface=INTERFACE, placement="auto") as client:
        device = CameraDevice(client)
        print(
            "\n1) Gateway up. Each job runs 6 times with placement=auto: the SDK times the\n"
            "   gateway and this device (after one warm-up call each), then sends each call\n"
            "   where it measured faster.\n"
        )
        print(table_header())
        phase1 = device.run(repeat=6, on_row=show)
        show_vision(client)

        print("\n2) Stopping the gateway (SIGTERM) ...", end="")
        sys.stdout.flush()
        stop_started = time.monotonic()
        status = gateway.stop()
        if status != 0:
            raise DemoFailed(f"the gateway did not exit cleanly (status {status})")
        print(f" exited 0 in {time.monotonic() - stop_started:.1f} s; the same calls again:\n")
        print(table_header())
        phase2 = device.run(repeat=1, on_row=show)

    check(phase1, phase2)
    lines = summary(phase1, phase2)
    if CHAIN_MODULES[1].is_file():
        lines.append(show_moving_run(gateway))
    else:
        print(f"\n3) Work that moves: skipped, {CHAIN_MODULES[1]} is missing (it needs Binaryen)")
    print(f"\nDone in {time.monotonic() - started:.1f} s.")
    print("\n".join(lines))


def main() -> int:
    missing = missing_examples() + [p for p in CHAIN_MODULES[:1] if not p.is_file()]
    if missing:
        print(
            f"demo: {missing[0]} is missing; build the examples first: make examples",
            file=sys.stderr,
        )
        return 2
    with sigterm_as_interrupt():
        return run_and_clean_up(Path(tempfile.mkdtemp(prefix="hearth-demo-")))


def run_and_clean_up(workdir: Path) -> int:
    gateway = GatewayProcess(workdir)
    ok = interrupted = False
    try:
        run_demo(gateway)
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        print("\ndemo: interrupted; stopping the gateway", file=sys.stderr)
    except JobError as exc:
        print(
            f"\ndemo failed: a job failed ({exc.where}): {exc.code}: {exc.message}", file=sys.stderr
        )
    except (DemoFailed, HearthError, OSError, ValueError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
    finally:
        try:
            gateway.stop()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if not ok and not interrupted:
                print(f"\nLast lines of the gateway log ({gateway.log_path}):", file=sys.stderr)
                print(gateway.log_tail(), file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.pop("HEARTH_GATEWAY", None)  # the demo's device must find its gateway itself
    sys.exit(main())
