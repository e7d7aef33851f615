"""The C device client (device-sdk/c: libhearth.a, hearth.h) against a real gateway.

Built here with its own Makefile against Debian's libmosquitto-dev and libmsgpack-dev (which
scripts/bootstrap.sh installs when run as root), then driven through its example program,
``hearth-offload``, as a camera board's program would use the library: a WASM job that
uploads its module on ``need_blob``, the stored answer to the same job id sent again, error
replies (a trap, a blob under the wrong hash), a vision call, the gateway id learned from the
retained status, and mutual TLS with the files pairing gave.

Without the -dev packages the tests skip when not root (nothing can install them), and fail
otherwise: as root, and always in CI (``CI=true``), the bootstrap has installed them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest
from skimage import data as skdata

from hearth.pairing import pair
from testkit.examples import REPO_ROOT
from testkit.gateway import GatewayProcess
from testkit.net import free_port
from testkit.wait import wait_until

C_DIR = REPO_ROOT / "device-sdk" / "c"
JOB_FAILED = 125  # the example's exit code when the gateway answers `error`
RUN_S = 60
# HEARTH_C_CFLAGS="-g -fsanitize=address,undefined" runs every test below under the sanitizers.
CFLAGS = os.environ.get("HEARTH_C_CFLAGS", "-O2 -g -Werror")


def _missing_packages() -> list[str]:
    wanted = {"libmosquitto-dev": "libmosquitto", "libmsgpack-dev": "msgpack"}
    if shutil.which("pkg-config") is None or shutil.which("make") is None:
        return ["pkg-config", "make", *wanted]
    return [
        package
        for package, module in wanted.items()
        if subprocess.run(["pkg-config", "--exists", module], check=False).returncode != 0
    ]


@pytest.fixture(scope="module")
def c_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library, the example and the SHA-256 check, built with -Werror."""
    missing = _missing_packages()
    if missing:
        hint = f"apt-get install {' '.join(missing)} (scripts/bootstrap.sh does, as root)"
        if os.environ.get("CI") == "true" or os.geteuid() == 0:
            pytest.fail(f"the C client needs {hint}")
        pytest.skip(f"not root and missing: {hint}")
    build = tmp_path_factory.mktemp("c-build")
    result = subprocess.run(
        ["make", "-C", str(C_DIR), f"BUILD={build}", f"CFLAGS={CFLAGS}", "all", "check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (build / "libhearth.a").exists()
    return build


def offload(
    build: Path, gw: GatewayProcess, *args: str, stdin: bytes = b"", client: str = "cam-c"
) -> subprocess.CompletedProcess[bytes]:
    """Run ``hearth-offload`` against ``gw`` as device ``client``."""
    return subprocess.run(
        [
            str(build / "hearth-offload"),
            *("--host", gw.listen.host, "--port", str(gw.listen.port)),
            *("--client", client, "--gateway", gw.gateway_id),
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=RUN_S,
        check=False,
    )


def summary(run: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    """The ``hearth-offload: job ID key value ...`` line of its stderr, as a dict."""
    lines = [
        line for line in run.stderr.decode().splitlines() if line.startswith("hearth-offload: job")
    ]
    assert len(lines) == 1, run.stderr.decode()
    words = lines[0].removeprefix("hearth-offload: ").split()
    return dict(zip(words[0::2], words[1::2], strict=False))


def test_sha256_matches_hashlib_around_the_padding_edges(c_build: Path) -> None:
    run = subprocess.run(
        [str(c_build / "sha256-check"), "--print"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout
    expected = [hashlib.sha256(b"a" * n).hexdigest() for n in range(201)]
    assert run.stdout.split() == expected


def test_wasm_job_uploads_its_module_then_runs(
    c_build: Path, gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    run = offload(c_build, gateway, "wasm", str(wasm["echo"]), "hi", "there", stdin=b"frame")
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"framehi there\n"
    assert b"echo: done" in run.stderr
    assert summary(run)["uploaded"] == "1"  # need_blob, chunked upload, job again
    assert wait_until(lambda: gateway.snapshot().blobs == 1, timeout_s=10)
    again = offload(c_build, gateway, "wasm", str(wasm["echo"]), "--exit", "3", stdin=b"x")
    assert again.returncode == 3  # the module's own exit code
    assert again.stdout == b"x"
    assert summary(again)["uploaded"] == "0"  # content-addressed: only the hash travels


def test_the_same_job_id_again_gets_the_stored_answer(
    c_build: Path, gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    args = ("--job-id", "c-same-1", "wasm", str(wasm["mandelbrot"]), "32", "24", "40")
    first = offload(c_build, gateway, *args)
    second = offload(c_build, gateway, *args)  # a new process: a device that rebooted
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout != b""
    # The stored answer, timing included, not a second run.
    assert summary(first) == {**summary(second), "uploaded": "1"}
    assert wait_until(lambda: gateway.snapshot().jobs_duplicate >= 1, timeout_s=10)
    assert gateway.snapshot().jobs_completed == 1


def test_a_trap_is_an_error_reply_and_stored_too(
    c_build: Path, gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    for _ in range(2):
        run = offload(c_build, gateway, "--job-id", "c-trap-1", "wasm", str(wasm["trap"]))
        assert run.returncode == JOB_FAILED
        assert re.search(rb"error trap: trap: ", run.stderr), run.stderr
    assert wait_until(lambda: gateway.snapshot().jobs_duplicate >= 1, timeout_s=10)
    assert gateway.snapshot().jobs_completed == 1  # the error is the job's stored answer


def test_a_blob_under_the_wrong_hash_is_refused(
    c_build: Path, gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    wrong = "0" * 64
    run = offload(c_build, gateway, "upload", str(wasm["noop"]), wrong)
    assert run.returncode == JOB_FAILED
    assert b"error hash_mismatch" in run.stderr
    right = offload(c_build, gateway, "upload", str(wasm["noop"]))
    assert right.returncode == 0, right.stderr
    sha = hashlib.sha256(wasm["noop"].read_bytes()).hexdigest()
    assert right.stdout.decode().split()[0] == sha


def test_webassembly_text_is_refused_before_anything_is_sent(
    c_build: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    wat = tmp_path / "hello.wat"
    wat.write_text('(module (func (export "_start")))')
    run = offload(c_build, gateway, "wasm", str(wat))
    assert run.returncode == JOB_FAILED
    assert b"error invalid_module" in run.stderr
    assert b"no \\0asm header" in run.stderr  # the library's own check: no upload, no job


def test_a_vision_call_finds_the_face_in_a_photograph(
    c_build: Path, gateway: GatewayProcess, tmp_path: Path
) -> None:
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg.tobytes())
    run = offload(c_build, gateway, "call", "vision.faces", str(photo), "min_size=40")
    assert run.returncode == 0, run.stderr.decode()
    head, *boxes = run.stdout.decode().splitlines()
    assert head.startswith("vision.faces 1")
    assert "512x512" in head
    assert boxes, head
    # Eileen Collins' face in skimage's astronaut is around x 170-250, y 60-160.
    x, y, w, h = (int(v) for v in boxes[0].split()[1:5])
    assert 150 < x + w / 2 < 270
    assert 40 < y + h / 2 < 180
    assert boxes[0].endswith(" face")
    bad = offload(c_build, gateway, "call", "vision.faces", str(photo), "no_such_param=1")
    assert bad.returncode == JOB_FAILED
    assert b"error bad_params" in bad.stderr


def test_the_gateway_id_is_learned_from_its_retained_status(
    c_build: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(managed=True)  # a broker of its own: one gateway's status on it
    run = subprocess.run(
        [str(c_build / "hearth-offload"), "--port", str(gw.listen.port), "ping"],
        capture_output=True,
        text=True,
        timeout=RUN_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"{gw.gateway_id}: ")
    assert "2 workers" in run.stdout


def test_a_paired_device_offloads_over_mutual_tls(
    c_build: Path,
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    lan, pairing = free_port(), free_port()
    gw = make_gateway(
        "--lan-listen",
        f"127.0.0.1:{lan}",
        "--pairing-listen",
        f"127.0.0.1:{pairing}",
        managed=True,
    )
    state = str(gw.state_dir)
    issued = subprocess.run(
        [sys.executable, "-m", "hearth_gateway.cli", "pair", "--json", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    code = json.loads(issued.stdout)
    paired = pair(
        code["code"],
        f"127.0.0.1:{pairing}",
        ca_fingerprint=code["ca_fingerprint"],
        device_id="cam-tls",
        directory=tmp_path / "device",
        timeout_s=10,
    )
    tls = paired.tls()
    assert tls.ca_file is not None
    assert tls.cert_file is not None
    assert tls.key_file is not None
    base = [str(c_build / "hearth-offload"), "--host", "127.0.0.1", "--port", str(lan)]
    files = ["--ca", tls.ca_file, "--cert", tls.cert_file, "--key", tls.key_file]
    run = subprocess.run(
        [*base, *files, "--client", "cam-tls", "wasm", str(wasm["echo"])],
        input=b"over tls",
        capture_output=True,
        timeout=RUN_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"over tls"
    # Another id on that certificate is refused by the broker's ACL (0x87).
    other = subprocess.run(
        [*base, *files, "--client", "cam-other", "--gateway", gw.gateway_id, "ping"],
        capture_output=True,
        timeout=RUN_S,
        check=False,
    )
    assert other.returncode == JOB_FAILED, other.stderr
    assert b"error forbidden" in other.stderr


def test_a_module_larger_than_a_chunk_goes_up_in_order(
    c_build: Path,
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    policy = tmp_path / "small-chunks.toml"
    policy.write_text("[limits]\nmax_chunk_bytes = 1000\n")
    gw = make_gateway("--policy", str(policy))
    module = wasm["mandelbrot"]
    assert module.stat().st_size > 20 * 1000  # so twenty chunks and more, sent back to back
    run = offload(c_build, gw, "wasm", str(module), "16", "8", "20")
    assert run.returncode == 0, run.stderr.decode()
    assert summary(run)["uploaded"] == "1"
    assert run.stdout.startswith(b"P5\n16 8\n255\n")  # a PGM picture


def test_a_gateway_that_dies_mid_job_ends_the_wait_at_once(
    c_build: Path,
    make_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    policy = tmp_path / "long-jobs.toml"  # spin runs until the gateway dies
    policy.write_text("[wasm]\nfuel = 1_000_000_000_000_000\nwall_timeout_s = 300.0\n")
    gateway = make_gateway("--policy", str(policy))
    argv = [str(c_build / "hearth-offload"), "--host", gateway.listen.host]
    argv += ["--port", str(gateway.listen.port), "--gateway", gateway.gateway_id]
    argv += ["--client", "cam-die", "--timeout-ms", "60000", "wasm", str(wasm["spin"])]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert wait_until(lambda: gateway.snapshot().jobs_accepted >= 1, timeout_s=30)
        gateway.kill()  # SIGKILL: the broker publishes its Last Will
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10  # the Last Will, not the 60 s timeout
    assert proc.returncode == 3, stderr
    assert b"offline" in stderr
