"""placement="hedge" for WebAssembly calls, with the loser cancelled (docs/migration.md §10).

A hedged call runs on this device and on the gateway at once and takes the first answer. To
stop the other half, both halves are migratable runs (hearth.migration) of the module
instrumented once, here: the half on this device stops at its next migration point when asked
(``Run.pause``), the half on the gateway is cancelled with ``run_control`` (the gateway drops
it from its queue if no worker has it yet, else stops it at its next migration point, and
answers its start ``cancelled``: the worker is free for the next job). A module that cannot be
made migratable here (no Binaryen, a wasi-nn import) is hedged as before: both halves run to
their end and the slower answer is dropped.

What a loser still costs is the work it did until its next migration point: a program that
reads or writes as it goes stops within one call; one computing for long with no I/O and no
``hearth_yield()`` runs on until it does (benchmarks/hedge.py reports the CPU of both).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

from hearth._futures import race, then
from hearth._results import Stats, WasmRun
from hearth.errors import HearthError
from hearth.migration import MigratableRun, RunHost, RunOutcome, load_module
from hearth.protocol import WasmJob

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Hedger"]

_INSTRUMENTED_KEPT = 32  # modules whose migratable form is kept (a few per application)


class Hedger:
    """Starts hedged WASM calls for a Client and cancels their losers."""

    def __init__(self, host: RunHost, stats: Stats, track: Callable[[MigratableRun], None]) -> None:
        self._host = host
        self._stats = stats
        self._track = track
        self._lock = threading.Lock()
        # sha256 of a plain module -> its migratable form, or None: it cannot be made one here.
        self._modules: dict[str, bytes | None] = {}
        # The latest losing halves, to look at (tests, benchmarks): each ends `cancelled`.
        self.losers: deque[MigratableRun] = deque(maxlen=16)

    def migratable(self, wasm: bytes) -> bytes | None:
        """The module's migratable form, made once; None when it cannot migrate here."""
        sha = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            if sha in self._modules:
                return self._modules[sha]
        try:
            module: bytes | None = load_module(wasm)
            assert module is not None
            # Compiled now (the half on this device needs it) so that a module that cannot
            # migrate (wasi-nn, threads) is found out before the call, not by its halves.
            self._host.migratable_runtime().module(hashlib.sha256(module).hexdigest(), module)
        except HearthError:
            module = None
        with self._lock:
            if len(self._modules) >= _INSTRUMENTED_KEPT:
                self._modules.pop(next(iter(self._modules)))
            self._modules[sha] = module
        return module

    def start(self, job: WasmJob, module: bytes) -> Future[WasmRun]:
        """Both halves of ``job`` (``module``: its migratable form); the first to finish wins
        and the other is cancelled."""
        started = time.perf_counter()
        halves = [
            MigratableRun(
                self._host,
                module,
                args=job.args,
                stdin=job.stdin,
                data_class=job.data_class,
                where=where,
                reason="placement=hedge",
                checkpoint_every_s=0.0,
                deadline_s=self._host.timeout_s,
            )
            for where in ("edge", "local")
        ]
        for half in halves:
            self._track(half)
        futures = [half.future() for half in halves]

        def won(first: tuple[int, RunOutcome]) -> WasmRun:
            index, outcome = first
            loser = halves[1 - index]
            self.losers.append(loser)
            # From a thread of its own: cancelling the gateway's half waits for its run_ack.
            threading.Thread(target=loser.cancel, name=f"hearth-hedge-{loser.run_id}").start()
            # Where it finished: the gateway's half comes here if its gateway is lost.
            here = outcome.where == "local"
            if here:
                self._stats.hedge_local_wins += 1
                reason, gateway = "hedge: this device answered first", None
            else:
                self._stats.edge_calls += 1
                reason, gateway = "hedge: the gateway answered first", outcome.where
            return WasmRun(
                exit_code=outcome.exit_code,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                where="local" if here else "edge",
                reason=reason,
                latency_ms=(time.perf_counter() - started) * 1e3,
                job_id=job.job_id,
                gateway_id=gateway,
            )

        return then(race(*futures), won)
