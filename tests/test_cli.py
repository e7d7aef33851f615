"""The `hearth` command line, as a person would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _hearth(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_run_offloads_like_wasmtime_run(gateway, wasm) -> None:
    result = _hearth(
        "run",
        "--gateway",
        gateway.address,
        "--where",
        "edge",
        "--explain",
        str(wasm["echo"]),
        "--exit",
        "4",
        "hello",
        stdin=b"frame bytes",
    )
    assert result.returncode == 4
    assert result.stdout == b"frame byteshello\n"
    assert f"ran on edge ({gateway.gateway_id})".encode() in result.stderr


def test_run_falls_back_to_the_device_without_a_gateway(wasm) -> None:
    result = _hearth(
        "run", "--explain", str(wasm["echo"]), stdin=b"x", env={"HEARTH_GATEWAY": "127.0.0.1:1"}
    )
    assert result.returncode == 0
    assert result.stdout == b"x"
    assert b"ran on local" in result.stderr
    assert b"no gateway reachable" in result.stderr


def test_failed_job_exits_125_with_the_code(gateway, wasm) -> None:
    result = _hearth("run", "--gateway", gateway.address, "--where", "edge", str(wasm["trap"]))
    assert result.returncode == 125
    assert b"trap" in result.stderr


def test_infer_writes_npy_outputs(gateway, examples, tmp_path: Path) -> None:
    x = np.load(examples / "models" / "digits_test_X.npy")[:20]
    y = np.load(examples / "models" / "digits_test_y.npy")[:20]
    np.save(tmp_path / "x.npy", x)
    result = _hearth(
        "infer",
        "--gateway",
        gateway.address,
        "--where",
        "edge",
        str(examples / "models" / "digits.onnx"),
        "--input",
        f"input={tmp_path / 'x.npy'}",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    labels = np.load(tmp_path / "out" / "label.npy")
    assert (labels == y).mean() >= 0.9


def test_discover_json_on_loopback(make_gateway) -> None:
    gw = make_gateway("--mdns-interface", "127.0.0.1")
    result = _hearth("discover", "--json", "--interface", "127.0.0.1", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    found = {g["gateway_id"]: g for g in json.loads(result.stdout)}
    assert gw.gateway_id in found
    assert found[gw.gateway_id]["broker"] == gw.address
    assert found[gw.gateway_id]["rtt_ms"] > 0


def test_tasks_from_the_command_line(gateway, examples) -> None:
    device = f"cli-{os.getpid()}"
    module = examples / "tasks" / "indexer.wasm"
    # The first listen creates the device's persistent session: from then on notifications
    # wait for it while it is away.
    first = _hearth(
        "notifications", "--gateway", gateway.address, "--client-id", device, "--for", "0.1"
    )
    assert first.returncode == 0, first.stderr
    installed = _hearth(
        "tasks",
        "install",
        "--gateway",
        gateway.address,
        "--client-id",
        device,
        str(module),
        "--name",
        "primes",
        "--every",
        "0.05",
        "--set",
        "limit=100000",
        "--expires",
        "1h",
    )
    assert installed.returncode == 0, installed.stderr
    assert b"state       running" in installed.stdout
    task_id = installed.stdout.split()[1].decode()
    notes = _hearth(
        "notifications", "--gateway", gateway.address, "--client-id", device, "--for", "3"
    )
    assert b"indexer done: 9592 primes below 100000" in notes.stdout
    listing = _hearth(
        "tasks", "list", "--json", "--gateway", gateway.address, "--client-id", device
    )
    tasks = json.loads(listing.stdout)
    assert [t["task_id"] for t in tasks] == [task_id]
    assert tasks[0]["events"] >= 2
    cancelled = _hearth(
        "tasks", "cancel", task_id, "--gateway", gateway.address, "--client-id", device
    )
    assert b"state       cancelled" in cancelled.stdout


def test_call_runs_a_capability_on_an_image_file(gateway, tmp_path: Path) -> None:
    import cv2
    from skimage import data as skdata

    photo = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(photo), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    result = _hearth(
        "call",
        "vision.faces",
        "--gateway",
        gateway.address,
        "--image",
        str(photo),
        "--param",
        "min_size=40",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["capability"] == "vision.faces"
    assert answer["gateway"] == gateway.gateway_id
    assert len(answer["result"]["faces"]) == 1

    human = _hearth(
        "call",
        "vision.features",
        "--gateway",
        gateway.address,
        "--image",
        str(photo),
        "--param",
        "max_features=50",
    )
    assert human.returncode == 0, human.stderr
    assert "<50 x 32 bytes>" in human.stdout.decode()


def test_call_reports_the_gateways_error_code(gateway, tmp_path: Path) -> None:
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = _hearth("call", "vision.faces", "--gateway", gateway.address, "--image", str(garbage))
    assert result.returncode == 125
    assert b"bad_image" in result.stderr
    unknown = _hearth("call", "vision.nope", "--gateway", gateway.address, "--image", str(garbage))
    assert b"unknown_capability" in unknown.stderr


def test_describe_prints_a_model_s_inputs_and_outputs(gateway, examples) -> None:
    model = str(examples / "models" / "digits.onnx")
    plain = _hearth("describe", "--gateway", gateway.address, model)
    as_json = _hearth("describe", "--gateway", gateway.address, model, "--json")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(b"inputs:\n  input: float32 [")
    assert b"outputs:\n  label: " in plain.stdout
    described = json.loads(as_json.stdout)
    assert described["kind"] == "onnx"
    assert [o["name"] for o in described["outputs"]] == ["label", "probabilities"]


def test_describe_of_a_module_lists_its_imports_and_exports(gateway, wasm) -> None:
    result = _hearth("describe", "--gateway", gateway.address, str(wasm["echo"]))
    assert result.returncode == 0, result.stderr
    assert b"  wasi_snapshot_preview1.fd_write (func)\n" in result.stdout
    assert b"exports:\n" in result.stdout
    assert b"  _start (func)\n" in result.stdout


def test_describe_of_a_file_that_is_neither_fails_with_125(gateway, tmp_path: Path) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a model")
    result = _hearth("describe", "--gateway", gateway.address, str(bad))
    assert result.returncode == 125
    assert b"invalid_model" in result.stderr
