"""The worker's ONNX runtime on a box with an accelerator: one SDK runtime per provider, and each
model routed to the provider decided for it (hearth_gateway.accelerators).

A model's first run is its trial: every accelerator that loaded it runs that very input, and so
does the CPU provider; an accelerator is kept for the model only if its outputs agree with the
CPU's and its median time, over runs taken in turns with the CPU provider's, beats the CPU's or
ties with it (the CPU's answer is the job's, so a wrong accelerator never answers). A tie is
within ``TIE`` of the CPU's time: five runs on a busy box move a median by that much, and a
model the accelerator runs about as fast as the CPU (a recogniser on a few small strips) should
not flip between providers from one trial to the next; on a tie the accelerator is kept, since
it is what the box's owner installed it for. The decision is written to
disk and every later run, in any worker, goes straight to that provider. An accelerator that
fails a model later (its device vanished, a run error the CPU provider does not have) is refused
for it and the job runs on the CPU provider.

The ONNX, vision and wasi-nn runners share this object (``runners.onnx_runtime``), so a
WebAssembly module's wasi-nn model gets the same decision as an ONNX job for the same model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hearth.errors import ErrorCode, JobError
from hearth.protocol.messages import Tensor
from hearth.runtime.onnx import OnnxRuntime, Signature, tensor_to_array
from hearth_gateway.accelerators import CPU, ChoiceCache, Decision, outputs_disagree

__all__ = ["AcceleratedRuntime"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRIAL_RUNS = 5  # timed runs per provider in a trial, after one untimed (lazy set-up)
# A provider failing with these is a provider problem only if the CPU provider then succeeds.
_PROVIDER_FAILURES = frozenset({ErrorCode.BAD_TENSOR, ErrorCode.INVALID_MODEL})


class AcceleratedRuntime(OnnxRuntime):
    """``OnnxRuntime``'s interface over several providers. Each model runs on one provider,
    decided on its first run and kept in ``cache`` (see the module docstring).

    >>> rt = AcceleratedRuntime(["OpenVINOExecutionProvider", CPU], cache)  # doctest: +SKIP
    >>> rt.run(sha, tensors)[1]  # doctest: +SKIP
    'OpenVINOExecutionProvider'
    """

    def __init__(
        self,
        providers: Sequence[str],
        cache: ChoiceCache,
        *,
        intra_op_threads: int = 0,
        options: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__(providers=[CPU], intra_op_threads=intra_op_threads, max_cached=1)
        self.providers = [*(p for p in providers if p != CPU), CPU]
        self._cache = cache
        self._cpu = OnnxRuntime(providers=[CPU], intra_op_threads=intra_op_threads)
        self._accels = {
            p: OnnxRuntime(
                providers=[p], intra_op_threads=intra_op_threads, provider_options=options
            )
            for p in self.providers
            if p != CPU
        }
        self._chosen: dict[str, str] = {}  # sha256 -> provider, once decided
        self._probed: dict[str, tuple[list[str], dict[str, str]]] = {}  # undecided: candidates

    # -- OnnxRuntime's interface ---------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        return any(rt.has(sha256) for rt in (self._cpu, *self._accels.values()))

    def load(self, sha256: str, model: bytes | None = None, path: Path | None = None) -> str:
        """Make ``sha256`` runnable; returns the provider that will (probably, before the model's
        trial) run it."""
        provider = self._decided(sha256)
        if provider is not None:
            self._runtime(provider).load(sha256, model, path)
            return provider
        candidates, _ = self._candidates(sha256, model, path)
        if not candidates:
            return self._cpu.load(sha256, model, path)
        return candidates[0]

    def signature(
        self, sha256: str, model: bytes | None = None, path: Path | None = None
    ) -> tuple[list[Signature], list[Signature]]:
        """The model's inputs and outputs (OnnxRuntime.signature), read from a CPU session:
        describing a model does not start an accelerator's trial of it."""
        return self._cpu.signature(sha256, model, path)

    def run(
        self,
        sha256: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[str] = (),
        *,
        model: bytes | None = None,
        path: Path | None = None,
    ) -> tuple[list[Tensor], str]:
        def call(rt: OnnxRuntime) -> tuple[list[Tensor], str]:
            return rt.run(sha256, inputs, outputs, model=model, path=path)

        return self._dispatch(
            sha256, model, path, call, lambda ts: [tensor_to_array(t) for t in ts]
        )

    def run_arrays(
        self,
        sha256: str,
        feeds: Mapping[str, Any],
        outputs: Sequence[str] = (),
        *,
        model: bytes | None = None,
        path: Path | None = None,
    ) -> tuple[list[Any], str]:
        def call(rt: OnnxRuntime) -> tuple[list[Any], str]:
            return rt.run_arrays(sha256, feeds, outputs, model=model, path=path)

        return self._dispatch(sha256, model, path, call, list)

    def metadata(
        self, sha256: str, *, model: bytes | None = None, path: Path | None = None
    ) -> dict[str, str]:
        return self._holder(sha256, model, path).metadata(sha256, model=model, path=path)

    def input_specs(
        self, sha256: str, *, model: bytes | None = None, path: Path | None = None
    ) -> list[tuple[str, str, list[int | str | None]]]:
        return self._holder(sha256, model, path).input_specs(sha256, model=model, path=path)

    def forget(self, sha256: str) -> None:
        for rt in (self._cpu, *self._accels.values()):
            rt.forget(sha256)
        self._probed.pop(sha256, None)

    def close(self) -> None:
        for rt in (self._cpu, *self._accels.values()):
            rt.close()
        self._probed.clear()
        super().close()

    # -- decisions -----------------------------------------------------------------------------

    def _runtime(self, provider: str) -> OnnxRuntime:
        return self._accels.get(provider, self._cpu)

    def _decided(self, sha256: str) -> str | None:
        provider = self._chosen.get(sha256)
        if provider is not None:
            return provider
        decision = self._cache.get(sha256)
        if decision is None or (decision.provider not in self._accels and decision.provider != CPU):
            return None
        self._chosen[sha256] = decision.provider
        crashed = self._cache.crashed(sha256).get(decision.provider)
        if crashed is not None:  # a worker died running it there: not again
            self._demote(sha256, decision.provider, crashed)
        return self._chosen[sha256]

    def _holder(self, sha256: str, model: bytes | None, path: Path | None) -> OnnxRuntime:
        """A runtime that has (or will have) a session of ``sha256``, for its metadata."""
        return self._runtime(self.load(sha256, model, path))

    def _candidates(
        self, sha256: str, model: bytes | None, path: Path | None
    ) -> tuple[list[str], dict[str, str]]:
        """The accelerators that load ``sha256`` (best first), and why the others do not."""
        known = self._probed.get(sha256)
        if known is not None:
            return known
        refused = self._cache.crashed(sha256)
        candidates: list[str] = []
        for provider, rt in self._accels.items():
            if provider in refused:
                continue
            try:
                with self._cache.attempt(sha256, provider):
                    actual = rt.load(sha256, model, path)
            except JobError as exc:
                refused[provider] = f"refused the model: {exc.message}"
                log.info("%s refused model %s: %s", provider, sha256[:12], exc.message)
                continue
            if actual != provider:
                # onnxruntime drops a provider whose device is missing (OpenVINO asked for a
                # GPU the box does not have) and quietly runs the session on the CPU.
                refused[provider] = f"not active for the model (its device missing?): {actual}"
                rt.forget(sha256)
                continue
            candidates.append(provider)
        self._probed[sha256] = (candidates, refused)
        return candidates, refused

    def _dispatch(
        self,
        sha256: str,
        model: bytes | None,
        path: Path | None,
        call: Callable[[OnnxRuntime], tuple[list[T], str]],
        arrays: Callable[[list[T]], list[Any]],
    ) -> tuple[list[T], str]:
        provider = self._decided(sha256)
        if provider is None:
            return self._trial(sha256, model, path, call, arrays)
        if provider == CPU:
            return call(self._cpu)
        try:
            with self._cache.attempt(sha256, provider):
                result = call(self._accels[provider])
            if result[1] != provider:  # its device went away since the decision
                self._demote(sha256, provider, f"not active for the model any more: {result[1]}")
            return result
        except JobError as exc:
            if exc.code not in _PROVIDER_FAILURES:
                raise
            # The input's fault or the provider's? The CPU provider tells: if it fails too, its
            # error is the job's; if it succeeds, the accelerator is refused for this model.
            result = call(self._cpu)
            self._demote(sha256, provider, f"failed at run time: {exc.message}")
            return result

    def _trial(
        self,
        sha256: str,
        model: bytes | None,
        path: Path | None,
        call: Callable[[OnnxRuntime], tuple[list[T], str]],
        arrays: Callable[[list[T]], list[Any]],
    ) -> tuple[list[T], str]:
        candidates, refused = self._candidates(sha256, model, path)
        refused = dict(refused)
        # The CPU provider first: if it cannot run this input, the input is at fault, and the
        # job fails with its error before any accelerator is judged on it.
        reference = call(self._cpu)
        expected = arrays(reference[0])
        kept: list[str] = []
        for provider in candidates:  # first runs (lazy set-up), checked against the CPU's
            try:
                result = self._try(sha256, provider, call)
            except JobError as exc:
                refused[provider] = f"failed at run time: {exc.message}"
                continue
            wrong = outputs_disagree(expected, arrays(result[0]))
            if wrong is not None:
                refused[provider] = wrong
                self._accels[provider].forget(sha256)
                continue
            kept.append(provider)
        # Timed runs, taking turns: on a busy box a burst of other work then slows every
        # provider's runs alike instead of the runs of whichever provider it met.
        times: dict[str, list[float]] = {p: [] for p in (CPU, *kept)}
        for _ in range(_TRIAL_RUNS):
            for provider in list(times):
                started = time.perf_counter()
                try:
                    if provider == CPU:
                        call(self._cpu)
                    else:
                        self._try(sha256, provider, call)
                except JobError as exc:
                    refused[provider] = f"failed at run time: {exc.message}"
                    del times[provider]
                    continue
                times[provider].append((time.perf_counter() - started) * 1e3)
        timings = {p: sorted(ts)[len(ts) // 2] for p, ts in times.items()}
        best = _fastest(timings)
        for provider in candidates:
            if provider != best:
                self._accels[provider].forget(sha256)
        if best != CPU:
            self._cpu.forget(sha256)
        self._decide(sha256, best, refused, timings)
        return reference[0], best  # the CPU's answer: equal to best's, or best is the CPU

    def _try(
        self, sha256: str, provider: str, call: Callable[[OnnxRuntime], tuple[list[T], str]]
    ) -> tuple[list[T], str]:
        """``call`` on an accelerator, marked as an attempt (a crash in it is remembered)."""
        with self._cache.attempt(sha256, provider):
            return call(self._accels[provider])

    def _decide(
        self, sha256: str, provider: str, refused: dict[str, str], timings: dict[str, float]
    ) -> None:
        decision = Decision(
            provider=provider,
            package=self._cache.package,
            refused=refused,
            p50_ms={p: round(ms, 3) for p, ms in timings.items()},
            decided_at=time.time(),
        )
        self._cache.put(sha256, decision)
        self._chosen[sha256] = provider
        self._probed.pop(sha256, None)
        log.info(
            "model %s runs on %s (%s)",
            sha256[:12],
            provider,
            ", ".join(f"{p} {ms:.2f} ms" for p, ms in timings.items())
            + "".join(f"; {p}: {why}" for p, why in refused.items()),
        )

    def _demote(self, sha256: str, provider: str, why: str) -> None:
        decision = self._cache.get(sha256)
        refused = dict(decision.refused) if decision is not None else {}
        timings = dict(decision.p50_ms) if decision is not None else {}
        refused[provider] = why
        timings.pop(provider, None)
        self._accels[provider].forget(sha256)
        log.warning("%s dropped for model %s: %s", provider, sha256[:12], why)
        self._decide(sha256, CPU, refused, timings)


TIE = 0.10  # an accelerator within 10 % of the CPU provider's median is kept (see the docstring)


def _fastest(timings: Mapping[str, float]) -> str:
    """The provider a model gets: the fastest accelerator if it is faster than the CPU provider
    or within ``TIE`` of it, else the CPU provider."""
    accels = {p: ms for p, ms in timings.items() if p != CPU}
    if not accels:
        return CPU
    best = min(accels, key=accels.__getitem__)
    if CPU not in timings or accels[best] <= timings[CPU] * (1 + TIE):
        return best
    return CPU
