"""What offloading a trivial job costs over the MQTT round trip it rides on.

One run, all on 127.0.0.1: one Mosquitto (the gateway's own config, TCP_NODELAY on) and one
``hearth-gateway`` subprocess using it. Measured, interleaved in blocks so drift hits every
series alike:

- echo: raw MQTT 5 request/response between two paho clients through that broker (Response
  Topic + Correlation Data, a payload the size of a job message; the responder a process of
  its own, as the gateway is): the baseline;
- ping: the SDK's ping to the gateway (the gateway's MQTT handling, no job);
- gateway: a no-op WASM job (noop.wasm, already cached on the gateway) via ``hearth.Client``;
- in-process: the same module run here with ``WasmRuntime`` (what the job itself costs).

Echo, ping and gateway at QoS 0 and QoS 1, N sequential round trips each after warm-ups; then
throughput with K requests in flight, raw echo against gateway jobs (in interleaved halves).
The job's median is also split into the SDK's own time, the queue wait and run time the gateway
reports in its reply, and the rest (transport, dispatch, journal, worker hand-off). Targets:
gateway/echo at p50 <= 1.5 and at p99 <= 2.0, gateway/echo throughput >= 50 %. A miss is
reported (MISS), not an error.

    .venv/bin/python benchmarks/offload_overhead.py            # table
    .venv/bin/python benchmarks/offload_overhead.py --json     # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    LOOPBACK,
    EchoRequester,
    EchoResponderProcess,
    GatewayProcess,
    Mosquitto,
    Summary,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    tree_cpu_s,
    verdict,
)
from hearth import Client, WasmRun
from hearth.protocol import WasmJob, encode
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway.policy import LimitsPolicy, Policy

log = logging.getLogger("bench.offload")

QOS_LEVELS = (0, 1)
TARGET_P50_RATIO = 1.5  # gateway job / raw echo, at most
TARGET_P99_RATIO = 2.0
TARGET_THROUGHPUT_RATIO = 0.5  # gateway jobs/s over echo requests/s, at least

DEFAULT_N_FAST = 2000  # echo and in-process round trips per series
DEFAULT_N_GATEWAY = 1000  # gateway jobs (and pings) per series
DEFAULT_COUNT = 2000  # requests per throughput run
DEFAULT_INFLIGHT = 8
WARMUP = 50  # discarded calls per series before measuring
ROUNDS = 4  # each series is measured in this many interleaved blocks
TIMEOUT_S = 10.0  # one round trip; a stuck run fails instead of hanging
MODULE = "noop.wasm"


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    qos: int | None
    call: Callable[[], object]
    n: int
    samples_ms: list[float]
    results: list[object]


def series(name: str, qos: int | None, call: Callable[[], object], n: int) -> Series:
    return Series(name, qos, call, n, [], [])


def measure_sequential(all_series: Sequence[Series], rounds: int = ROUNDS) -> None:
    """Warm every series up, then time its calls one after another, ``rounds`` blocks per
    series, the series taking turns block by block."""
    for s in all_series:
        for _ in range(WARMUP):
            s.call()
    for r in range(rounds):
        for s in all_series:
            block = s.n // rounds + (s.n % rounds if r == rounds - 1 else 0)
            call, samples, results = s.call, s.samples_ms, s.results
            for _ in range(block):
                started = time.perf_counter()
                result = call()
                samples.append((time.perf_counter() - started) * 1e3)
                results.append(result)
        log.info("sequential round %d/%d done", r + 1, rounds)


def measure_throughput(
    submit: Callable[[], Future[Any]], count: int, inflight: int, timeout_s: float = TIMEOUT_S
) -> float:
    """Seconds to complete ``count`` requests with at most ``inflight`` outstanding: a new one
    goes out as soon as any finishes."""
    slots = threading.Semaphore(inflight)
    errors: list[BaseException] = []

    def finished(future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            errors.append(exc)
        slots.release()

    started = time.perf_counter()
    for _ in range(count):
        if not slots.acquire(timeout=timeout_s):
            raise TimeoutError(f"no reply within {timeout_s} s with {inflight} in flight")
        if errors:
            raise errors[0]
        submit().add_done_callback(finished)
    for _ in range(inflight):  # wait for the last ones
        if not slots.acquire(timeout=timeout_s):
            raise TimeoutError(f"no reply within {timeout_s} s with {inflight} in flight")
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


@dataclass(frozen=True)
class Throughput:
    rps: float  # requests per second
    cpu_ms: float  # CPU time per request, all processes of this benchmark together


def compare_throughput(
    submitters: dict[str, Callable[[], Future[Any]]], count: int, inflight: int
) -> dict[str, Throughput]:
    """Throughput of each submitter, ``count`` requests each, run in interleaved halves (after
    a warm-up) so that a change in background load hits both alike. The CPU time per request
    (the broker, gateway, workers, responder and this process together) does not depend on
    that load: on a box where the requests are CPU-bound, its ratio is the throughput ratio."""
    halves = (count // 2, count - count // 2)
    elapsed = dict.fromkeys(submitters, 0.0)
    cpu = dict.fromkeys(submitters, 0.0)
    for submit in submitters.values():
        measure_throughput(submit, inflight * 10, inflight)
    for part in halves:
        for name, submit in submitters.items():
            if part:
                cpu_before = tree_cpu_s()
                elapsed[name] += measure_throughput(submit, part, inflight)
                cpu[name] += tree_cpu_s() - cpu_before
    return {name: Throughput(count / elapsed[name], cpu[name] * 1e3 / count) for name in submitters}


def check_edge_runs(results: Sequence[object]) -> None:
    for result in results:
        if not isinstance(result, WasmRun) or result.where != "edge" or result.exit_code != 0:
            raise RuntimeError(f"a gateway job did not run as expected: {result!r}")


# -- the run ----------------------------------------------------------------------------------

Figures = dict[str, float | int | bool]
SeriesKey = tuple[str, int | None]  # (series name, QoS or None)


@dataclass(frozen=True)
class Options:
    n_fast: int
    n_gateway: int
    count: int
    inflight: int
    throughput_qos: int
    workers: int | None


@dataclass(frozen=True)
class Outcome:
    figures: Figures
    summaries: dict[SeriesKey, Summary]


def run(opts: Options, work_dir: Path) -> Outcome:
    module_path = ensure_examples(f"wasm/{MODULE}") / "wasm" / MODULE
    wasm = module_path.read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    # The echo carries what a job message weighs on the wire.
    payload = bytes(len(encode(WasmJob(job_id=uuid.uuid4().hex, module=sha))))
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(work_dir))
        stack.enter_context(GatewayProcess(broker.address, work_dir, workers=opts.workers))
        topics = {q: f"bench/echo/q{q}" for q in QOS_LEVELS}
        echo_topics = [(topic, q) for q, topic in topics.items()]
        stack.enter_context(EchoResponderProcess(broker.address, work_dir, echo_topics))
        requesters: dict[int, EchoRequester] = {}
        clients: dict[int, Client] = {}
        for q, topic in topics.items():
            requesters[q] = stack.enter_context(
                EchoRequester(broker.address, topic, q, timeout_s=TIMEOUT_S)
            )
            clients[q] = stack.enter_context(
                Client(
                    gateway=f"{LOOPBACK}:{broker.address.port}",
                    client_id=f"bench-q{q}",
                    placement="edge",
                    qos=q,
                    timeout_s=TIMEOUT_S,
                    max_workers=opts.inflight,
                )
            )
        runtime = WasmRuntime()
        stack.callback(runtime.close)
        runtime.load(sha, wasm=wasm)
        # The limits the gateway's runner applies, so both run the module the same way.
        inproc = functools.partial(runtime.run, sha, limits=Policy().wasm.limits())

        first = clients[1].run_wasm(module_path)  # uploads the module; later calls find it
        log.info("module uploaded (%d bytes); first job %.1f ms", len(wasm), first.latency_ms)

        all_series: list[Series] = []
        for q in QOS_LEVELS:
            req, cli = requesters[q], clients[q]
            all_series += [
                series("echo", q, functools.partial(req.call, payload), opts.n_fast),
                series("ping", q, cli.ping, opts.n_gateway),
                series("gateway", q, functools.partial(cli.run_wasm, module_path), opts.n_gateway),
            ]
        all_series.append(series("in-process", None, inproc, opts.n_fast))
        log.info(
            "sequential: %s",
            ", ".join(f"{s.name}{'' if s.qos is None else f'@{s.qos}'} x{s.n}" for s in all_series),
        )
        measure_sequential(all_series)

        tq = opts.throughput_qos
        throughput = compare_throughput(
            {
                "echo": functools.partial(requesters[tq].send, payload),
                "gateway": functools.partial(clients[tq].run_wasm_async, module_path),
            },
            opts.count,
            opts.inflight,
        )
        echo_tp, gateway_tp = throughput["echo"], throughput["gateway"]
        log.info("throughput: echo %.0f req/s, gateway %.0f jobs/s", echo_tp.rps, gateway_tp.rps)
        fallbacks = sum(c.stats.fallbacks for c in clients.values())
        if fallbacks:
            raise RuntimeError(f"{fallbacks} gateway jobs fell back to local runs")

    by_key: dict[SeriesKey, Series] = {(s.name, s.qos): s for s in all_series}
    for q in QOS_LEVELS:
        check_edge_runs(by_key["gateway", q].results)
    summaries = {key: Summary.of(s.samples_ms) for key, s in by_key.items()}
    figures = collect(opts, summaries, by_key, echo_tp, gateway_tp)
    figures["payload_bytes"] = len(payload)
    return Outcome(figures, summaries)


def collect(
    opts: Options,
    summaries: dict[SeriesKey, Summary],
    by_key: dict[SeriesKey, Series],
    echo_tp: Throughput,
    gateway_tp: Throughput,
) -> Figures:
    out: Figures = {}
    for q in QOS_LEVELS:
        echo, ping, job = summaries["echo", q], summaries["ping", q], summaries["gateway", q]
        for name, s in (("echo", echo), ("ping", ping), ("gateway", job)):
            out[f"{name}_qos{q}_p50_ms"] = s.p50
            out[f"{name}_qos{q}_p99_ms"] = s.p99
        out[f"ratio_qos{q}_p50"] = job.p50 / echo.p50
        out[f"ratio_qos{q}_p99"] = job.p99 / echo.p99
        out[f"pass_qos{q}_p50"] = job.p50 / echo.p50 <= TARGET_P50_RATIO
        out[f"pass_qos{q}_p99"] = job.p99 / echo.p99 <= TARGET_P99_RATIO
        # Where a job's time goes, at the median: the SDK's own share (the caller's time minus
        # its publish-to-reply time), and the queue wait and run time the gateway reports.
        runs = [r for r in by_key["gateway", q].results if isinstance(r, WasmRun)]
        outer = by_key["gateway", q].samples_ms
        timings = [r.timing for r in runs if r.timing is not None]
        sdk = [o - r.latency_ms for o, r in zip(outer, runs, strict=True)]
        out[f"gateway_qos{q}_sdk_p50_ms"] = Summary.of(sdk).p50
        out[f"gateway_qos{q}_queue_p50_ms"] = Summary.of([t.queue_ms for t in timings]).p50
        out[f"gateway_qos{q}_run_p50_ms"] = Summary.of([t.run_ms for t in timings]).p50
        # What is left beyond a ping's round trip: dispatch, journal, worker hand-offs (approx.:
        # a difference of medians).
        out[f"gateway_qos{q}_rest_p50_ms"] = (
            job.p50
            - ping.p50
            - sum(float(out[f"gateway_qos{q}_{part}_p50_ms"]) for part in ("sdk", "queue", "run"))
        )
    inproc = summaries["in-process", None]
    out["inproc_p50_ms"] = inproc.p50
    out["inproc_p99_ms"] = inproc.p99
    out["throughput_echo_rps"] = echo_tp.rps
    out["throughput_gateway_rps"] = gateway_tp.rps
    out["throughput_ratio"] = gateway_tp.rps / echo_tp.rps
    out["pass_throughput"] = gateway_tp.rps / echo_tp.rps >= TARGET_THROUGHPUT_RATIO
    out["cpu_ms_per_echo"] = echo_tp.cpu_ms
    out["cpu_ms_per_job"] = gateway_tp.cpu_ms
    out["cpu_ratio"] = echo_tp.cpu_ms / gateway_tp.cpu_ms  # the CPU-bound throughput ratio
    out["throughput_inflight"] = opts.inflight
    out["throughput_qos"] = opts.throughput_qos
    out["throughput_count"] = opts.count
    out["n_echo"] = opts.n_fast
    out["n_gateway"] = opts.n_gateway
    out["gateway_workers"] = opts.workers or os.cpu_count() or 1  # the daemon's default
    out["cpus"] = os.cpu_count() or 1
    return out


def print_report(outcome: Outcome) -> None:
    f = outcome.figures
    order = ["echo", "ping", "gateway", "in-process"]
    keys = sorted(outcome.summaries, key=lambda k: (k[1] is None, k[1] or 0, order.index(k[0])))
    rows: list[list[object]] = []
    for name, q in keys:
        s = outcome.summaries[name, q]
        rows.append([name, "-" if q is None else str(q), s.n, s.p50, s.p90, s.p99, s.mean, s.max])
    print_table(
        ["series", "qos", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "max ms"],
        rows,
        title=f"Sequential round trips (payload {f['payload_bytes']} bytes, "
        f"{f['gateway_workers']} gateway workers, {f['cpus']} CPUs)",
    )
    print_table(
        ["throughput", "req/s", "CPU ms/req"],
        [
            ["raw echo", f["throughput_echo_rps"], f["cpu_ms_per_echo"]],
            ["gateway no-op jobs", f["throughput_gateway_rps"], f["cpu_ms_per_job"]],
            ["gateway/echo", f["throughput_ratio"], f["cpu_ratio"]],
        ],
        title=f"Throughput ({f['throughput_count']} requests each, "
        f"{f['throughput_inflight']} in flight, QoS {f['throughput_qos']})",
    )
    print_table(
        ["qos", "job", "echo", "ping", "sdk", "queue", "run", "rest", "in-process"],
        [
            [
                str(q),
                f[f"gateway_qos{q}_p50_ms"],
                f[f"echo_qos{q}_p50_ms"],
                f[f"ping_qos{q}_p50_ms"],
                f[f"gateway_qos{q}_sdk_p50_ms"],
                f[f"gateway_qos{q}_queue_p50_ms"],
                f[f"gateway_qos{q}_run_p50_ms"],
                f[f"gateway_qos{q}_rest_p50_ms"],
                f["inproc_p50_ms"],
            ]
            for q in QOS_LEVELS
        ],
        title="Where a gateway job's time goes (p50 ms; sdk: the client's own time around the "
        "round trip; queue, run: as the gateway reports them; rest: job - ping - sdk - queue - "
        "run, i.e. dispatch, journal and worker hand-offs)",
    )
    targets: list[list[object]] = []
    for q in QOS_LEVELS:
        for pct, target in (("p50", TARGET_P50_RATIO), ("p99", TARGET_P99_RATIO)):
            ratio = float(f[f"ratio_qos{q}_{pct}"])
            targets.append(
                [
                    f"qos{q} {pct} gateway/echo",
                    ratio,
                    f"<= {target}",
                    verdict(ratio, target, at_most=True),
                ]
            )
    ratio = float(f["throughput_ratio"])
    targets.append(
        [
            "throughput gateway/echo",
            ratio,
            f">= {TARGET_THROUGHPUT_RATIO}",
            verdict(ratio, TARGET_THROUGHPUT_RATIO, at_most=False),
        ]
    )
    print_table(["figure", "value", "target", "verdict"], targets, title="Targets")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--n",
        type=int,
        help=f"sequential round trips per series (default {DEFAULT_N_FAST} for echo and "
        f"in-process, {DEFAULT_N_GATEWAY} for gateway jobs and pings)",
    )
    parser.add_argument(
        "--inflight",
        type=int,
        default=DEFAULT_INFLIGHT,
        help=f"requests in flight for throughput (default {DEFAULT_INFLIGHT}; at most the "
        "gateway's max_inflight_per_client)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=DEFAULT_COUNT,
        help=f"requests per throughput run (default {DEFAULT_COUNT})",
    )
    parser.add_argument(
        "--throughput-qos", type=int, choices=QOS_LEVELS, default=1, help="default 1"
    )
    parser.add_argument("--workers", type=int, help="gateway worker processes (default: its own)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    quota = LimitsPolicy().max_inflight_per_client
    if not 1 <= args.inflight <= quota:
        parser.error(f"--inflight must be 1..{quota} (the gateway's per-device quota)")
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    setup_logging(args.verbose)
    opts = Options(
        n_fast=args.n or DEFAULT_N_FAST,
        n_gateway=args.n or DEFAULT_N_GATEWAY,
        count=args.count,
        inflight=args.inflight,
        throughput_qos=args.throughput_qos,
        workers=args.workers,
    )
    return run_and_report(lambda tmp: run(opts, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
