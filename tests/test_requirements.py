"""Requirements (``requires=``, ``local=False``; docs/quotas.md): the SDK sends a call only to a
place that meets it and says why it skipped the others; a gateway refuses what it cannot meet
with ``unsatisfiable``; bad requirements are refused before anything is sent (and ``malformed``
when sent raw). Real Mosquitto, real gateways, real wasmtime."""

from __future__ import annotations

import hashlib
import io
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import hearth
from hearth.cli import main as cli_main
from hearth.errors import ErrorCode, JobError, RequirementsError
from hearth.protocol import Error, NeedBlob, Requirements, WasmJob, WasmResult, encode
from hearth.requirements import Offer, requirements, unmet
from helpers import RawDevice
from testkit.gateway import GatewayProcess

GPU_CONFIG = 'accelerators = ["gpu"]\n'


@pytest.fixture
def two_gateways(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> tuple[GatewayProcess, GatewayProcess]:
    """Gateway A (CPU only) and gateway B, whose owner declared a GPU in its config; each with
    its own broker, as two boxes have (a client tells gateways apart by address)."""
    config = tmp_path / "gpu.toml"
    config.write_text(GPU_CONFIG)
    return make_gateway(managed=True), make_gateway("--config", str(config), managed=True)


# --- the SDK's placement among gateways and this device ---------------------------------------


def test_a_requirement_only_gateway_b_meets_runs_on_b_and_says_why_a_was_skipped(
    two_gateways: tuple[GatewayProcess, GatewayProcess], wasm: dict[str, Path]
) -> None:
    a, b = two_gateways
    with hearth.Client(a.address, gateways=[b.address], client_id=_device()) as client:
        run = client.run_wasm(wasm["echo"], b"hi\n", ["x"], requires={"accelerator": "gpu"})
    assert run.where == "edge"
    assert run.gateway_id == b.gateway_id
    assert f"requires met by gateway {b.gateway_id}" in run.reason
    assert f"gateway {a.gateway_id}: no gpu accelerator (has cpu)" in run.reason
    assert "this device: no gpu accelerator" in run.reason
    assert run.stdout == b"hi\nx\n"


def test_without_a_named_gateway_the_gateways_found_over_mdns_are_the_candidates(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    config = tmp_path / "gpu.toml"
    config.write_text(GPU_CONFIG)
    mdns = ("--mdns-interface", "127.0.0.1")
    make_gateway(*mdns, managed=True)
    b = make_gateway("--config", str(config), *mdns, managed=True)
    with hearth.Client(interface="127.0.0.1", client_id=_device()) as client:
        run = client.run_wasm(wasm["echo"], b"", ["m"], requires={"accelerator": "gpu"})
    assert (run.where, run.gateway_id) == ("edge", b.gateway_id)
    assert run.stdout == b"m\n"


def test_a_requirement_no_place_meets_fails_unsatisfiable_naming_every_place(
    two_gateways: tuple[GatewayProcess, GatewayProcess], wasm: dict[str, Path]
) -> None:
    a, b = two_gateways
    client = hearth.Client(a.address, gateways=[b.address], client_id=_device())
    with client, pytest.raises(JobError) as caught:
        client.run_wasm(wasm["echo"], b"", requires={"accelerator": "npu"})
    assert caught.value.code is ErrorCode.UNSATISFIABLE
    for name in (f"gateway {a.gateway_id}", f"gateway {b.gateway_id}", "this device"):
        assert f"{name}: no npu accelerator" in caught.value.message


def test_with_local_false_a_call_waits_for_a_gateway_then_fails_unsatisfiable(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    # One attempt of 1 s: the call's deadline. No gateway has an NPU; none appears meanwhile.
    with (
        hearth.Client(
            gateway.address, client_id=_device(), timeout_s=1.0, retries=0, local=False
        ) as client,
        pytest.raises(JobError) as caught,
    ):
        client.run_wasm(wasm["echo"], b"", requires={"accelerator": "npu"})
    assert caught.value.code is ErrorCode.UNSATISFIABLE
    assert "offload is mandatory: local=False" in caught.value.message
    assert "after waiting" in caught.value.message
    assert "this device" not in caught.value.message  # never a candidate


def test_with_local_false_a_call_a_gateway_meets_runs_there(
    two_gateways: tuple[GatewayProcess, GatewayProcess], wasm: dict[str, Path]
) -> None:
    a, b = two_gateways
    with hearth.Client(a.address, gateways=[b.address], client_id=_device(), local=False) as c:
        run = c.run_wasm(wasm["echo"], b"", ["y"], requires={"accelerator": "gpu"})
    assert (run.where, run.gateway_id) == ("edge", b.gateway_id)


def test_a_requirement_the_device_meets_runs_locally_when_local_is_allowed(
    two_gateways: tuple[GatewayProcess, GatewayProcess], wasm: dict[str, Path]
) -> None:
    a, b = two_gateways
    # Each gateway lets one job use 384 MiB (workers.max_rss_bytes); this machine has more.
    with hearth.Client(a.address, gateways=[b.address], client_id=_device()) as client:
        run = client.run_wasm(wasm["echo"], b"", ["z"], requires={"memory_mb": 1024})
    assert run.where == "local"
    assert run.stdout == b"z\n"
    assert f"gateway {a.gateway_id}: 1024 MiB wanted, 384 MiB per job there" in run.reason


# --- the gateway's admission --------------------------------------------------------------------


def test_a_gateway_refuses_what_it_cannot_meet_with_unsatisfiable_and_runs_what_it_can(
    two_gateways: tuple[GatewayProcess, GatewayProcess], wasm: dict[str, Path]
) -> None:
    a, b = two_gateways
    module = wasm["echo"].read_bytes()
    sha = hashlib.sha256(module).hexdigest()
    needs = Requirements(accelerator="gpu", capability="vision.plate")
    job = WasmJob(job_id="j-1", module=sha, args=["ok"], requires=needs)
    with RawDevice(a.listen, a.gateway_id) as device:
        refused = device.request(job)
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.UNSATISFIABLE
    assert "no gpu accelerator (has cpu)" in refused.message
    with RawDevice(b.listen, b.gateway_id) as device:
        device.upload(module)
        done = device.request(job)
    assert isinstance(done, WasmResult), done
    assert done.stdout == b"ok\n"


def test_a_gateway_answers_requires_with_unknown_keys_or_absurd_values_malformed(
    gateway: GatewayProcess,
) -> None:
    base = {"type": "wasm", "v": 1, "job_id": "j-2", "module": "0" * 64}
    bad = [
        {"gpu": True},
        {"memory_mb": -512},
        {"max_latency_ms": 0},
        {"max_latency_ms": 1e12},
        {"accelerator": "tpu"},
    ]
    with RawDevice(gateway.listen, gateway.gateway_id) as device:
        for requires in bad:
            reply = device.request(msgspec.msgpack.encode({**base, "requires": requires}))
            assert isinstance(reply, Error), requires
            assert reply.code is ErrorCode.MALFORMED, requires
            assert "requires" in reply.message, reply.message
        # ...and the daemon is still up and answering (it asks for the module it lacks).
        assert isinstance(device.request(encode(WasmJob(job_id="j-3", module="0" * 64))), NeedBlob)
    assert gateway.proc is not None
    assert gateway.proc.poll() is None


# --- validation before sending (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("requires", "words"),
    [
        ({"gpu": True}, "unknown field `gpu`"),
        ({"memory_mb": -512}, ">= 1"),
        ({"memory_mb": "lots"}, "Expected `int | null`"),
        ({"max_latency_ms": 0}, ">= 1"),
        ({"max_latency_ms": 1e12}, "<= 3600000"),
        ({"accelerator": "tpu"}, "Invalid enum value 'tpu'"),
        ({"capability": "Plate!"}, "capability"),
    ],
)
def test_bad_requires_are_a_value_error_before_anything_is_sent(
    requires: dict[str, object], words: str
) -> None:
    with pytest.raises(RequirementsError) as caught:
        requirements(requires)
    assert isinstance(caught.value, ValueError)
    assert words in str(caught.value)


def test_a_client_with_bad_requires_or_app_fails_at_construction() -> None:
    with pytest.raises(RequirementsError):
        hearth.Client("127.0.0.1:1", requires={"memory_mb": 0})
    with pytest.raises(RequirementsError):
        hearth.Client("127.0.0.1:1", app="door cam")


def test_unmet_lists_every_requirement_a_place_misses() -> None:
    needs = requirements(
        {"accelerator": "gpu", "memory_mb": 512, "capability": "vision.plate", "max_latency_ms": 50}
    )
    offer = Offer(("cpu",), memory_mb=256, capabilities=frozenset(), latency_ms=80.0)
    assert unmet(needs, offer) == [
        "no gpu accelerator (has cpu)",
        "512 MiB wanted, 256 MiB per job there",
        "no capability vision.plate",
        "expected 80 ms, over max_latency_ms 50",
    ]
    fine = Offer(("cpu", "gpu"), 1024, frozenset({"vision.plate"}), 20.0)
    assert unmet(needs, fine) == []


def _device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def test_the_cli_takes_requires_and_refuses_a_bad_one_as_a_usage_error(
    gateway: GatewayProcess,
    wasm: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ["run", "--gateway", gateway.address, "--client-id", _device(), "--explain"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # no stdin
    bad = cli_main([*base, "--requires", "accelerator=tpu", str(wasm["echo"])])
    assert bad == 2
    assert "Invalid enum value 'tpu'" in capsys.readouterr().err
    ran = cli_main([*base, "--requires", "memory_mb=1024", str(wasm["echo"]), "w"])
    out, err = capsys.readouterr()
    assert ran == 0
    assert out == "w\n"
    assert "ran on local" in err
    assert "1024 MiB wanted, 384 MiB per job there" in err
