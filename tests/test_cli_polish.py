"""The two command lines as a person meets them: help for every argument and an example per
command, the exit codes of README.md's table, a pairing code typed as printed, hints with
their blanks filled in, and a progress bar on a large upload (only on a terminal)."""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from hearth import cli as hearth_cli
from hearth_gateway import cli as gateway_cli
from test_pairing import SecureGateway, secure  # noqa: F401 - `secure` is a fixture

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _hearth(*args: str, **kw):  # type: ignore[no-untyped-def]
    return _run("hearth.cli", *args, **kw)


def _parsers(parser: argparse.ArgumentParser, path: str):  # type: ignore[no-untyped-def]
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


@pytest.mark.parametrize("module", [hearth_cli, gateway_cli], ids=["hearth", "hearth-gateway"])
def test_every_argument_has_help_and_every_command_an_example(module) -> None:  # type: ignore[no-untyped-def]
    for path, parser in _parsers(module._parser(), ""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{path}: {action.dest} has no help"
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if path and not has_sub:
            assert parser.epilog, f"{path} has no example"
            assert "example" in parser.epilog, f"{path} has no example"


@pytest.mark.parametrize("module", ["hearth.cli", "hearth_gateway.cli"])
def test_top_level_help_is_plain_text_with_examples_and_exit_codes(module: str) -> None:
    result = _run(module, "--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "``" not in text
    assert "examples:" in text
    assert "exit codes:" in text


def test_the_exit_code_table_is_the_one_the_readme_shows() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Exit codes") :]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|", table, re.MULTILINE))
    assert {"0", "2", "3", "4", "125", "130"} <= set(rows)
    assert "module" in rows["0"]
    assert (hearth_cli.EXIT_USAGE, hearth_cli.EXIT_NO_GATEWAY) == (2, 3)
    assert (hearth_cli.EXIT_PAIRING, hearth_cli.EXIT_JOB_FAILED) == (4, 125)


def test_exit_codes_row_by_row(gateway, wasm, tmp_path: Path) -> None:
    # 0 / the module's own code
    own = _hearth("run", "--gateway", gateway.address, "--where", "edge", str(wasm["echo"]))
    assert own.returncode == 0, own.stderr
    four = _hearth(
        "run", "--gateway", gateway.address, "--where", "edge", str(wasm["echo"]), "--exit", "7"
    )
    assert four.returncode == 7
    # 2: usage, from argparse and from values it cannot check
    assert _hearth("run", "--where", "nowhere", str(wasm["echo"])).returncode == 2
    bad_param = _hearth("call", "vision.faces", "--gateway", gateway.address, "--param", "x")
    assert bad_param.returncode == 2
    assert b"KEY=VALUE" in bad_param.stderr
    # 3: no gateway reachable
    gone = _hearth(
        "run", "--where", "edge", "--timeout", "1", str(wasm["echo"]),
        env={"HEARTH_GATEWAY": "127.0.0.1:1"},
    )  # fmt: skip
    assert gone.returncode == 3, gone.stderr
    # 4: pairing failed
    bad = _hearth("pair", "BADCODE", "--gateway", "127.0.0.1:1", "--ca-fingerprint", "00")
    assert bad.returncode == 4, bad.stderr
    assert b"pairing code" in bad.stderr
    # 125: the job failed
    trap = _hearth("run", "--gateway", gateway.address, "--where", "edge", str(wasm["trap"]))
    assert trap.returncode == 125
    # hearth-gateway: 3 without a running gateway
    none = _run("hearth_gateway.cli", "pair", "--state-dir", str(tmp_path / "nothing"))
    assert none.returncode == 3


def test_pair_takes_the_code_as_printed_with_spaces_in_any_case(
    secure,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    gw: SecureGateway = secure()
    issued = gw.admin("pair")
    assert issued.returncode == 0, issued.stderr
    code = re.search(r"Pairing code: +(\S+)", issued.stdout)
    assert code is not None
    # Every blank filled: the real pairing listener's address, never HOST.
    assert "HOST" not in issued.stdout
    hint = f"--gateway {gw.pairing} --ca-fingerprint"
    assert hint in issued.stdout
    command = re.search(r"hearth pair .*", issued.stdout)
    assert command is not None
    typed = code.group(1).lower().split("-")  # "xajc ver7 xaz3", as a person reads it aloud
    args = command.group(0).split()[1:]
    args[1:2] = typed
    result = _hearth(*args, "--id", "cam-typed", env={"HEARTH_CONFIG_DIR": str(tmp_path / "d")})
    assert result.returncode == 0, result.stderr
    assert b"paired with" in result.stdout


def _module_of(size: int, wasm: Path, tmp_path: Path) -> Path:
    """``wasm`` with a custom section that makes it ``size`` bytes or more: still valid."""
    payload = os.urandom(size)
    name = b"pad"
    body = bytes([len(name)]) + name + payload
    n, leb = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        leb.append(byte | (0x80 if n else 0))
        if not n:
            break
    out = tmp_path / "big.wasm"
    out.write_bytes(wasm.read_bytes() + b"\x00" + bytes(leb) + body)
    return out


def test_a_large_upload_shows_a_bar_on_a_terminal_only(gateway, wasm, tmp_path: Path) -> None:
    big = _module_of(9 << 20, wasm["echo"], tmp_path)
    args = ["run", "--gateway", gateway.address, "--where", "edge", str(big)]
    piped = _hearth(*args, stdin=b"x")
    assert piped.returncode == 0, piped.stderr
    assert b"upload" not in piped.stderr  # not a terminal: no bar

    again = _module_of(9 << 20, wasm["echo"], tmp_path)  # new bytes: uploaded again
    leader, follower = pty.openpty()
    # A new pty is 0 columns wide, where tqdm draws nothing; a terminal has a size.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(
        [sys.executable, "-m", "hearth.cli", *args[:-1], str(again)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
    ) as proc:
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed its end
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(30)
    os.close(leader)
    assert proc.returncode == 0, seen
    text = seen.decode(errors="replace")
    assert "upload" in text
    assert "100%" in text
    assert "MB" in text or "M/" in text or "MiB" in text, text


@pytest.mark.parametrize(
    ("module", "prog", "line", "expected"),
    [
        ("hearth.cli", "hearth", "hearth pa", "pair"),
        (
            "hearth_gateway.cli",
            "hearth-gateway",
            "hearth-gateway devices revoke --st",
            "--state-dir",
        ),
    ],
)
def test_shell_completion_registers_and_completes(
    module: str, prog: str, line: str, expected: str, tmp_path: Path
) -> None:
    pytest.importorskip("argcomplete")
    code = _run(module, "completion", "bash")
    assert code.returncode == 0, code.stderr
    assert f"-F _python_argcomplete {prog}\n" in code.stdout.decode()
    out = tmp_path / "completions"
    asked = _run(
        module,
        env={
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        },
    )
    assert asked.returncode == 0, asked.stderr
    assert expected in [word.strip() for word in out.read_text().split("\013")]


def test_a_download_bar_follows_a_large_reply_as_it_arrives_and_ends_at_100() -> None:
    # paho hands over a message only whole, so the bar polls how much of the packet arriving
    # now has come (Connection.receiving); here that reading is scripted, the bar is real.
    from hearth._progress import DownloadBar

    size = 20 << 20
    readings: list[tuple[int, int] | None] = [
        None,
        (1 << 20, 1 << 20),  # under the threshold: no bar
        (0, size),
        (size // 2, size),
        None,  # received whole: the bar is finished and closed
    ]
    stream = io.StringIO()
    bar = DownloadBar(lambda: readings.pop(0), stream=stream, interval_s=3600)
    for _ in range(5):
        bar.poll()
    bar.close()
    bar.close()  # idempotent
    text = stream.getvalue()
    assert text.count("download") >= 1
    assert "100%" in text
    assert "20.0M" in text
    assert "1.00M" not in text  # the small reply drew nothing


def test_the_connection_reports_no_packet_arriving_between_replies(gateway, wasm) -> None:
    # Read from paho's real packet buffer: between replies nothing is arriving (a reading
    # stuck on the last packet would draw a bar that never ends).
    with gateway.client() as client:
        assert client.receiving() is None  # not connected yet
        run = client.run_wasm(wasm["echo"], stdin=b"x" * (1 << 20), where="edge")
        assert run.stdout == b"x" * (1 << 20)
        assert client.receiving() is None
