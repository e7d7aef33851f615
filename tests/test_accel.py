"""Execution providers decided per model: the pure parts here, then a real gateway running on
onnxruntime-openvino, installed from the package registry into a virtualenv of its own (the
OpenVINO build replaces ``import onnxruntime``, so it cannot share ours).

That virtualenv is made by ``scripts/accel_venv.sh`` (what ``make openvino`` runs) and kept under
build/ keyed by the files that decide its contents, so a rerun takes no time. Without the
registry these tests skip, except in CI (``CI=true``), where they must run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import hearth
from hearth.errors import ErrorCode, JobError
from hearth.runtime.onnx import OnnxRuntime
from hearth_gateway.accelerators import ChoiceCache, Decision, outputs_disagree, provider_options
from hearth_gateway.runners import accelerated
from hearth_gateway.status import format_status
from hearth_gateway.vision.plate import (
    DET_MODEL,
    REC_MODEL,
    PlateParams,
    PlateReader,
    default_models_dir,
)
from testkit.gateway import GatewayProcess
from testkit.plates_synth import random_plate_text, render_plate
from testkit.wait import wait_until

ROOT = Path(__file__).resolve().parents[1]
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
_VENV_INPUTS = ("constraints.txt", "constraints-openvino.txt", "scripts/accel_venv.sh")
# A model's first job carries its trial: an OpenVINO compile and a dozen timed runs, which on
# this 2-core VM under other work takes longer than the client's usual 20 s.
_FIRST_JOB_S = 120.0


# -- the pure parts -------------------------------------------------------------------------------


def test_outputs_agree_within_float_noise_and_not_beyond() -> None:
    rng = np.random.default_rng(3)
    cpu = [rng.random((2, 5), dtype=np.float32), np.array([1, 2], np.int64)]
    assert outputs_disagree(cpu, [cpu[0] + 1e-5, cpu[1].copy()]) is None
    assert "differs" in str(outputs_disagree(cpu, [cpu[0] + 0.2, cpu[1]]))
    assert "differs" in str(outputs_disagree(cpu, [cpu[0] * np.nan, cpu[1]]))
    assert "differs" in str(outputs_disagree(cpu, [cpu[0], np.array([1, 3], np.int64)]))
    assert "shape" in str(outputs_disagree(cpu, [cpu[0][:1], cpu[1]]))
    # A classifier's ZipMap output (a list of dicts) is not compared.
    assert outputs_disagree([[{0: 0.5}]], [[{0: 0.7}]]) is None


def test_an_accelerator_is_kept_when_faster_or_tied_and_the_cpu_otherwise() -> None:
    fastest = accelerated._fastest
    assert fastest({CPU: 10.0, OPENVINO: 6.0}) == OPENVINO
    assert fastest({CPU: 10.0, OPENVINO: 10.9}) == OPENVINO  # a tie: within TIE of the CPU
    assert fastest({CPU: 10.0, OPENVINO: 11.5}) == CPU
    assert fastest({CPU: 10.0}) == CPU
    assert fastest({OPENVINO: 3.0}) == OPENVINO  # the CPU provider failed its run


def test_decisions_are_retried_after_the_provider_package_changes(tmp_path: Path) -> None:
    old = ChoiceCache(tmp_path, "onnxruntime-openvino 1.23.0", {})
    old.put("ab" * 32, Decision(provider=OPENVINO, package=old.package))
    assert old.choices() == {"ab" * 32: OPENVINO}
    assert ChoiceCache(tmp_path, "onnxruntime-openvino 1.24.1", {}).get("ab" * 32) is None
    other_device = ChoiceCache(tmp_path, old.package, {OPENVINO: {"device_type": "GPU"}})
    assert other_device.get("ab" * 32) is None


def test_an_attempt_whose_process_died_reads_as_a_crash(tmp_path: Path) -> None:
    cache = ChoiceCache(tmp_path, "onnxruntime-openvino 1.24.1", {})
    sha = "cd" * 32
    with cache.attempt(sha, OPENVINO):  # a live attempt (ours) is no crash
        assert cache.crashed(sha) == {}
    assert cache.crashed(sha) == {}  # and it leaves nothing behind
    (cache.root / f"{sha}.{OPENVINO}.trying").write_text(str(_dead_pid()))
    assert "died" in cache.crashed(sha)[OPENVINO]
    assert cache.crashed(sha) == {}  # consumed


def test_provider_device_comes_from_the_environment() -> None:
    assert provider_options({"HEARTH_OPENVINO_DEVICE": "GPU"}) == {OPENVINO: {"device_type": "GPU"}}
    assert provider_options({}) == {}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- a gateway on onnxruntime-openvino ----------------------------------------------------------


@pytest.fixture(scope="session")
def openvino_python() -> str:
    """The python of a virtualenv with onnxruntime-openvino (made once, cached under build/)."""
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in _VENV_INPUTS)).hexdigest()
    venv = ROOT / "build" / f"venv-openvino-{digest[:12]}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        made = subprocess.run(
            ["sh", "scripts/accel_venv.sh", str(venv), "onnxruntime-openvino", _VENV_INPUTS[1]],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if made.returncode != 0:
            if os.environ.get("CI") != "true" and re.search(
                r"(?i)network|resolve|connection|no matching distribution", made.stderr
            ):
                pytest.skip(f"onnxruntime-openvino not installable here: {made.stderr[-300:]}")
            pytest.fail(f"scripts/accel_venv.sh failed:\n{made.stdout}\n{made.stderr}")
        (venv / ".ready").touch()
    return str(python)


@pytest.fixture
def make_ov_gateway(
    tmp_path: Path, broker: object, openvino_python: str
) -> Iterator[Callable[..., GatewayProcess]]:
    made: list[GatewayProcess] = []

    def make(*extra: str, work: Path | None = None) -> GatewayProcess:
        listen = broker.address  # type: ignore[attr-defined]
        gw = GatewayProcess(
            listen,
            work or tmp_path / f"ov{len(made)}",
            workers=1,  # one worker: every job meets the same decisions in memory
            extra_args=extra,
            supervised=False,
            python=openvino_python,
        )
        made.append(gw)
        return gw.start(timeout_s=120.0)

    yield make
    for gw in made:
        gw.close(grace_s=0)


@pytest.fixture(scope="module")
def cpu_reader() -> Iterator[PlateReader]:
    if default_models_dir() is None:
        pytest.skip("the rapidocr-onnxruntime wheel (PP-OCRv4 models) is not installed")
    runtime = OnnxRuntime(providers=[CPU])
    yield PlateReader(runtime)
    runtime.close()


def _decisions(gw: GatewayProcess) -> dict[str, Decision]:
    import msgspec

    return {
        p.stem: msgspec.json.decode(p.read_bytes(), type=Decision)
        for p in (gw.state_dir / "cache" / "providers").glob("*/*.json")
    }


@pytest.mark.slow
def test_openvino_gateway_runs_plates_there_and_digits_on_the_cpu(
    make_ov_gateway: Callable[..., GatewayProcess],
    cpu_reader: PlateReader,
    examples: Path,
    wasm: dict[str, Path],
) -> None:
    gw = make_ov_gateway("--mdns-interface", "127.0.0.1")
    rng = np.random.default_rng(15)
    import cv2

    # Camera-sized frames (640x960, the detector's input as is): on the synthetic 320x480
    # scenes the two providers run the detector within a few per cent of each other, and the
    # trial rightly takes either; on a frame this size OpenVINO is clearly faster (0.5-0.7x).
    scenes = [
        cv2.resize(render_plate(random_plate_text(rng), rng), None, fx=2, fy=2) for _ in range(6)
    ]

    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        replies = []
        for scene in scenes:
            jpeg = cv2.imencode(".png", scene)[1].tobytes()
            run = client.plate(jpeg)
            # The detector, most of a plate's work, on OpenVINO: it agreed with the CPU
            # provider in its trial and beat it clearly (0.5-0.75x here, docs/accelerators.md).
            # The reply names the detector's provider first, then the recogniser's if other.
            assert run.provider.split(",")[0] == OPENVINO, run.provider
            assert run.result.text == cpu_reader.read(scene, PlateParams()).text
            replies.append(run.provider)

        # wasi-nn meets the same decision as an ONNX job: the WebAssembly module loads the
        # digits model first, so it is wasi-nn that finds OpenVINO refusing it.
        model = (examples / "models" / "digits.onnx").read_bytes()
        x = np.load(examples / "models" / "digits_test_X.npy")
        y = np.load(examples / "models" / "digits_test_y.npy")
        if "nn_digits" in wasm:
            stdin = len(model).to_bytes(4, "little") + model + x[:8].astype(np.uint8).tobytes()
            out = client.run_wasm(wasm["nn_digits"], stdin=stdin)
            assert out.exit_code == 0, out.stderr
        result = client.infer(examples / "models" / "digits.onnx", {"input": x})
    assert result.provider == CPU
    accuracy = float(np.mean(result.outputs["label"] == y))
    assert accuracy >= 0.95, accuracy

    digits = hashlib.sha256(model).hexdigest()
    decisions = _decisions(gw)
    assert decisions[digits].provider == CPU
    assert "dynamic rank" in decisions[digits].refused[OPENVINO]
    assert len(decisions) == 3
    folder = default_models_dir()
    assert folder is not None  # cpu_reader skips the test otherwise
    det, rec = decisions[_sha(folder / DET_MODEL)], decisions[_sha(folder / REC_MODEL)]
    # Both agreed with the CPU provider; the detector is kept for being measured faster.
    assert det.refused == rec.refused == {}
    assert det.provider == OPENVINO, det
    assert det.p50_ms[OPENVINO] < det.p50_ms[CPU], det
    # The recogniser, on a strip or two per plate, runs about as fast on both providers: its
    # trial's own figures decide, by the rule (a tie within 10 % keeps OpenVINO), and every
    # reply named what was decided.
    assert rec.provider == accelerated._fastest(rec.p50_ms), rec
    named = OPENVINO if rec.provider == OPENVINO else f"{OPENVINO},{rec.provider}"
    assert replies == [named] * len(scenes)

    # Status and mDNS say so.
    assert wait_until(lambda: digits in gw.snapshot().models, 10.0)
    snap = gw.snapshot()
    assert snap.providers == [OPENVINO, CPU]
    assert snap.models[digits] == CPU
    assert snap.models[_sha(folder / DET_MODEL)] == OPENVINO
    assert "OpenVINO" in format_status(snap)
    found = [
        g for g in hearth.discover(3.0, interface="127.0.0.1") if g.gateway_id == gw.gateway_id
    ]
    assert found
    assert found[0].accelerators == ["openvino", "cpu"]


@pytest.mark.slow
def test_an_openvino_device_that_is_not_there_leaves_the_cpu(
    make_ov_gateway: Callable[..., GatewayProcess],
    cpu_reader: PlateReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As if the iGPU vanished: the provider is installed, its device is not."""
    monkeypatch.setenv("HEARTH_OPENVINO_DEVICE", "NPU")
    gw = make_ov_gateway()
    rng = np.random.default_rng(16)
    scene = render_plate(random_plate_text(rng), rng)
    import cv2

    jpeg = cv2.imencode(".png", scene)[1].tobytes()
    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        first = client.plate(jpeg)
        second = client.plate(jpeg)
    assert first.provider == second.provider == CPU
    assert first.result.text == cpu_reader.read(scene, PlateParams()).text
    for decision in _decisions(gw).values():
        assert decision.provider == CPU
        assert "not active" in decision.refused[OPENVINO]
    assert gw.proc is not None
    assert gw.proc.poll() is None


@pytest.mark.slow
def test_a_provider_that_killed_a_worker_is_not_used_for_that_model_again(
    make_ov_gateway: Callable[..., GatewayProcess], cpu_reader: PlateReader, tmp_path: Path
) -> None:
    """A crash in native code mid-run leaves the attempt's marker with a dead pid: the next
    worker reads it, drops the provider for that model and runs it on the CPU provider."""
    rng = np.random.default_rng(17)
    scene = render_plate(random_plate_text(rng), rng)
    import cv2

    jpeg = cv2.imencode(".png", scene)[1].tobytes()
    folder = default_models_dir()
    assert folder is not None  # cpu_reader skips the test otherwise
    work = tmp_path / "crash"
    gw = make_ov_gateway(work=work)
    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        client.plate(jpeg)  # the trials decide both models
    gw.close()
    (detector,) = (gw.state_dir / "cache" / "providers").glob(f"*/{_sha(folder / DET_MODEL)}.json")
    # The detector decided for OpenVINO. On a box where the two providers come out near even
    # the trial may pick the CPU; the decision on record is this test's input, so it is set.
    decision = json.loads(detector.read_text())
    if decision["provider"] != OPENVINO:
        detector.write_text(json.dumps(decision | {"provider": OPENVINO}))
    # What a worker that segfaulted inside the OpenVINO provider leaves behind.
    detector.with_name(f"{detector.stem}.{OPENVINO}.trying").write_text(str(_dead_pid()))
    gw = make_ov_gateway(work=work)
    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        run = client.plate(jpeg)
    assert CPU in run.provider.split(",")
    assert run.result.text == cpu_reader.read(scene, PlateParams()).text
    decision = _decisions(gw)[detector.stem]
    assert decision.provider == CPU
    assert "died" in decision.refused[OPENVINO]


@pytest.mark.slow
def test_a_provider_that_crashes_the_worker_mid_run_costs_only_that_job(
    make_ov_gateway: Callable[..., GatewayProcess], cpu_reader: PlateReader
) -> None:
    """A worker that dies in the middle of a run on OpenVINO, as a fault in the provider's
    native code would kill it: SIGKILL while it runs the detector there (a SIGSEGV sent from
    outside does not do: the worker runs on after it, a handler in the OpenVINO runtime takes
    it). That job is answered ``worker_crashed``, the worker is replaced, the daemon stays up,
    and the next job runs the detector on the CPU provider, OpenVINO dropped for it."""
    rng = np.random.default_rng(19)
    import cv2

    scene = cv2.resize(render_plate(random_plate_text(rng), rng), None, fx=2, fy=2)
    jpeg = cv2.imencode(".png", scene)[1].tobytes()
    folder = default_models_dir()
    assert folder is not None  # cpu_reader skips the test otherwise
    det = _sha(folder / DET_MODEL)
    gw = make_ov_gateway()
    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        assert client.plate(jpeg).provider.split(",")[0] == OPENVINO  # its trial decided so
        (marker,) = [
            p.with_name(f"{det}.{OPENVINO}.trying")
            for p in (gw.state_dir / "cache" / "providers").glob(f"*/{det}.json")
        ]
        crashed: list[int] = []

        def crash_mid_run() -> None:
            # The marker is there only while the detector runs on OpenVINO.
            def running() -> bool:
                try:
                    crashed.append(int(marker.read_text()))
                except (OSError, ValueError):
                    return False
                return True

            if wait_until(running, _FIRST_JOB_S, step_s=0.001):
                os.kill(crashed[-1], signal.SIGKILL)

        killer = threading.Thread(target=crash_mid_run)
        killer.start()
        with pytest.raises(JobError) as failed:
            client.plate(jpeg)
        killer.join()
        assert crashed
        assert failed.value.code == ErrorCode.WORKER_CRASHED

        run = client.plate(jpeg)  # a fresh worker: it finds the marker the dead one left
    assert run.provider.split(",")[0] == CPU, run.provider
    assert run.result.text == cpu_reader.read(scene, PlateParams()).text
    decision = _decisions(gw)[det]
    assert decision.provider == CPU
    assert "died" in decision.refused[OPENVINO]
    assert gw.proc is not None
    assert gw.proc.poll() is None  # the daemon stayed up
    # Replaced: a live worker, not the one killed (the snapshot is rewritten every 2 s).
    assert wait_until(lambda: (pids := gw.snapshot().worker_pids) and crashed[-1] not in pids, 10.0)
    assert len(gw.snapshot().worker_pids) == 1
    assert "died (exit status -9) running job" in gw.log()


_FRESH_SESSIONS = """
import sys, numpy as np
from hearth.runtime.onnx import OnnxRuntime
from hearth_gateway.vision.plate import REC_MODEL, default_models_dir
rec = default_models_dir() / REC_MODEL
x = np.random.default_rng(0).random((4, 3, 48, 320), np.float32)
for _ in range(int(sys.argv[1])):
    rt = OnnxRuntime(providers=["OpenVINOExecutionProvider"], intra_op_threads=1)
    out, provider = rt.run_arrays("0" * 64, {"x": x}, path=rec)
    print(provider, int(np.isnan(out[0]).sum()), flush=True)
    rt.close()
"""


@pytest.mark.slow
def test_openvino_sessions_of_the_recogniser_never_answer_nan(openvino_python: str) -> None:
    """The SDK warms every session up on zeros with free dimensions as 1; OpenVINO refuses that
    for PP-OCRv4's recogniser, and a session that failed a run answers all-NaN from then on in
    about one case in three (onnxruntime-openvino 1.24.1). Such a session must not be kept:
    ten fresh ones all answer a real input (a regression passes this with odds of 1.7 %)."""
    folder = default_models_dir()
    if folder is None:
        pytest.skip("the rapidocr-onnxruntime wheel (PP-OCRv4 models) is not installed")
    rec = folder / REC_MODEL
    done = subprocess.run(
        [openvino_python, "-c", _FRESH_SESSIONS.replace('"0" * 64', repr(_sha(rec))), "10"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=_ov_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")[:-1]
    assert lines == [f"{OPENVINO} 0"] * 10, done.stdout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ov_env() -> dict[str, str]:
    """The environment for the OpenVINO venv's python: this checkout's sources first."""
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'device-sdk' / 'src'}:{ROOT / 'gateway' / 'src'}"}


@pytest.mark.slow
@pytest.mark.xfail(
    reason="the recogniser is a near tie here (OpenVINO/CPU 0.71-1.28 over 8 runs): under load "
    "its trial may keep the CPU provider, and then OpenVINO never runs to fail (issue 15)",
    strict=False,
)
def test_a_provider_that_fails_mid_run_hands_the_job_to_the_cpu(
    make_ov_gateway: Callable[..., GatewayProcess],
) -> None:
    """OpenVINO loads PP-OCRv4's recogniser and runs it, but refuses, at run time, a strip one
    pixel high (its pooling window is larger than the image; the CPU provider pads). That job
    runs on the CPU provider, OpenVINO is dropped for the model, and the daemon stays up."""
    folder = default_models_dir()
    if folder is None:
        pytest.skip("the rapidocr-onnxruntime wheel (PP-OCRv4 models) is not installed")
    rec = folder / REC_MODEL
    rng = np.random.default_rng(18)
    strips = {"x": rng.random((4, 3, 48, 320), np.float32)}
    thin = {"x": rng.random((1, 3, 1, 8), np.float32)}
    local = OnnxRuntime(providers=[CPU])
    sha = hashlib.sha256(rec.read_bytes()).hexdigest()
    want = local.run_arrays(sha, strips, path=rec)[0][0]
    want_thin = local.run_arrays(sha, thin, path=rec)[0][0]
    local.close()

    gw = make_ov_gateway()
    with gw.client(timeout_s=_FIRST_JOB_S) as client:
        first = client.infer(rec, strips)
        assert first.provider == OPENVINO  # its trial: it agrees with the CPU and is faster
        assert _decisions(gw)[sha].provider == OPENVINO
        pid = gw.proc.pid if gw.proc is not None else None

        failed_there = client.infer(rec, thin)
        assert failed_there.provider == CPU
        (got,) = failed_there.outputs.values()
        np.testing.assert_allclose(got, want_thin, rtol=1e-4, atol=1e-5)
        decision = _decisions(gw)[sha]
        assert decision.provider == CPU
        assert "failed at run time" in decision.refused[OPENVINO]

        after = client.infer(rec, strips)  # the next job goes straight to the CPU provider
    assert after.provider == CPU
    (got,) = after.outputs.values()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert gw.proc is not None
    assert gw.proc.poll() is None
    assert gw.proc.pid == pid
    assert wait_until(lambda: gw.snapshot().models.get(sha) == CPU, 10.0)


def test_doctor_on_the_openvino_build_lists_its_devices(
    openvino_python: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [openvino_python, "-m", "hearth_gateway.cli", "doctor", "--json", "--state-dir", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_ov_env(),
    )
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    detail = checks["accelerators"]["detail"]
    assert "onnxruntime-openvino 1.24.1 runs openvino, cpu" in detail
    assert "OpenVINO devices: CPU" in detail
    if not Path("/dev/dri").exists():  # this VM: no iGPU for OpenVINO to use
        assert checks["accelerators"]["status"] == "ok"
        assert "no GPU or NPU found: models run on the CPU" in detail
