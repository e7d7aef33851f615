"""Jobs written ahead to busy workers (workers.py, ``_AHEAD_MAX_BYTES``): with every worker busy,
the next small WASM or ONNX job goes into a worker's pipe behind the one it runs, so the worker
goes on to it without sleeping. Only behind a kind of job that has been running briefly, never
to a worker due for recycling, and a job written ahead to a worker that dies never started: it
runs on another. Real worker processes and wasmtime; the pool driven by its own loop."""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hearth.errors import ErrorCode
from hearth.protocol import Error, WasmJob, WasmResult, decode_reply
from hearth.runtime.limits import WasmLimits
from hearth_gateway.loop import Loop
from hearth_gateway.policy import WorkersPolicy
from hearth_gateway.reply_to import ReplyTo
from hearth_gateway.runners import WorkerSettings
from hearth_gateway.workers import QueuedJob, WorkerPool

# A spin run ends when this fuel is spent: about 0.3 s here (far from brief: _AHEAD_MAX_RUN_S).
_FUEL = 1_500_000_000


class _Pool:
    """A one-worker pool and the answers it gave, by job id: (reply, final)."""

    def __init__(self, tmp_path: Path, wasm: dict[str, Path], **kwargs: object) -> None:
        self.loop = Loop()
        self.answers: dict[str, list[tuple[object, bool]]] = {}
        self.order: list[str] = []
        settings = WorkerSettings(
            runners=["wasm"],
            cache_dir=str(tmp_path / "cache"),
            wasm_limits=WasmLimits(fuel=_FUEL),
        )
        self.pool = WorkerPool(
            self.loop, settings, 1, self._answered, wasm_timeout_s=60, onnx_timeout_s=60, **kwargs
        )
        self.pool.start()
        self.modules = {
            name: (hashlib.sha256(p.read_bytes()).hexdigest(), p) for name, p in wasm.items()
        }

    def _answered(self, item: QueuedJob, reply: bytes, final: bool) -> None:
        self.answers.setdefault(item.job.job_id, []).append((decode_reply(reply), final))
        self.order.append(item.job.job_id)

    def submit(self, module: str) -> str:
        sha, path = self.modules[module]
        job_id = f"{module}-{uuid.uuid4().hex[:8]}"
        job = WasmJob(job_id=job_id, module=sha)
        self.pool.submit(
            QueuedJob(reply_to=ReplyTo("dev", "hearth/v1/dev/reply"), job=job, blob_path=str(path))
        )
        return job_id

    def wait(self, *job_ids: str, timeout_s: float = 60) -> None:
        assert self.loop.run_until(lambda: all(j in self.answers for j in job_ids), timeout_s)

    @property
    def worker(self) -> Any:  # the one worker (its internals are what is under test)
        return self.pool._workers[0]

    def close(self) -> None:
        self.pool.close()
        self.loop.close()


@pytest.fixture
def one_worker(tmp_path: Path, wasm: dict[str, Path]) -> Iterator[_Pool]:
    pool = _Pool(tmp_path, wasm)
    try:
        yield pool
    finally:
        pool.close()


def _warm(pool: _Pool) -> None:
    """Brief WASM runs, one at a time: the kind's recent run time is short."""
    for _ in range(5):
        job_id = pool.submit("noop")
        pool.wait(job_id)
        assert pool.worker.ahead is None  # a worker was free each time: nothing went ahead


def test_a_job_goes_ahead_only_behind_brief_work_and_runs_next(one_worker: _Pool) -> None:
    _warm(one_worker)
    spin = one_worker.submit("spin")  # long, but of a kind that has been brief
    noop = one_worker.submit("noop")
    assert one_worker.worker.job.job.job_id == spin
    assert one_worker.worker.ahead is not None
    assert one_worker.worker.ahead.job.job_id == noop
    assert not one_worker.pool.queue
    one_worker.wait(spin, noop)
    [(spun, _)] = one_worker.answers[spin]
    [(done, final)] = one_worker.answers[noop]
    assert isinstance(spun, Error)
    assert spun.code == ErrorCode.TIMEOUT
    assert isinstance(done, WasmResult)
    assert done.exit_code == 0
    assert final
    assert one_worker.order[-2:] == [spin, noop]
    # WASM runs are no longer brief (a spin weighs in the average): the next job waits in the
    # queue for the worker, not in its pipe.
    spin = one_worker.submit("spin")
    noop = one_worker.submit("noop")
    assert one_worker.worker.ahead is None
    assert [q.job.job_id for q in one_worker.pool.queue] == [noop]
    one_worker.wait(spin, noop)
    assert isinstance(one_worker.answers[noop][0][0], WasmResult)


def test_a_job_written_ahead_to_a_worker_that_dies_runs_on_its_replacement(
    one_worker: _Pool,
) -> None:
    _warm(one_worker)
    spin = one_worker.submit("spin")
    noop = one_worker.submit("noop")
    assert one_worker.worker.ahead is not None
    pid = one_worker.worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # mid-spin: a native crash, say
    one_worker.wait(spin, noop)
    [(crashed, final)] = one_worker.answers[spin]
    assert isinstance(crashed, Error)
    assert crashed.code == ErrorCode.WORKER_CRASHED
    assert not final  # a retry runs it again
    # The job behind it never started: it ran on the replacement, once, and succeeded.
    [(done, final)] = one_worker.answers[noop]
    assert isinstance(done, WasmResult)
    assert done.exit_code == 0
    assert final
    assert one_worker.worker.pid not in (None, pid)


def test_nothing_goes_ahead_to_a_worker_due_for_recycling(
    tmp_path: Path, wasm: dict[str, Path]
) -> None:
    pool = _Pool(tmp_path, wasm, recycle=WorkersPolicy(max_jobs=7))
    try:
        _warm(pool)  # 5 jobs; the 6th is the spin below, after which one more is allowed
        spin = pool.submit("spin")
        noop = pool.submit("noop")
        assert pool.worker.ahead is not None  # it may run a 7th
        pool.wait(spin, noop)
        assert pool.pool.recycled == 1  # after its 7th job, between jobs
        # Its replacement: 6 jobs, then a spin, its 7th and last: nothing may go ahead of it.
        _warm(pool)
        job = pool.submit("noop")
        pool.wait(job)
        spin = pool.submit("spin")  # its 7th: the last before recycling
        noop = pool.submit("noop")
        assert pool.worker.ahead is None
        assert [q.job.job_id for q in pool.pool.queue] == [noop]
        pool.wait(spin, noop)
        assert pool.pool.recycled == 2
        assert isinstance(pool.answers[noop][0][0], WasmResult)
    finally:
        pool.close()


def test_a_large_job_does_not_go_ahead(one_worker: _Pool) -> None:
    _warm(one_worker)
    spin = one_worker.submit("spin")
    sha, path = one_worker.modules["echo"]
    big = WasmJob(job_id="big", module=sha, stdin=os.urandom(256 * 1024))
    reply_to = ReplyTo("dev", "hearth/v1/dev/reply")
    one_worker.pool.submit(QueuedJob(reply_to=reply_to, job=big, blob_path=str(path)))
    # Over what a pipe surely holds: the write could block the daemon's loop until the
    # running job ends. It waits in the queue instead.
    assert one_worker.worker.ahead is None
    one_worker.wait(spin, "big")
    [(echoed, _)] = one_worker.answers["big"]
    assert isinstance(echoed, WasmResult)
    assert echoed.stdout == big.stdin
