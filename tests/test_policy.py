"""Policies are data: the shipped file, the embedded defaults, merging, and admission."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth.errors import ErrorCode
from hearth_gateway.errors import ConfigError
from hearth_gateway.policy import Admission, LimitsPolicy, Policy, load_policy

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_default_policy_equals_the_embedded_defaults() -> None:
    assert load_policy([ROOT / "policies" / "default.toml"]) == Policy()


def test_files_merge_key_by_key(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text("[wasm]\nfuel = 10\n[limits]\nmax_queue = 3\n")
    b = tmp_path / "b.toml"
    b.write_text("[wasm]\nmemory_bytes = 1048576\n")
    policy = load_policy([a, b])
    assert policy.wasm.fuel == 10
    assert policy.wasm.memory_bytes == 1048576
    assert policy.limits.max_queue == 3
    assert policy.onnx == Policy().onnx


@pytest.mark.parametrize(
    "text",
    [
        "[wasm]\nfuel = 'many'\n",
        "[wasm]\nfules = 1\n",
        "[nonsense]\nx = 1\n",
        "wasm = 3\n",
        "not toml [",
    ],
)
def test_bad_policies_are_refused_with_the_reason(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_policy([path])


def test_admission_bounds_the_queue_and_each_device() -> None:
    admission = Admission(LimitsPolicy(max_queue=3, max_inflight_per_client=2))
    assert admission.admit("a") is None
    assert admission.admit("a") is None
    assert admission.admit("a") == ErrorCode.QUOTA_EXCEEDED
    assert admission.admit("b") is None
    assert admission.admit("c") == ErrorCode.OVERLOADED
    admission.release("a")
    assert admission.in_flight == 2
    assert admission.admit("c") is None


def test_topic_matching_follows_mqtt_rules() -> None:
    from hearth_gateway.policy import topic_matches

    assert topic_matches("home/+/temperature", "home/kitchen/temperature")
    assert not topic_matches("home/+/temperature", "home/kitchen/x/temperature")
    assert topic_matches("home/#", "home")
    assert topic_matches("home/#", "home/a/b")
    assert not topic_matches("home/lights/hall/set", "home/lights/bedroom/set")
    assert not topic_matches("home/a", "home/a/b")


def test_filter_cover() -> None:
    from hearth_gateway.policy import filter_covers

    assert filter_covers("home/#", "home/+/motion")
    assert filter_covers("home/+/motion", "home/hall/motion")
    assert not filter_covers("home/+/motion", "home/#")
    assert not filter_covers("home/hall/motion", "home/+/motion")
    assert not filter_covers("home/kitchen/#", "home/#")


@pytest.mark.parametrize(
    ("topic", "is_filter", "ok"),
    [
        ("home/lights/hall/set", False, True),
        ("home/+/set", True, True),
        ("home/+/set", False, False),
        ("hearth/v1/gw/x/req/y", False, False),
        ("$SYS/broker", True, False),
        ("#", True, False),
        ("+/x", True, False),
        ("home/#/x", True, False),
        ("home/a+b", True, False),
        ("", True, False),
    ],
)
def test_task_topics(topic: str, is_filter: bool, ok: bool) -> None:
    from hearth_gateway.policy import task_topic_error

    assert (task_topic_error(topic, is_filter=is_filter) is None) == ok


def test_when_parsing() -> None:
    from hearth._tasks_cli import parse_when

    assert parse_when("90m", now=1000.0) == 1000.0 + 5400
    assert parse_when("2d", now=0.0) == 172800
    assert parse_when("1795000000") == 1795000000.0
    assert parse_when("2026-12-01T08:00:00+00:00") == 1796112000.0
    with pytest.raises(SystemExit):
        parse_when("soon")
