"""Every execution provider this onnxruntime build has, against the CPU provider, per model.

Models: PP-OCRv4's text detector (640x640) and recogniser (a batch of 4 strips, 48x320) as
vision.plate runs them, and the digits classifier that the examples, the ONNX tests and the
pipeline tests use (a batch of 64 held-out digits). For each model and provider: p50 and p99 of
``--runs`` runs after a warm-up, the ratio to the CPU provider, and whether the gateway's
automatic choice (runners/accelerated.py, in a fresh decision cache) is the fastest provider that
loads the model. Run it where the accelerated build is installed::

    make bench-accel                      # .venv-openvino/bin/python benchmarks/accel.py
    python benchmarks/accel.py --json     # one JSON object of the figures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "device-sdk" / "src"), str(ROOT / "gateway" / "src")]

from hearth_gateway import accelerators  # noqa: E402
from hearth_gateway.runners.accelerated import TIE, AcceleratedRuntime  # noqa: E402
from hearth_gateway.vision.plate import DET_MODEL, REC_MODEL, default_models_dir  # noqa: E402

THREADS = 2


def _models() -> list[tuple[str, Path, dict[str, Any]]]:
    rng = np.random.default_rng(0)
    found: list[tuple[str, Path, dict[str, Any]]] = []
    folder = default_models_dir()
    if folder is not None:
        found.append(
            ("PP-OCRv4 det", folder / DET_MODEL, {"x": rng.random((1, 3, 640, 640), np.float32)})
        )
        found.append(
            ("PP-OCRv4 rec", folder / REC_MODEL, {"x": rng.random((4, 3, 48, 320), np.float32)})
        )
    digits = ROOT / "build" / "examples" / "models"
    if (digits / "digits.onnx").exists():
        x = np.load(digits / "digits_test_X.npy")[:64]
        found.append(("digits", digits / "digits.onnx", {"input": x}))
    return found


def _time(providers: list[str], model: Path, feeds: dict[str, Any], runs: int) -> dict[str, Any]:
    """Per provider: whether it loads the model, and p50/p99 of ``runs`` runs after a warm-up.
    The providers take turns run by run (as in the gateway's trial), so that other work on the
    box slows them alike instead of whichever ran while it did."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    figures: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    for provider in providers:
        try:
            session = ort.InferenceSession(str(model), options, providers=[provider])
        except Exception as exc:  # noqa: BLE001 - any failure means "does not load"
            figures[provider] = {"loads": False, "why": str(exc).strip().splitlines()[-1][:160]}
            continue
        if session.get_providers()[0] != provider:
            why = f"onnxruntime ran it on {session.get_providers()[0]}"
            figures[provider] = {"loads": False, "why": why}
            continue
        session.run(None, feeds)
        sessions[provider] = session
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for _ in range(runs):
        for provider, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            times[provider].append((time.perf_counter() - started) * 1e3)
    for provider, ts in times.items():
        ts.sort()
        figures[provider] = {
            "loads": True,
            "p50_ms": round(ts[len(ts) // 2], 2),
            "p99_ms": round(ts[min(len(ts) - 1, int(len(ts) * 0.99))], 2),
        }
    return {p: figures[p] for p in providers}


def _automatic(model: Path, feeds: dict[str, Any]) -> str:
    """The provider the gateway decides for ``model`` on its first run (a fresh cache)."""
    data = model.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        cache = accelerators.ChoiceCache(Path(tmp), accelerators.provider_package(), {})
        runtime = AcceleratedRuntime(
            accelerators.available_providers(), cache, intra_op_threads=THREADS
        )
        sha = hashlib.sha256(data).hexdigest()
        _, provider = runtime.run_arrays(sha, feeds, model=data)
        runtime.close()
    return provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    providers = accelerators.available_providers()
    report: dict[str, Any] = {
        "package": accelerators.provider_package(),
        "providers": providers,
        "threads": THREADS,
        "models": {},
    }
    for name, path, feeds in _models():
        figures = _time(providers, path, feeds, args.runs)
        cpu = figures["CPUExecutionProvider"]
        for fig in figures.values():
            if fig["loads"] and cpu["loads"]:
                fig["ratio_to_cpu"] = round(fig["p50_ms"] / cpu["p50_ms"], 2)
        loading = {p: f["p50_ms"] for p, f in figures.items() if f["loads"]}
        fastest = min(loading, key=loading.__getitem__)
        chosen = _automatic(path, feeds) if len(providers) > 1 else "CPUExecutionProvider"
        report["models"][name] = {
            "providers": figures,
            "fastest": fastest,
            "automatic": chosen,
            # The gateway's own tie rule (runners/accelerated.py TIE): within 10 % counts.
            "automatic_is_fastest": chosen == fastest
            or loading.get(chosen, float("inf")) <= loading[fastest] * (1 + TIE),
        }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['package']}, {THREADS} threads, {args.runs} runs")
    print(f"{'model':<14} {'provider':<28} {'p50 ms':>8} {'p99 ms':>8} {'/ CPU':>6}  choice")
    for name, entry in report["models"].items():
        for provider, fig in entry["providers"].items():
            mark = "auto" if provider == entry["automatic"] else ""
            if provider == entry["fastest"]:
                mark += " fastest" if mark else "fastest"
            if fig["loads"]:
                ratio = fig.get("ratio_to_cpu", 0)
                row = f"{fig['p50_ms']:>8.2f} {fig['p99_ms']:>8.2f} {ratio:>6.2f}"
            else:
                row = f"{'does not load: ' + fig['why'][:60]:>24}"
            print(f"{name:<14} {provider:<28} {row}  {mark}")
    verdicts = [
        f"{name} {'yes' if entry['automatic_is_fastest'] else 'NO'}"
        for name, entry in report["models"].items()
    ]
    print(f"automatic choice = fastest: {', '.join(verdicts)}")


if __name__ == "__main__":
    main()
