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
throughput with K requests in flight, raw echo against gateway jobs (in interleaved halves),
with the CPU time per request of each process (this client, the broker, the daemon, its
workers, the echo responder); then a payload sweep at QoS 1: a WASI module that copies stdin to
stdout (echo.wasm) with 100 B, 64 KiB and 1 MiB of stdin, against a raw echo of a message of
the same size, and the same run in-process. The job's median is also split into the SDK's own
time, the queue wait and run time the gateway reports in its reply, and the rest (transport,
dispatch, journal, worker hand-off). Targets (issue 10): gateway/echo at p50 <= 1.8 and at
p99 <= 2.0 (QoS 1), gateway/echo throughput >= 45 %, 1 MiB job/echo at p50 <= 2.0. A miss is
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
    RoleCpu,
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
TARGET_P50_RATIO = 1.8  # gateway job / raw echo, at most
TARGET_P99_RATIO = 2.0
TARGET_THROUGHPUT_RATIO = 0.45  # gateway jobs/s over echo requests/s, at least
TARGET_SWEEP_RATIO = 2.0  # the largest payload's job / echo p50, at most
SWEEP_BYTES = (100, 64 * 1024, 1024 * 1024)  # stdin of echo.wasm (and its stdout)
SWEEP_N = {100: 400, 64 * 1024: 200, 1024 * 1024: 60}  # round trips per series (--sweep-n)
SWEEP_WARMUP = 10
SWEEP_MODULE = "echo.wasm"

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


def measure_sequential(
    all_series: Sequence[Series], rounds: int = ROUNDS, warmup: int = WARMUP
) -> None:
    """Warm every series up, then time its calls one after another, ``rounds`` blocks per
    series, the series taking turns block by block."""
    for s in all_series:
        for _ in range(warmup):
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
    cpu_ms_by_role: dict[str, float]  # the same, per process (RoleCpu's roles)


def compare_throughput(
    submitters: dict[str, Callable[[], Future[Any]]], count: int, inflight: int, roles: RoleCpu
) -> dict[str, Throughput]:
    """Throughput of each submitter, ``count`` requests each, run in interleaved halves (after
    a warm-up) so that a change in background load hits both alike. The CPU time per request
    (the broker, gateway, workers, responder and this process together) does not depend on
    that load: on a box where the requests are CPU-bound, its ratio is the throughput ratio."""
    halves = (count // 2, count - count // 2)
    elapsed = dict.fromkeys(submitters, 0.0)
    cpu = dict.fromkeys(submitters, 0.0)
    by_role: dict[str, dict[str, float]] = {name: {} for name in submitters}
    for submit in submitters.values():
        measure_throughput(submit, inflight * 10, inflight)
    for part in halves:
        for name, submit in submitters.items():
            if part:
                cpu_before, roles_before = tree_cpu_s(), roles.sample()
                elapsed[name] += measure_throughput(submit, part, inflight)
                cpu[name] += tree_cpu_s() - cpu_before
                for role, used in RoleCpu.since(roles_before, roles.sample()).items():
                    by_role[name][role] = by_role[name].get(role, 0.0) + used
    return {
        name: Throughput(
            count / elapsed[name],
            cpu[name] * 1e3 / count,
            {role: used * 1e3 / count for role, used in by_role[name].items()},
        )
        for name in submitters
    }


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
    sweep_n: int  # 0: SWEEP_N


@dataclass(frozen=True)
class Outcome:
    figures: Figures
    summaries: dict[SeriesKey, Summary]
    roles: dict[str, dict[str, float]]  # CPU ms per request by process, echo and gateway
    sweep: dict[int, dict[str, Summary]]  # payload bytes -> echo, gateway, in-process


def payload_sweep(
    client: Client, requester: EchoRequester, runtime: WasmRuntime, sizes: Sequence[int], n: int
) -> dict[int, dict[str, Summary]]:
    """For each stdin size: echo.wasm through the gateway (QoS 1) against a raw echo of a
    message of the job's size and the same run in-process, interleaved as the main series."""
    module_path = ensure_examples(f"wasm/{SWEEP_MODULE}") / "wasm" / SWEEP_MODULE
    wasm = module_path.read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    runtime.load(sha, wasm=wasm)
    client.run_wasm(module_path)  # uploads the module
    limits = Policy().wasm.limits()
    out: dict[int, dict[str, Summary]] = {}
    for size in sizes:
        stdin = os.urandom(size)  # incompressible, as a camera frame nearly is
        message = encode(WasmJob(job_id=uuid.uuid4().hex, module=sha, stdin=stdin))
        count = n if n else SWEEP_N.get(size, 100)
        job = series(
            "gateway", 1, functools.partial(client.run_wasm, module_path, stdin=stdin), count
        )
        trio = [
            series("echo", 1, functools.partial(requester.call, bytes(len(message))), count),
            job,
            series(
                "in-process",
                None,
                functools.partial(runtime.run, sha, stdin=stdin, limits=limits),
                count,
            ),
        ]
        measure_sequential(trio, warmup=SWEEP_WARMUP)
        for result in job.results:
            if not isinstance(result, WasmRun) or result.where != "edge" or result.stdout != stdin:
                raise RuntimeError(f"a {size} B echo job did not answer its stdin: {result!r}")
        job.results.clear()  # 60 answers of 1 MiB need not stay
        out[size] = {s.name: Summary.of(s.samples_ms) for s in trio}
        trio_p50 = {name: summary.p50 for name, summary in out[size].items()}
        log.info("sweep %d B: p50 (ms) %s", size, trio_p50)
    return out


def run(opts: Options, work_dir: Path) -> Outcome:
    module_path = ensure_examples(f"wasm/{MODULE}") / "wasm" / MODULE
    wasm = module_path.read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    # The echo carries what a job message weighs on the wire.
    payload = bytes(len(encode(WasmJob(job_id=uuid.uuid4().hex, module=sha))))
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(work_dir))
        gateway = stack.enter_context(
            GatewayProcess(broker.address, work_dir, workers=opts.workers)
        )
        topics = {q: f"bench/echo/q{q}" for q in QOS_LEVELS}
        echo_topics = [(topic, q) for q, topic in topics.items()]
        responder = stack.enter_context(EchoResponderProcess(broker.address, work_dir, echo_topics))
        daemon = gateway.daemon_pid()
        roles = RoleCpu(
            {
                "client": (os.getpid(), "self"),
                "broker": (broker.pid, "tree"),
                "daemon": (daemon, "self"),
                "workers": (daemon, "children"),
                "echo_responder": (responder.pid, "tree"),
            }
        )
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
            roles,
        )
        echo_tp, gateway_tp = throughput["echo"], throughput["gateway"]
        log.info("throughput: echo %.0f req/s, gateway %.0f jobs/s", echo_tp.rps, gateway_tp.rps)
        sweep = payload_sweep(clients[1], requesters[1], runtime, SWEEP_BYTES, opts.sweep_n)
        fallbacks = sum(c.stats.fallbacks for c in clients.values())
        if fallbacks:
            raise RuntimeError(f"{fallbacks} gateway jobs fell back to local runs")

    by_key: dict[SeriesKey, Series] = {(s.name, s.qos): s for s in all_series}
    for q in QOS_LEVELS:
        check_edge_runs(by_key["gateway", q].results)
    summaries = {key: Summary.of(s.samples_ms) for key, s in by_key.items()}
    figures = collect(opts, summaries, by_key, echo_tp, gateway_tp)
    figures["payload_bytes"] = len(payload)
    for role, used in echo_tp.cpu_ms_by_role.items():
        figures[f"cpu_ms_per_echo_{role}"] = used
    for role, used in gateway_tp.cpu_ms_by_role.items():
        figures[f"cpu_ms_per_job_{role}"] = used
    for size, trio in sweep.items():
        for name, key in (("echo", "echo"), ("gateway", "job"), ("in-process", "inproc")):
            figures[f"sweep_{size}_{key}_p50_ms"] = trio[name].p50
            figures[f"sweep_{size}_{key}_p99_ms"] = trio[name].p99
        figures[f"sweep_{size}_ratio_p50"] = trio["gateway"].p50 / trio["echo"].p50
    largest = max(sweep)
    figures["pass_sweep"] = float(figures[f"sweep_{largest}_ratio_p50"]) <= TARGET_SWEEP_RATIO
    by_role = {"echo": echo_tp.cpu_ms_by_role, "gateway": gateway_tp.cpu_ms_by_role}
    return Outcome(figures, summaries, by_role, sweep)


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
    roles = list(outcome.roles["gateway"])
    print_table(
        ["CPU ms per request", *roles, "total"],
        [
            ["raw echo", *outcome.roles["echo"].values(), f["cpu_ms_per_echo"]],
            ["gateway no-op job", *outcome.roles["gateway"].values(), f["cpu_ms_per_job"]],
        ],
        title="CPU time per request by process, in the throughput runs (client: this process; "
        "workers: the gateway's worker processes together)",
    )
    print_table(
        ["stdin", "n", "echo p50", "job p50", "job/echo", "in-process p50", "echo p99", "job p99"],
        [
            [
                _size(size),
                trio["gateway"].n,
                trio["echo"].p50,
                trio["gateway"].p50,
                trio["gateway"].p50 / trio["echo"].p50,
                trio["in-process"].p50,
                trio["echo"].p99,
                trio["gateway"].p99,
            ]
            for size, trio in outcome.sweep.items()
        ],
        title=f"Payload sweep (QoS 1, {SWEEP_MODULE}: stdin copied to stdout; echo: a raw MQTT "
        "echo of a message of the job's size; ms)",
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
    largest = max(outcome.sweep)
    ratio = float(f[f"sweep_{largest}_ratio_p50"])
    targets.append(
        [
            f"{_size(largest)} job/echo p50",
            ratio,
            f"<= {TARGET_SWEEP_RATIO}",
            verdict(ratio, TARGET_SWEEP_RATIO, at_most=True),
        ]
    )
    print_table(["figure", "value", "target", "verdict"], targets, title="Targets")


def _size(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


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
    parser.add_argument(
        "--sweep-n",
        type=int,
        default=0,
        help="round trips per payload-sweep series (default: 400, 200, 60 by size)",
    )
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
        sweep_n=args.sweep_n,
    )
    return run_and_report(lambda tmp: run(opts, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
