"""Flow control of a run's interim messages (gateway runners/_flow.py, docs/migration.md §8.4):
the window's bookkeeping, pure (threads, no network). End to end it is exercised by
tests/test_migration_precopy_mqtt.py against a real gateway."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from hearth.errors import ErrorCode, JobError
from hearth_gateway.runners._flow import SendWindow


def _waits(call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_a_message_waits_until_acknowledgements_make_room_in_the_window() -> None:
    window = SendWindow(8)
    window.wait_room(4)
    window.sent(4)  # message 1
    window.wait_room(4)
    window.sent(4)  # message 2: the window is full
    waiting = _waits(lambda: window.wait_room(4))
    waiting.join(0.2)
    assert waiting.is_alive()
    window.ack(1)  # message 1 handled: 4 bytes free
    waiting.join(5)
    assert not waiting.is_alive()


def test_drain_returns_once_everything_sent_is_acknowledged() -> None:
    window = SendWindow(8)
    for size in (3, 0, 2):  # a naming message after pieces carries no payload
        window.sent(size)
    draining = _waits(window.drain)
    window.ack(2)
    draining.join(0.2)
    assert draining.is_alive()
    window.ack(3)
    draining.join(5)
    assert not draining.is_alive()


def test_a_message_larger_than_the_window_goes_alone() -> None:
    window = SendWindow(8)
    window.wait_room(100)  # nothing in flight: it may go
    window.sent(100)
    waiting = _waits(lambda: window.wait_room(1))
    waiting.join(0.2)
    assert waiting.is_alive()
    window.ack(1)
    waiting.join(5)
    assert not waiting.is_alive()


def test_a_device_that_stops_acknowledging_turns_flow_control_off() -> None:
    window = SendWindow(8, timeout_s=0.1)
    window.sent(8)
    with pytest.raises(JobError) as caught:
        window.wait_room(1)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert not window.on
    window.wait_room(1_000)  # nothing waits any more
    window.drain()


def test_without_a_window_nothing_waits_and_closing_releases_waiters() -> None:
    off = SendWindow(0)
    off.sent(1 << 30)
    off.wait_room(1 << 30)
    off.drain()
    window = SendWindow(8)
    window.sent(8)
    waiting = _waits(window.drain)
    window.close()
    waiting.join(5)
    assert not waiting.is_alive()
    assert window.closed
