"""Does a pool of cloud-tier gateways share work, and does adding members cost efficiency?

One run, all on 127.0.0.1. For 1, 2 and 3 members: a fresh Mosquitto, that many cloud-tier
gateways (``--tier cloud --pool P``, one worker each) sharing the pool's requests through the
broker's shared subscription, a home gateway with no ``wasm`` runner whose upstream is the pool
(so placement sends it every public WebAssembly job), and a raw MQTT device streaming N public
``echo.wasm`` jobs (default 3000), K in flight, through the home gateway. A warm-up of 20 jobs
per member first (each member asks for the module once and compiles it). Then, with 3 members,
the same stream again with one member SIGKILLed a third of the way through.

On a machine with fewer cores than processes, wall-clock throughput says more about the
machine than about the pool, so the figure compared is **jobs per CPU-second**: the jobs
answered divided by the CPU time (user + system) of every process of the run, read from
/proc: the members and their workers, the broker, the home gateway and this process (the
device). It must not fall as members are added (each configuration against 1 member, in the
same run, with 10 % allowed for noise on a busy box). For each stream: how many jobs each
member answered, jobs lost (never answered) and jobs answered twice with different results
(both must be 0), and wall-clock jobs per second for reference.

    .venv/bin/python benchmarks/pool.py               # table
    .venv/bin/python benchmarks/pool.py --json        # one JSON line on stdout
    .venv/bin/python benchmarks/pool.py --jobs 600
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    Mosquitto,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    verdict,
)
from testkit.pool import PoolRig, StreamReport, stream_jobs
from testkit.procs import tree_cpu_s

log = logging.getLogger("bench.pool")

DEFAULT_JOBS = 3000
DEFAULT_WINDOW = 32  # under placement.upstream_max_in_flight (64) at the home gateway
WARMUP_PER_MEMBER = 20
NOISE = 0.10  # jobs per CPU-second may move this much between runs on a busy 2-core box


@dataclass
class Stream:
    members: int
    killed: bool
    jobs: int
    cpu_s: float
    report: StreamReport

    @property
    def per_cpu_s(self) -> float:
        return len(self.report.answers) / self.cpu_s if self.cpu_s > 0 else 0.0

    @property
    def per_s(self) -> float:
        elapsed = self.report.elapsed_s
        return len(self.report.answers) / elapsed if elapsed > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "killed": self.killed,
            "jobs": self.jobs,
            "answered": len(self.report.answers),
            "lost": self.report.lost,
            "errors": len(self.report.errors),
            "answered_twice_differently": self.report.answered_twice_differently,
            "wrong": self.report.wrong,
            "cpu_s": self.cpu_s,
            "jobs_per_cpu_s": self.per_cpu_s,
            "jobs_per_s": self.per_s,
            "ran_on": sorted(self.report.ran_on.values(), reverse=True),
        }


@dataclass
class Outcome:
    streams: list[Stream] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _stream(
    work: Path, module: bytes, members: int, jobs: int, window: int, *, kill: bool
) -> Stream:
    tag = f"{members}{'-kill' if kill else ''}"
    with (
        Mosquitto(work / tag) as broker,
        PoolRig(broker.address, work / tag, members, supervised=True) as rig,
    ):
        warm = stream_jobs(broker.address, rig.home.gateway_id, module, WARMUP_PER_MEMBER * members)
        if warm.lost or warm.errors:
            raise RuntimeError(f"warm-up: {warm.lost} lost, errors {warm.errors}")
        victim = rig.members[-1]
        victim_root = victim.pid
        victim_cpu_s = [0.0]  # its tree's CPU time when it was killed

        def progress(answered: int) -> None:
            if kill and answered == jobs // 3 and victim.proc is not None:
                log.info("SIGKILL member %s after %d answers", victim.gateway_id, answered)
                victim_cpu_s[0] = tree_cpu_s(victim_root)
                victim.kill()

        # This process's tree: the device, the broker, the home gateway and every member,
        # with their workers. A killed member's tree is gone from it by the end: what it had
        # used when it was killed is added back.
        before = tree_cpu_s()
        report = stream_jobs(
            broker.address, rig.home.gateway_id, module, jobs, window=window, on_progress=progress
        )
        cpu_s = tree_cpu_s() + victim_cpu_s[0] - before
    stream = Stream(members, kill, jobs, cpu_s, report)
    log.info(
        "%d member(s)%s: %d/%d answered, %.0f jobs per CPU-second, %.0f jobs/s, spread %s",
        members,
        " (one SIGKILLed)" if kill else "",
        len(report.answers),
        jobs,
        stream.per_cpu_s,
        stream.per_s,
        dict(report.ran_on),
    )
    return stream


def run(work: Path, jobs: int, window: int) -> Outcome:
    examples = ensure_examples()
    module = (examples / "wasm" / "echo.wasm").read_bytes()
    outcome = Outcome()
    for members in (1, 2, 3):
        outcome.streams.append(_stream(work, module, members, jobs, window, kill=False))
    outcome.streams.append(_stream(work, module, 3, jobs, window, kill=True))
    base = outcome.streams[0].per_cpu_s
    figures: dict[str, Any] = {"jobs": jobs, "window": window, "streams": []}
    for stream in outcome.streams:
        row = stream.row()
        row["vs_1_member"] = stream.per_cpu_s / base if base else 0.0
        figures["streams"].append(row)
    plain = [s for s in outcome.streams if not s.killed]
    figures["jobs_per_cpu_s"] = {str(s.members): s.per_cpu_s for s in plain}
    figures["efficiency_kept"] = all(s.per_cpu_s >= base * (1 - NOISE) for s in plain)
    figures["spread_over_all"] = all(
        len(s.report.ran_on) == s.members and min(s.report.ran_on.values()) > 0 for s in plain
    )
    figures["lost"] = sum(s.report.lost for s in outcome.streams)
    figures["answered_twice_differently"] = sum(
        s.report.answered_twice_differently for s in outcome.streams
    )
    outcome.figures = figures
    return outcome


def report(outcome: Outcome) -> None:
    base = outcome.streams[0].per_cpu_s
    rows = [
        [
            s.members,
            "yes" if s.killed else "no",
            f"{len(s.report.answers)}/{s.jobs}",
            s.report.lost,
            s.report.answered_twice_differently,
            " ".join(str(n) for n in sorted(s.report.ran_on.values(), reverse=True)),
            s.cpu_s,
            s.per_cpu_s,
            "-" if s.killed else f"{s.per_cpu_s / base:.2f}",
            s.per_s,
        ]
        for s in outcome.streams
    ]
    print_table(
        [
            "MEMBERS",
            "ONE KILLED",
            "ANSWERED",
            "LOST",
            "TWICE≠",
            "PER MEMBER",
            "CPU S",
            "JOBS/CPU-S",
            "VS 1",
            "JOBS/S",
        ],
        rows,
        title="A pool of cloud-tier gateways behind one Mosquitto (shared subscription)",
    )
    f = outcome.figures
    print()
    print(
        f"jobs per CPU-second kept as members are added (within {NOISE:.0%}): "
        f"{verdict(1.0 if f['efficiency_kept'] else 0.0, 1.0, at_most=False)}"
    )
    print(f"work spread over every member: {'yes' if f['spread_over_all'] else 'NO'}")
    print(
        f"lost: {f['lost']}, answered twice with different results: "
        f"{f['answered_twice_differently']} "
        f"{verdict(-(f['lost'] + f['answered_twice_differently']), 0, at_most=False)}"
    )
    print("(the killed row counts the killed member's CPU time until its death; it is not")
    print(" compared: the jobs it held run again elsewhere)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per stream")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="jobs in flight")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_and_report(lambda work: run(work, args.jobs, args.window), args.json, report)


if __name__ == "__main__":
    raise SystemExit(main())
