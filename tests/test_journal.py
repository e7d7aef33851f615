"""The journal through a running gateway: large answers are not kept (the job id sent again runs
again and gets its answer), a large stdin stays journaled until its job is answered (a SIGKILL
loses nothing), and `hearth-gateway status` shows the journal's size."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import GatewayProcess, wait_until
from hearth.protocol import BlobStored, WasmJob, WasmResult
from helpers import RawDevice

KiB = 1024
MiB = 1024 * KiB


def _upload(dev: RawDevice, module: Path) -> str:
    data = module.read_bytes()
    assert isinstance(dev.upload(data), BlobStored)
    return hashlib.sha256(data).hexdigest()


def test_a_large_answer_is_not_kept_and_its_job_id_sent_again_runs_again(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    stdin = os.urandom(256 * KiB)  # echo answers with it: over journal_inline_bytes (64 KiB)
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        job = WasmJob(job_id="large", module=_upload(dev, wasm["echo"]), stdin=stdin)
        first = dev.request(job)
        second = dev.request(job)
    assert isinstance(first, WasmResult)
    assert isinstance(second, WasmResult)
    assert first.stdout == second.stdout == stdin
    assert wait_until(lambda: gateway.snapshot().jobs_completed == 2, timeout_s=10)  # ran twice
    snapshot = gateway.snapshot()
    assert snapshot.jobs_duplicate == 0
    assert snapshot.journal is not None
    assert (snapshot.journal.answers, snapshot.journal.unkept) == (0, 2)
    assert snapshot.journal.journal_bytes == 0  # neither the stdin nor the answer is kept


def test_a_large_stdin_stays_journaled_until_answered_across_a_sigkill(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    policy = tmp_path / "slow.toml"  # spin holds the one worker for 6 s, then times out
    policy.write_text("[wasm]\nfuel = 100_000_000_000\nwall_timeout_s = 6.0\n")
    gateway = make_gateway("--workers", "1", "--policy", str(policy))
    stdin = os.urandom(MiB)
    with RawDevice(gateway.listen, gateway.gateway_id) as dev:
        spin = _upload(dev, wasm["spin"])
        echo = _upload(dev, wasm["echo"])
        dev.send(WasmJob(job_id="spin", module=spin))
        correlation = dev.send(WasmJob(job_id="big-stdin", module=echo, stdin=stdin))
        assert wait_until(lambda: _waiting(gateway) == 2, timeout_s=5)  # the echo job waits
        journal = gateway.snapshot().journal
        assert journal is not None
        assert journal.journal_bytes > MiB  # its stdin is in the journal
        gateway.kill()
        gateway.start()  # same state dir: the journal is read back and the jobs run again
        reply = dev.reply(correlation, timeout_s=60)
    assert isinstance(reply, WasmResult)
    assert reply.stdout == stdin
    assert wait_until(lambda: _waiting(gateway) == 0, timeout_s=30)
    journal = gateway.snapshot().journal
    assert journal is not None
    assert journal.journal_bytes < 16 * KiB  # answered: the stdin is gone


def _waiting(gateway: GatewayProcess) -> int:
    journal = gateway.snapshot().journal
    return -1 if journal is None else journal.waiting


def test_status_shows_the_journal_and_the_audit_table(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    with gateway.client() as client:
        assert client.run_wasm(wasm["echo"], stdin=b"hi").stdout == b"hi"
    assert wait_until(lambda: gateway.snapshot().jobs_completed == 1, timeout_s=10)

    def status(*flags: str) -> str:
        argv = [sys.executable, "-m", "hearth_gateway.cli", "status", *flags]
        return subprocess.run(
            [*argv, "--state-dir", str(gateway.state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    shown = json.loads(status("--json"))
    assert shown["journal"]["answers"] == 1
    assert shown["journal"]["journal_bytes_limit"] == 256 * MiB
    assert shown["journal"]["audit_rows"] >= 1  # the job's placement decision
    text = status()
    assert "journal     " in text
    assert "of 268.4 MB: 0 jobs waiting, 1 answers kept" in text
    assert "audit       " in text
    assert "recycled" in text
