"""A full disk: the gateway answers storage_full at once (uploads and jobs), stays up, loses no
job it accepted, says so once in its log (no traceback), and takes work again by itself when
space returns. The state directory is a small tmpfs, filled by a file of ours (root)."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from hearth.errors import ErrorCode, JobError
from hearth.protocol import BlobChunk, Error, WasmJob
from hearth_gateway.doctor import check_storage
from helpers import RawDevice
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

pytestmark = pytest.mark.root

TMPFS_BYTES = 64 * 1024 * 1024
POLICY = "[limits]\nstorage_reserve_percent = 2.0\nstorage_reserve_bytes = 1_048_576\n"


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def small_disk(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> Iterator[GatewayProcess]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    policy = tmp_path / "reserve.toml"
    policy.write_text(POLICY)
    gw = make_gateway("--policy", str(policy), start=False)
    try:
        _mount_tmpfs(gw.state_dir)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield gw.start()
    finally:
        gw.close(grace_s=5)
        subprocess.run(["umount", "-l", str(gw.state_dir)], check=False, capture_output=True)


def _fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC (whole MiBs, then the last pages);
    returns it."""
    filler = directory / "filler"
    for mode, block in (("wb", 1 << 20), ("ab", 4096)):
        with filler.open(mode, buffering=0) as f, pytest.raises(OSError) as full:
            _write_until_full(f, b"\0" * block)
        assert full.value.errno == errno.ENOSPC
    return filler


def _write_until_full(f: BinaryIO, block: bytes) -> None:
    while True:
        f.write(block)


def _outcome(future: concurrent.futures.Future[bytes]) -> bytes | ErrorCode:
    """A job's output, or the code it was refused with."""
    try:
        return future.result(timeout=30)
    except JobError as exc:
        return exc.code


def _echo(client: object, wasm: dict[str, Path], stdin: bytes) -> bytes:
    run = client.run_wasm(wasm["echo"], stdin=stdin)  # type: ignore[attr-defined]
    return bytes(run.stdout)


def _echo_back(client: object, wasm: dict[str, Path]) -> concurrent.futures.Future[bytes]:
    future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
    try:
        future.set_result(_echo(client, wasm, b"back"))
    except JobError as exc:
        future.set_exception(exc)
    return future


def test_a_full_disk_is_answered_storage_full_at_once_and_recovers(
    small_disk: GatewayProcess, wasm: dict[str, Path], examples: Path
) -> None:
    gw = small_disk
    echo = wasm["echo"].read_bytes()
    sha = hashlib.sha256(echo).hexdigest()
    with gw.client(timeout_s=10) as client:
        assert _echo(client, wasm, b"warm") == b"warm"  # uploaded and compiled while there is room

        # Jobs in flight while the disk fills: each is answered or refused, none is lost.
        pool = concurrent.futures.ThreadPoolExecutor(4)
        payload = os.urandom(100_000)  # over journal_inline_bytes: journaled as a file
        futures = [pool.submit(_echo, client, wasm, payload + str(i).encode()) for i in range(40)]
        filler = _fill(gw.state_dir)
        outcomes = [_outcome(future) for future in futures]
        pool.shutdown()
        answered = sum(out == payload + str(i).encode() for i, out in enumerate(outcomes))
        refused = outcomes.count(ErrorCode.STORAGE_FULL)
        assert answered + refused == len(futures), outcomes
        print(f"\nwhile filling: {answered} jobs answered, {refused} refused storage_full, 0 lost")

        # Full: once the gateway has looked (its free-space figure is at most a second old, and
        # its housekeeping looks every 2 s), a job and an upload hear storage_full in under 2 s.
        # A job in that second may still run: it is answered, not lost (checked above).
        assert wait_until(lambda: gw.snapshot().storage_full, timeout_s=10)
        began = time.monotonic()
        with pytest.raises(JobError) as refusal:
            _echo(client, wasm, b"full")
        job_s = time.monotonic() - began
        assert refusal.value.code is ErrorCode.STORAGE_FULL
        assert refusal.value.code.retryable
        with RawDevice(gw.listen, gw.gateway_id) as raw:
            began = time.monotonic()
            new = os.urandom(3 << 20)
            reply = raw.upload(new, chunk=1 << 20)
            upload_s = time.monotonic() - began
            assert isinstance(reply, Error)
            assert reply.code is ErrorCode.STORAGE_FULL, reply
            # A job naming a stored module is refused too, without a need_blob first.
            job = WasmJob(job_id="raw-full-1", module=sha, stdin=b"x")
            reply = raw.request(job, timeout_s=5)
            assert isinstance(reply, Error)
            assert reply.code is ErrorCode.STORAGE_FULL
        # A task install too, and doctor says why.
        with pytest.raises(JobError) as install:
            client.install_task(examples / "tasks" / "counter.wasm", "full", on=["test/full/in"])
        assert install.value.code is ErrorCode.STORAGE_FULL
        verdict = check_storage(gw.state_dir, gw.snapshot())
        assert verdict.status == "fail"
        assert "storage_full" in verdict.detail
        print(f"storage_full: job in {job_s * 1e3:.0f} ms, 3 MB upload in {upload_s * 1e3:.0f} ms")
        assert job_s < 2.0
        assert upload_s < 2.0

        # The daemon stays up and says so: status, and once in its log however long it lasts.
        time.sleep(5)  # two and more housekeeping rounds while full
        assert gw.proc is not None
        assert gw.proc.poll() is None
        assert wait_until(lambda: gw.snapshot().storage_full, timeout_s=5)
        status = subprocess.run(
            [sys.executable, "-m", "hearth_gateway.cli", "status", "--state-dir", gw.state_dir],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "storage     FULL" in status.stdout, status.stdout + status.stderr

        # Space returns: the next job runs, without a restart.
        filler.unlink()
        began = time.monotonic()
        while (out := _outcome(_echo_back(client, wasm))) == ErrorCode.STORAGE_FULL:
            assert time.monotonic() - began < 10, "no recovery within 10 s"
            time.sleep(0.2)
        assert out == b"back"
        print(f"recovered {time.monotonic() - began:.1f} s after space returned")
        assert not gw.snapshot().storage_full or wait_until(
            lambda: not gw.snapshot().storage_full, timeout_s=5
        )
    log = gw.log()
    assert "Traceback" not in log, log
    assert log.count("storage full in") == 1, log
    assert log.count("storage space is back") == 1, log


def test_chunks_after_a_refusal_for_space_hear_storage_full_not_blob_incomplete(
    small_disk: GatewayProcess,
) -> None:
    gw = small_disk
    data = os.urandom(2 << 20)
    sha = hashlib.sha256(data).hexdigest()
    filler = _fill(gw.state_dir)
    try:
        with RawDevice(gw.listen, gw.gateway_id) as raw:
            first = raw.send(BlobChunk(sha256=sha, size=len(data), offset=0, data=data[: 1 << 20]))
            assert isinstance(reply := raw.reply(first, timeout_s=5), Error)
            assert reply.code is ErrorCode.STORAGE_FULL
            rest = raw.send(
                BlobChunk(sha256=sha, size=len(data), offset=1 << 20, data=data[1 << 20 :])
            )
            assert isinstance(reply := raw.reply(rest, timeout_s=5), Error)
            assert reply.code is ErrorCode.STORAGE_FULL
    finally:
        filler.unlink()
