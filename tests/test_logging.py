"""Log lines for the journal under systemd (``<N>`` priorities, no timestamps of our own) and
plain lines elsewhere (hearth_gateway/_logging.py, docs/systemd.md)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hearth_gateway._logging import configure_logging, journal_stream
from testkit.gateway import GatewayProcess

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
PRIORITY = re.compile(r"^<([0-7])>")


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _as_journal(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """What systemd does: JOURNAL_STREAM names the stream stderr is connected to."""
    st = path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def _log_some(stream_path: Path) -> list[str]:
    with stream_path.open("a") as stream:
        journal = configure_logging(stream=stream)
        log = logging.getLogger("hearth_gateway.test")
        log.debug("not shown")
        log.info("ready on %s", "127.0.0.1:1883")
        log.warning("storage full")
        try:
            1 / 0  # noqa: B018 - a traceback to log
        except ZeroDivisionError:
            log.exception("unexpected error")
        log.critical("giving up")
        for handler in logging.getLogger().handlers:
            handler.flush()
    assert journal == bool(os.environ.get("JOURNAL_STREAM"))
    return stream_path.read_text().splitlines()


@pytest.mark.usefixtures("restore_root_logger")
def test_under_the_journal_each_line_carries_its_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    path.touch()
    _as_journal(monkeypatch, path)
    lines = _log_some(path)
    assert lines[0] == "<6>hearth_gateway.test: ready on 127.0.0.1:1883"
    assert lines[1] == "<4>hearth_gateway.test: storage full"
    assert lines[2] == "<3>hearth_gateway.test: unexpected error"
    traceback = lines[3:-1]
    assert traceback[0] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in traceback)  # one journal entry per line
    assert lines[-1] == "<2>hearth_gateway.test: giving up"
    assert not any(TIMESTAMP.search(line) for line in lines)


@pytest.mark.usefixtures("restore_root_logger")
def test_elsewhere_lines_are_plain_with_their_time_and_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = _log_some(tmp_path / "stderr")
    assert re.fullmatch(
        rf"{TIMESTAMP.pattern},\d{{3}} INFO hearth_gateway.test: ready on 127.0.0.1:1883", lines[0]
    )
    assert " WARNING hearth_gateway.test: storage full" in lines[1]
    assert not any(PRIORITY.match(line) for line in lines)


def test_a_journal_stream_that_is_not_our_stderr_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child of the service whose stderr went elsewhere inherits the variable only."""
    other, ours = tmp_path / "journal", tmp_path / "file"
    other.touch()
    _as_journal(monkeypatch, other)
    with ours.open("w") as stream:
        assert not journal_stream(stream)
    with other.open("w") as stream:
        assert journal_stream(stream)
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    with other.open("w") as stream:
        assert not journal_stream(stream)


def test_the_daemon_logs_for_the_journal_when_systemd_says_so(
    make_gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = make_gateway(start=False)
    gw.log_path.touch()
    _as_journal(monkeypatch, gw.log_path)  # the daemon's stderr is that file
    gw.start()
    assert gw.stop() == 0
    lines = [line for line in gw.log().splitlines() if line.strip()]
    assert lines
    unprefixed = [line for line in lines if not PRIORITY.match(line)]
    assert unprefixed == []
    assert any(re.match(r"<6>hearth_gateway\.daemon: gateway \S+ ready", line) for line in lines)
    assert not any(TIMESTAMP.search(line) for line in lines)
