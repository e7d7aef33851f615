"""Placement decisions: pure logic."""

from __future__ import annotations

from hearth.placement import REPROBE_EVERY, Estimates, Placement, decide


def _measured(edge: float, local: float, calls: int = 5) -> Estimates:
    e = Estimates(calls=calls)
    for where, ms in (("edge", edge), ("local", local)):
        e.record(where, 999.0)  # warm-up: ignored
        e.record(where, ms)
    return e


def test_explicit_placements_are_obeyed_and_do_not_fall_back() -> None:
    est = _measured(1.0, 100.0)
    local = decide(Placement.LOCAL, gateway=True, local=True, estimates=est)
    edge = decide(Placement.EDGE, gateway=False, local=True, estimates=est)
    assert (local.where, local.fallback_ok) == ("local", False)
    assert (edge.where, edge.fallback_ok) == ("edge", False)


def test_auto_without_gateway_runs_locally() -> None:
    d = decide(Placement.AUTO, gateway=False, local=True, estimates=Estimates())
    assert (d.where, d.reason) == ("local", "no gateway reachable")


def test_auto_without_local_runtime_offloads_without_fallback() -> None:
    d = decide(Placement.AUTO, gateway=True, local=False, estimates=Estimates())
    assert d.where == "edge"
    assert not d.fallback_ok


def test_warm_up_samples_are_not_counted() -> None:
    e = Estimates()
    e.record("edge", 500.0)
    assert e.edge_ms is None
    e.record("edge", 2.0)
    assert e.edge_ms == 2.0


def test_auto_measures_each_side_then_picks_the_faster() -> None:
    e = Estimates(calls=1)
    steps = []
    for ms in (50.0, 5.0):
        d = decide(Placement.AUTO, gateway=True, local=True, estimates=e)
        steps.append(d.where)
        e.record(d.where, ms)
    for ms in (80.0, 20.0):
        d = decide(Placement.AUTO, gateway=True, local=True, estimates=e)
        steps.append(d.where)
        e.record(d.where, ms)
    assert steps == ["edge", "edge", "local", "local"]
    d = decide(Placement.AUTO, gateway=True, local=True, estimates=e)
    assert d.where == "edge"  # 5 ms < 20 ms
    assert "edge 5.0 ms <= local 20.0 ms" in d.reason


def test_auto_prefers_local_when_it_is_faster() -> None:
    d = decide(Placement.AUTO, gateway=True, local=True, estimates=_measured(30.0, 3.0))
    assert d.where == "local"


def test_the_slower_side_is_re_measured_periodically() -> None:
    est = _measured(1.0, 100.0, calls=REPROBE_EVERY * 2)
    d = decide(Placement.AUTO, gateway=True, local=True, estimates=est)
    assert d.where == "local"
    assert "re-measuring" in d.reason


def test_estimates_move_towards_new_samples() -> None:
    est = _measured(10.0, 10.0)
    for _ in range(20):
        est.record("edge", 100.0)
    assert est.edge_ms is not None
    assert 90.0 < est.edge_ms <= 100.0


def test_without_gateway_and_without_local_runtime_the_gateway_error_surfaces() -> None:
    d = decide(Placement.AUTO, gateway=False, local=False, estimates=Estimates())
    assert d.where == "edge"
    assert not d.fallback_ok
