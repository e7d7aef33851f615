"""/metrics (docs/metrics-and-web.md): the text parses with prometheus_client's own parser, and
every counter moves when the matching thing happens in a real gateway: jobs by runner and
outcome, the three latency histograms, bytes in and out, blobs and journal size, workers busy
and restarted, tasks by state, task events and actions, frames dropped per stream, placement
decisions, refusals by code, the broker connection. Real Mosquitto, real workers; the scrapes
go to 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hearth import Dropped, JobError
from hearth.errors import ErrorCode
from hearth_gateway.metrics import Metrics, outcome_of, reason_label
from helpers import Bus, RawDevice
from testkit.examples import REPO_ROOT as ROOT
from testkit.gateway import GatewayProcess
from testkit.mosquitto import Mosquitto
from testkit.net import free_port
from testkit.wait import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def __call__(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples named ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self().items() if n == name and wanted <= ls)

    def moves_to(self, name: str, check: Callable[[float], bool], **labels: str) -> bool:
        # Gauges follow the daemon's housekeeping (every 2 s); counters move at once.
        return wait_until(lambda: check(self.value(name, **labels)), 10)


@pytest.fixture
def metered(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> Callable[..., tuple[GatewayProcess, Scraper]]:
    def make(*extra: str, policy: str = "", **kwargs: object) -> tuple[GatewayProcess, Scraper]:
        port = free_port()
        args = ["--web-listen", f"127.0.0.1:{port}", *extra]
        if policy:
            path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.toml"
            path.write_text(policy)
            args += ["--policy", str(path)]
        gw = make_gateway(*args, **kwargs)
        return gw, Scraper(port)

    return make


# -- pure logic ----------------------------------------------------------------------------------


def test_placement_reasons_lose_their_figures_as_labels() -> None:
    assert reason_label("public; 3 jobs ahead, 2/2 workers busy") == "public"
    assert reason_label("public, and this gateway is saturated (2/2 workers busy)") == (
        "public, and this gateway is saturated"
    )
    assert reason_label("private: stays on this gateway; a worker is free") == (
        "private: stays on this gateway"
    )


def test_each_daemon_has_a_registry_of_its_own() -> None:
    a, b = Metrics(), Metrics()
    a.refused("malformed")
    assert b"malformed" in a.exposition()
    assert b"malformed" not in b.exposition()


def test_outcomes_are_read_from_the_encoded_reply() -> None:
    from hearth.protocol import Error, Pong, encode

    assert outcome_of(encode(Error(code=ErrorCode.TRAP, message="x"))) == "trap"
    assert outcome_of(encode(Pong(gateway_id="g", queue_depth=0, workers=1, load=0.0))) == "ok"
    assert outcome_of(b"\xff") == "unreadable"


# -- a real gateway ------------------------------------------------------------------------------


def test_metrics_parse_and_jobs_move_their_counters(metered, wasm: dict[str, Path]) -> None:
    gw, scrape = metered()
    before = scrape()  # parses, or raises
    names = {name for name, _ in before}
    assert {"hearth_up", "hearth_workers", "hearth_broker_connected"} <= names
    assert scrape.moves_to("hearth_up", lambda v: v == 1)
    bytes_in = scrape.value("hearth_received_bytes_total")
    bytes_out = scrape.value("hearth_sent_bytes_total")
    placed = scrape.value("hearth_placement_decisions_total")
    with gw.client() as client:
        assert client.run_wasm(wasm["echo"], stdin=b"hello").stdout == b"hello"
        with pytest.raises(JobError) as trapped:
            client.run_wasm(wasm["trap"])
    assert trapped.value.code is ErrorCode.TRAP
    assert scrape.value("hearth_jobs_total", runner="wasm", outcome="ok") == 1
    assert scrape.value("hearth_jobs_total", runner="wasm", outcome="trap") == 1
    for histogram in ("queue", "run", "total"):
        assert scrape.value(f"hearth_job_{histogram}_seconds_count", runner="wasm") == 2
        assert scrape.value(f"hearth_job_{histogram}_seconds_sum", runner="wasm") > 0
    assert scrape.value("hearth_received_bytes_total") > bytes_in
    assert scrape.value("hearth_sent_bytes_total") > bytes_out
    assert scrape.value("hearth_placement_decisions_total") >= placed + 2
    assert scrape.value("hearth_placement_decisions_total", reason="private: stays on this gateway")
    # Gauges, from the daemon's housekeeping: the two modules and their journaled jobs.
    assert scrape.moves_to("hearth_blobs", lambda v: v == 2)
    assert scrape.moves_to("hearth_blob_bytes", lambda v: v > 0)
    assert scrape.moves_to("hearth_journal_bytes", lambda v: v > 0)
    assert scrape.moves_to("hearth_audit_rows", lambda v: v >= 2)  # one placement row per job
    assert scrape.value("hearth_workers") == 2


def test_refusals_are_counted_by_code(metered) -> None:
    gw, scrape = metered()
    with RawDevice(gw.listen, gw.gateway_id) as device:
        reply = device.request(b"\x93not a request")
    assert getattr(reply, "code", None) is ErrorCode.MALFORMED
    assert scrape.value("hearth_refusals_total", code="malformed") == 1


def test_busy_and_restarted_workers_are_counted(metered, wasm: dict[str, Path]) -> None:
    # spin loops forever: the wall-clock limit kills its worker, which is replaced.
    gw, scrape = metered(policy="[wasm]\nfuel = 1_000_000_000_000\nwall_timeout_s = 3.0\n")
    assert scrape.value("hearth_worker_restarts_total") == 0
    failure: list[BaseException] = []

    def spin() -> None:
        with gw.client(retries=0) as client:
            try:
                client.run_wasm(wasm["spin"])
            except JobError as exc:
                failure.append(exc)

    thread = threading.Thread(target=spin, name="spin-job")
    thread.start()
    try:
        assert scrape.moves_to("hearth_workers_busy", lambda v: v >= 1)
    finally:
        thread.join(30)
    assert failure
    assert getattr(failure[0], "code", None) is ErrorCode.TIMEOUT
    assert scrape.moves_to("hearth_worker_restarts_total", lambda v: v == 1)
    assert scrape.value("hearth_jobs_total", runner="wasm", outcome="timeout") == 1
    assert scrape.moves_to("hearth_workers_busy", lambda v: v == 0)


@pytest.fixture(scope="module")
def tasks_dir(examples: Path) -> Path:
    path = examples / "tasks"
    if not (path / "counter.wasm").exists():
        build = Path(__file__).parent.parent / "scripts" / "build_examples.py"
        subprocess.run([sys.executable, str(build)], check=True)
    return path


def test_tasks_by_state_and_their_events_and_actions(metered, broker, tasks_dir: Path) -> None:
    gw, scrape = metered()
    base = f"test/{uuid.uuid4().hex[:8]}"
    with Bus(broker.address) as bus, gw.client() as client:
        bus.subscribe(f"{base}/out")
        info = client.install_task(
            tasks_dir / "counter.wasm",
            "counter",
            on=[f"{base}/in"],
            may_publish=[f"{base}/out"],
            config={"out_topic": f"{base}/out"},
        )
        assert scrape.moves_to("hearth_tasks", lambda v: v == 1, state="running")
        bus.publish(f"{base}/in", b"x")
        bus.expect(f"{base}/out")
        assert scrape.value("hearth_task_events_total", outcome="ok") >= 1
        assert scrape.value("hearth_task_actions_total", kind="publish") >= 1
        bus.publish(f"{base}/in", b"trap")  # the counter traps on this one
        assert scrape.moves_to("hearth_task_events_total", lambda v: v == 1, outcome="failed")
        assert client.task(info.task_id, "pause").state == "paused"
        assert scrape.moves_to("hearth_tasks", lambda v: v == 1, state="paused")
        assert scrape.value("hearth_tasks", state="running") == 0
        bus.publish(f"{base}/in", b"x")  # a paused task's event is dropped, and counted
        assert scrape.moves_to("hearth_task_events_total", lambda v: v >= 1, outcome="dropped")


def test_frames_dropped_are_counted_per_stream(metered) -> None:
    gw, scrape = metered("--workers", "1")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(4)]
    jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
    with gw.client() as client:
        stream = client.stream("porch", "vision.faces")
        futures = [stream.send(jpegs[i % 4]) for i in range(40)]  # as fast as we can publish
        outcomes = [f.result(30) for f in futures]
        key = f"{client.client_id}/porch"
    dropped = sum(isinstance(o, Dropped) for o in outcomes)
    assert dropped, "a camera publishing this fast should outrun one worker"
    assert scrape.value("hearth_frames_dropped_total", stream=key) == dropped


def test_the_broker_connection_state_follows_the_broker(tmp_path: Path, make_gateway) -> None:
    own = Mosquitto(tmp_path / "own-broker").start()
    try:
        port = free_port()
        gw = make_gateway("--broker", own.url, "--web-listen", f"127.0.0.1:{port}", start=False)
        gw.listen = own.address
        gw.start()
        scrape = Scraper(port)
        assert scrape.moves_to("hearth_broker_connected", lambda v: v == 1)
        own.close()
        assert scrape.moves_to("hearth_broker_connected", lambda v: v == 0)
        assert scrape.value("hearth_up") == 1  # the gateway itself still serves
    finally:
        own.close()


def test_the_example_grafana_dashboard_names_only_metrics_we_export() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-hearth.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exported = Metrics().exposition().decode()
    names = {n for e in exprs for n in re.findall(r"\bhearth_[a-z_]+", e)}
    assert names
    for name in names:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"# TYPE {name} " in exported or f"# TYPE {family} histogram" in exported, name
