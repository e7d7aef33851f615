"""Composing ``concurrent.futures.Future``: the SDK's async calls are chains of them, completed
by paho's network thread (a reply), the connection's deadline thread (a timeout) or the local
pool (a run on this device), never by a thread that sits and waits."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TypeVar

__all__ = ["chain", "failed", "race", "running", "then"]

T = TypeVar("T")
U = TypeVar("U")


def running() -> Future[T]:
    """A future to complete by hand, already running: like an executor's, ``cancel()`` on it
    returns False rather than leaving a result nowhere to go."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()
    return future


def failed(exc: BaseException) -> Future[T]:
    """A future that already raised ``exc``."""
    future: Future[T] = running()
    future.set_exception(exc)
    return future


def chain(source: Future[T], target: Future[T]) -> None:
    """Complete ``target`` the way ``source`` completes."""

    def done(f: Future[T]) -> None:
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(f.result())

    source.add_done_callback(done)


def then(source: Future[T], fn: Callable[[T], U]) -> Future[U]:
    """``fn`` of the result, as a new future; an exception of either is the new one's."""
    target: Future[U] = running()

    def done(f: Future[T]) -> None:
        try:
            target.set_result(fn(f.result()))
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the future
            target.set_exception(exc)

    source.add_done_callback(done)
    return target


def race(*sources: Future[T]) -> Future[tuple[int, T]]:
    """The first of ``sources`` to succeed, as (its index, its result); if all fail, the
    first one's exception."""
    target: Future[tuple[int, T]] = running()
    failures: list[BaseException | None] = [None] * len(sources)
    left = [len(sources)]

    def done(index: int, f: Future[T]) -> None:
        exc = f.exception()
        if exc is None:
            if not target.done():
                with contextlib.suppress(InvalidStateError):  # another one won meanwhile
                    target.set_result((index, f.result()))
            return
        failures[index] = exc
        left[0] -= 1
        if left[0] == 0 and not target.done():
            first = next(e for e in failures if e is not None)
            with contextlib.suppress(InvalidStateError):
                target.set_exception(first)

    for index, source in enumerate(sources):
        source.add_done_callback(functools.partial(done, index))
    return target
