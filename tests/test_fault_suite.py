"""The fault suite (benchmarks/faults.py) in its bounded form: every fault injected for real
(broker and gateway SIGKILL, a restart storm, a full disk, a partition in network namespaces,
structure-aware fuzzing of every request type, slow consumers), and every must-show of each
scenario holds. Its table is in the README; the full form is ``benchmarks/faults.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_fault_suite_loses_nothing_and_stays_up() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs and creates network namespaces (CI is root)")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "faults.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert done.stdout.strip(), f"no figures; stderr:\n{done.stderr[-4000:]}"
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {name: row for name, row in figures.items() if isinstance(row, dict)}
    skipped = {name: row["skipped"] for name, row in rows.items() if row["skipped"]}
    assert not skipped, f"skipped as root: {skipped}"
    assert figures["failed_checks"] == [], "\n".join(figures["failed_checks"])
    for name, row in rows.items():
        assert row["lost"] == 0, name
        assert row["twice"] == 0, name
    assert done.returncode == 0
