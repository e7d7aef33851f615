"""The inside of packaging/deb/try_install.sh: runs chrooted into a throwaway overlay of this
machine, as root, with the system's python3 and nothing but the standard library.

Install the package with dpkg, enable the unit as an admin would, start the unit's ExecStart=
the way systemd would (no systemd here), wait for READY=1, pair a device and run a WebAssembly
job from it over mutual TLS, stop the gateway with SIGTERM, purge. Prints one "STEP name: ..."
line per step and, last, "RESULT {json}"; exits 1 at the first step that fails."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

UNIT = "hearth-gateway.service"
UNIT_DIRS = [Path("/lib/systemd/system"), Path("/etc/systemd/system")]
STATE = Path("/var/lib/hearth")
PRIVATE_STATE = Path("/var/lib/private/hearth")
DYNAMIC_UID = 61184  # the first UID of systemd's DynamicUser= range
LAN = "127.0.0.1:8883"
PAIRING = "127.0.0.1:8884"
DEVICE_DIR = Path("/tmp/device")  # noqa: S108 - a fresh tmpfs of our own, nobody else's
# The device SDK's CLI, which the gateway's venv holds too (the gateway depends on the SDK).
HEARTH = "/opt/hearth/venv/bin/hearth"
# A WASI module that writes one line: made binary below with the packaged wasmtime.
HELLO_WAT = r"""(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a packaged gateway\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 30))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""

result: dict[str, object] = {}


def step(name: str, ok: bool, detail: object = "") -> None:
    result[name] = detail if ok else {"failed": detail}
    print(f"STEP {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)
    if not ok:
        print("RESULT " + json.dumps(result), flush=True)
        sys.exit(1)


def run(*argv: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def unit_settings() -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart= and Environment= after its drop-ins, as systemd merges them."""
    files = [d / UNIT for d in UNIT_DIRS if (d / UNIT).exists()][-1:]
    for d in UNIT_DIRS:
        files += sorted((d / f"{UNIT}.d").glob("*.conf"))
    exec_start: list[str] = []
    env: dict[str, str] = {}
    for f in files:
        section = ""
        for raw in f.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("ExecStart="):
                value = line.removeprefix("ExecStart=")
                exec_start = [value] if value else []
            elif section == "[Service]" and line.startswith("Environment="):
                for assignment in shlex.split(line.removeprefix("Environment=")):
                    key, _, value = assignment.partition("=")
                    env[key] = value
    assert len(exec_start) == 1, exec_start
    return shlex.split(exec_start[0]), env


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's rules: ${VAR} is one word, a word that is just $VAR splits at whitespace."""
    out: list[str] = []
    for word in argv:
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            out += env.get(bare.group(1), "").split()
        else:
            out.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return out


def main() -> None:  # noqa: PLR0915 - one scenario, told in order
    deb = sys.argv[1]
    started = time.monotonic()
    installed = run("dpkg", "-i", deb, timeout=600)
    took = f"{time.monotonic() - started:.1f} s"
    step(
        "install",
        installed.returncode == 0,
        took if installed.returncode == 0 else installed.stderr,
    )
    version = run("hearth-gateway", "--version")
    step("version", version.returncode == 0, version.stdout.strip() or version.stderr)
    # The completion file bash-completion loads on the first <Tab>, answering as bash asks.
    completion = Path("/usr/share/bash-completion/completions/hearth-gateway")
    answer = Path("/run/hearth-completion.out")  # the throwaway root's own /run
    asked = run(
        "hearth-gateway",
        env={
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),  # not bash's fd 8
            "COMP_LINE": "hearth-gateway dev",
            "COMP_POINT": "18",
        },
    )
    offered = answer.read_text().split() if answer.exists() else []
    answer.unlink(missing_ok=True)
    step(
        "completion",
        "_python_argcomplete" in completion.read_text() and "devices" in offered,
        offered or asked.stderr.strip(),
    )
    # What an admin does to start it at boot: links that purge must remove again.
    # deb-systemd-helper makes the same links where systemd itself is not installed.
    enabler = "systemctl" if shutil.which("systemctl") else "deb-systemd-helper"
    enabled = run(enabler, "enable", UNIT)
    wants = Path("/etc/systemd/system/multi-user.target.wants") / UNIT
    step("enable", wants.is_symlink(), enabled.stderr.strip())
    if shutil.which("systemd-analyze"):
        verified = run("systemd-analyze", "verify", "--man=no", UNIT)
        step("verify", verified.returncode == 0, verified.stderr.strip())
    else:
        step("verify", True, "skipped: systemd-analyze is not installed")

    # StateDirectory=hearth under DynamicUser=yes, as systemd lays it out.
    PRIVATE_STATE.mkdir(parents=True, mode=0o700)
    # systemd keeps /var/lib/private 0700 and makes it passable inside the service's own mount
    # namespace; with no such namespace here, traversal (not listing) is allowed instead.
    PRIVATE_STATE.parent.chmod(0o711)
    os.chown(PRIVATE_STATE, DYNAMIC_UID, DYNAMIC_UID)
    STATE.symlink_to("private/hearth")
    notify_path = "/run/hearth-notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    os.chmod(notify_path, 0o777)  # noqa: S103 - as systemd's: the dynamic UID must send to it
    argv, unit_env = unit_settings()
    # A drop-in an admin would add: devices on the LAN (here: loopback) over mutual TLS.
    unit_env["HEARTH_GATEWAY_OPTS"] = f"--lan-listen {LAN} --no-mdns"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "LANG": "C.UTF-8",
        "STATE_DIRECTORY": str(STATE),
        "NOTIFY_SOCKET": notify_path,
        **unit_env,
    }
    command = expand(argv, env)
    step("exec_start", True, shlex.join(command))
    gateway = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={DYNAMIC_UID}",
            f"--regid={DYNAMIC_UID}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            *command,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.umask(0o077),  # noqa: PLW1509 - nothing threaded runs yet
    )
    started = time.monotonic()
    notify.settimeout(180)
    messages: list[str] = []
    try:
        while "READY=1" not in messages:
            messages += notify.recv(4096).decode().split("\n")
    except TimeoutError:
        gateway.kill()
        step("ready", False, gateway.communicate()[0][-3000:])
    step("ready", True, f"READY=1 after {time.monotonic() - started:.1f} s")
    deadline = time.monotonic() + 30
    while True:  # the status file follows READY=1 by a moment
        status = run("hearth-gateway", "status", "--state-dir", str(STATE))
        if status.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    step("status", status.returncode == 0, (status.stdout + status.stderr).strip().splitlines()[:4])
    doctor = run("hearth-gateway", "doctor", "--state-dir", str(STATE), "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout or "{}").get("checks", [])}
    step("doctor", bool(checks), {k: c["status"] for k, c in checks.items()})

    # Pair a device as a person would, then run a job from it over the TLS listener.
    code = run("hearth-gateway", "pair", "--json", "--state-dir", str(STATE))
    step("pair_code", code.returncode == 0, code.stderr.strip())
    issued = json.loads(code.stdout)
    DEVICE_DIR.mkdir()
    device_env = {
        "PATH": env["PATH"],
        "HOME": str(DEVICE_DIR),
        "LANG": "C.UTF-8",
        "HEARTH_CONFIG_DIR": str(DEVICE_DIR / "config"),
    }
    paired = run(
        HEARTH,
        "pair",
        issued["code"],
        "--gateway",
        PAIRING,
        "--ca-fingerprint",
        issued["ca_fingerprint"],
        "--id",
        "cam-a",
        env=device_env,
    )
    step("pair", paired.returncode == 0, (paired.stdout + paired.stderr).strip())
    module = DEVICE_DIR / "hello.wasm"
    script = f"import wasmtime; open({str(module)!r}, 'wb').write(wasmtime.wat2wasm({HELLO_WAT!r}))"
    made = run("/opt/hearth/venv/bin/python", "-c", script)
    step("module", made.returncode == 0, made.stderr.strip())
    job = run(
        HEARTH,
        "run",
        "--where",
        "edge",
        "--gateway",
        LAN,
        str(module),
        env=device_env,
        stdin=subprocess.DEVNULL,
    )
    step(
        "job",
        job.returncode == 0 and job.stdout == "hello from a packaged gateway\n",
        (job.stdout + job.stderr).strip(),
    )

    # systemctl stop: SIGTERM to the main process, TimeoutStopSec=30.
    gateway.send_signal(signal.SIGTERM)
    try:
        log, _ = gateway.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.kill()
        log, _ = gateway.communicate()
        step("stop", False, "still running 30 s after SIGTERM")
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) > 2]
    left = [p for p in left if int(p) != os.getpid()]
    step(
        "stop",
        gateway.returncode == 0 and not left,
        {"exit": gateway.returncode, "processes_left": left, "log_tail": log[-400:]},
    )

    started = time.monotonic()
    purged = run("dpkg", "--purge", "hearth-gateway", timeout=300)
    took = f"{time.monotonic() - started:.1f} s"
    step("purge", purged.returncode == 0, took if purged.returncode == 0 else purged.stderr)
    remaining = [
        str(p)
        for p in (
            Path("/opt/hearth"),
            Path("/etc/hearth"),
            STATE,
            PRIVATE_STATE,
            wants,
            Path("/lib/systemd/system") / UNIT,
            Path("/usr/bin/hearth-gateway"),
        )
        if p.exists() or p.is_symlink()
    ]
    step("purged_paths", not remaining, remaining)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
