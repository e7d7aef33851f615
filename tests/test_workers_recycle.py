"""Workers that give memory back: a worker past ``workers.max_rss_bytes`` or ``workers.max_jobs``
is replaced between two jobs, never during one, and no job fails for it; a worker holding an
odometry session is kept until the session closes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from skimage import data as skdata

from conftest import GatewayProcess, wait_until
from testkit.scenes import render_sequence

MiB = 1024 * 1024


def _gateway(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, workers: str, *extra: str
) -> GatewayProcess:
    policy = tmp_path / "recycle.toml"
    policy.write_text("[workers]\n" + "\n".join(workers.split(";")) + "\n")
    return make_gateway("--workers", "1", "--policy", str(policy), *extra)  # type: ignore[no-any-return]


def test_a_worker_past_its_rss_limit_is_replaced_between_jobs_and_no_job_fails(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    # A fresh worker is resident at about 90 MiB; reading a plate loads the OCR models and
    # takes it to about 200 MiB, which it would keep.
    gateway = _gateway(make_gateway, tmp_path, f"max_rss_bytes = {160 * MiB}")
    first = gateway.snapshot()
    [rss_before] = first.worker_rss_bytes
    assert rss_before < 160 * MiB
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    with gateway.client(timeout_s=120.0) as client, ThreadPoolExecutor(6) as pool:
        # Queued together on the one worker: each plate job leaves it over the limit, so it is
        # replaced before the next job, which waits for the fresh one.
        plates = [pool.submit(client.plate, jpeg) for _ in range(3)]
        echoes = [pool.submit(client.run_wasm, wasm["echo"], b"%d" % i) for i in range(3)]
        assert all(p.result().result.width == 512 for p in plates)  # read, no plate in it
        assert [e.result().stdout for e in echoes] == [b"0", b"1", b"2"]
    assert wait_until(lambda: gateway.snapshot().jobs_completed == 6, timeout_s=10)
    last = gateway.snapshot()
    assert last.workers_recycled == 3
    assert last.worker_restarts == 0  # nothing crashed or was killed
    assert last.worker_pids != first.worker_pids
    [rss_after] = last.worker_rss_bytes
    assert rss_after < 160 * MiB
    assert "died" not in gateway.log()


def test_a_worker_is_recycled_after_max_jobs(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    gateway = _gateway(make_gateway, tmp_path, "max_jobs = 2")
    pids = [gateway.snapshot().worker_pids]
    with gateway.client() as client:
        for i in range(5):
            assert client.run_wasm(wasm["echo"], stdin=b"%d" % i).stdout == b"%d" % i
    assert wait_until(lambda: gateway.snapshot().workers_recycled == 2, timeout_s=10)
    pids.append(gateway.snapshot().worker_pids)
    assert pids[0] != pids[1]
    assert gateway.snapshot().worker_restarts == 0


def test_a_worker_holding_a_session_is_kept_until_the_session_closes(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = _gateway(make_gateway, tmp_path, "max_jobs = 1")
    seq = render_sequence(5, width=320, height=240, seed=3)
    fx, fy, cx, cy = seq.K[0, 0], seq.K[1, 1], seq.K[0, 2], seq.K[1, 2]
    with gateway.client() as client:
        session = client.odometry("hall", fx=fx, fy=fy, cx=cx, cy=cy)
        poses = [session.track(frame).result for frame in seq.frames]
        assert [p.frame for p in poses] == [1, 2, 3, 4, 5]  # its map survived every frame
        assert gateway.snapshot().workers_recycled == 0
        assert session.close() == 5
    assert wait_until(lambda: gateway.snapshot().workers_recycled == 1, timeout_s=10)
