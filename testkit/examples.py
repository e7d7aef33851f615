"""The repository's root and the example modules and model that scripts/build_examples.py
builds into build/examples (WASM modules under wasm/ and tasks/, the digits model under
models/)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

__all__ = ["EXAMPLES", "REPO_ROOT", "ensure_examples"]

log = logging.getLogger("testkit")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "build" / "examples"


def _missing(patterns: tuple[str, ...]) -> list[str]:
    return [p for p in patterns if not any(EXAMPLES.glob(p))]


def ensure_examples(*patterns: str) -> Path:
    """build/examples, building it first if any of ``patterns`` (relative to it, e.g.
    "wasm/noop.wasm" or "wasm/*.wasm") matches nothing there."""
    missing = _missing(patterns)
    if missing:
        log.info("building the examples (%s missing)", ", ".join(missing))
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "build_examples.py")],
            check=True,
            stdout=2,  # to our stderr (fd 2): a benchmark's stdout is for its figures
            timeout=600,
        )
        still = _missing(patterns)
        if still:
            raise RuntimeError(f"scripts/build_examples.py did not produce {', '.join(still)}")
    return EXAMPLES
