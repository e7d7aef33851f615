"""Packaging: the version flags, the Debian package's default config, the device SDK's wheel
installed alone into a fresh venv, and the Debian package installed, used and purged.

The Debian test builds the package with packaging/deb/build.sh (wheels from build/wheelhouse,
filled from the package index on the first run and reused offline after) and runs
packaging/deb/try_install.sh: dpkg -i, start the unit's ExecStart= as systemd would, pair a
device, run a job from it, stop, dpkg --purge, all in a throwaway overlay of this machine's root
in mount, PID and network namespaces of its own. What the overlay's upper layer holds afterwards
is everything the episode changed on the system."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import msgspec
import pytest

from hearth_gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "build" / "wheelhouse"
DIST = ROOT / "build" / "dist"


def _version(package: str) -> str:
    data = tomllib.loads((ROOT / package / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def _env() -> dict[str, str]:
    paths = [str(ROOT / "device-sdk" / "src"), str(ROOT / "gateway" / "src")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _control(accel: str) -> dict[str, str]:
    """The control file packaging/deb/build.sh writes for the build ``accel`` ("" or
    "openvino"), as fields (its DEB_CONTROL_ONLY mode: no venv, no wheels)."""
    result = subprocess.run(
        ["sh", str(ROOT / "packaging" / "deb" / "build.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "DEB_ACCEL": accel, "DEB_CONTROL_ONLY": "1"},
        timeout=60,
        check=True,
    )
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", result.stdout, flags=re.M))
    assert not re.search(r"@[A-Z_]+@", result.stdout), result.stdout  # every placeholder filled
    return fields


def test_the_openvino_build_is_a_package_that_recommends_the_igpu_driver() -> None:
    plain, openvino = _control(""), _control("openvino")
    assert plain["Package"] == "hearth-gateway"
    assert "hearth-gateway-openvino" in plain["Suggests"]
    assert openvino["Package"] == "hearth-gateway-openvino"
    # OpenVINO's GPU plugin drives an Intel iGPU through Intel's OpenCL driver.
    assert openvino["Recommends"] == "intel-opencl-icd"
    # The two ship the same files: one replaces the other.
    for field in ("Provides", "Conflicts", "Replaces"):
        assert openvino[field] == "hearth-gateway"
    assert openvino["Depends"] == plain["Depends"]
    build = (ROOT / "packaging" / "deb" / "build.sh").read_text()
    # Its venv swaps the onnxruntime build the way `make openvino` does, pinned alike.
    assert "constraints-openvino.txt" in build
    assert "accel_venv.sh" in build


@pytest.mark.parametrize(
    ("module", "prog", "package"),
    [("hearth.cli", "hearth", "device-sdk"), ("hearth_gateway.cli", "hearth-gateway", "gateway")],
)
def test_both_clis_print_the_version_from_pyproject(module: str, prog: str, package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{prog} {_version(package)}\n"


def test_the_packaged_config_is_the_defaults_and_every_example_key_is_valid() -> None:
    shipped = ROOT / "packaging" / "deb" / "gateway.toml"
    assert load_config(shipped) == Config()
    # Uncommenting any example line must give a valid config (no misspelt key, no wrong type).
    examples = re.findall(r"^#(\w+ = .+)$", shipped.read_text(), flags=re.MULTILINE)
    assert len(examples) >= 10
    msgspec.convert(tomllib.loads("\n".join(examples)), Config)


def _build_wheels() -> tuple[Path, Path]:
    subprocess.run(
        ["sh", str(ROOT / "packaging" / "build_wheels.sh"), sys.executable],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdk,) = DIST.glob(f"hearth_device_sdk-{_version('device-sdk')}-*.whl")
    (gateway,) = DIST.glob(f"hearth_gateway-{_version('gateway')}-*.whl")
    return sdk, gateway


@pytest.mark.slow
def test_sdk_wheel_is_pure_python_and_installs_alone_into_a_fresh_venv(tmp_path: Path) -> None:
    sdk, gateway = _build_wheels()
    for wheel in (sdk, gateway):
        assert wheel.name.endswith("-py3-none-any.whl")
        names = zipfile.ZipFile(wheel).namelist()
        assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".c"))]
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    # Its dependencies from the wheelhouse the Debian build keeps; from the package index only
    # when that lacks one (a first run on a fresh clone).
    # Without our PYTHONPATH: pip would take the checkout's packages for installed ones.
    clean = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    offline = subprocess.run(
        [*pip, "--no-index", "--find-links", str(WHEELHOUSE), *constraints, str(sdk)],
        capture_output=True,
        text=True,
        env=clean,
        timeout=600,
        check=False,
    )
    if offline.returncode != 0:
        subprocess.run([*pip, *constraints, str(sdk)], env=clean, check=True, timeout=600)
    version = subprocess.run(
        [str(env_dir / "bin" / "hearth"), "--version"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"hearth {_version('device-sdk')}\n"
    discover = subprocess.run(
        [str(env_dir / "bin" / "hearth"), "discover", "--help"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )
    assert discover.returncode == 0, discover.stderr
    assert discover.stdout.startswith("usage: hearth discover")
    # Alone: offload only, none of the local runtimes and not the gateway.
    installed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "hearth-device-sdk" in names
    assert not names & {"hearth-gateway", "wasmtime", "onnxruntime", "numpy"}


# What purge leaves by Debian policy: dpkg's own database and log (which records the package
# was there). Nothing of the package: no file, no state, no enable link, no user.
DPKG_RECORDS = {
    "/var/lib/dpkg/lock",
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/status",
    "/var/lib/dpkg/status-old",
    "/var/lib/dpkg/triggers/Lock",
    "/var/log/dpkg.log",
    # systemd's parent of every DynamicUser= service's state; smoke.py makes it, as systemd
    # would, on a machine where no such service has run yet. Not the package's.
    "/var/lib/private",
}


@functools.cache
def _can_try_install() -> str:
    if os.geteuid() != 0:
        return "needs root: namespaces, an overlay mount and dpkg"
    for tool in ("dpkg-deb", "unshare", "ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/sbin/mosquitto").exists() or not Path("/usr/bin/python3").exists():
        return "the package's dependencies (mosquitto, python3) are not installed"
    probe = subprocess.run(
        ["sh", str(ROOT / "packaging" / "deb" / "try_install.sh"), "--probe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:  # a container that allows no namespaces or overlay mounts
        return f"no namespaces or overlay mount here: {probe.stderr.strip()[-200:]}"
    return ""


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(bool(_can_try_install()), reason=_can_try_install() or "-")
def test_deb_installs_pairs_a_device_runs_its_job_and_purges_clean() -> None:
    build = subprocess.run(
        ["sh", str(ROOT / "packaging" / "deb" / "build.sh")],
        capture_output=True,
        text=True,
        # zstd at its fastest: the test checks the contents, not the size.
        env={**os.environ, "DEB_COMPRESS": "zstd", "DEB_LEVEL": "1"},
        timeout=1500,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (deb,) = (ROOT / "build" / "deb").glob(f"hearth-gateway_{_version('gateway')}_*.deb")
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Depends", "Architecture"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "mosquitto" in fields
    assert re.search(r"python3\.\d+", fields)
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert conffiles.split() == ["/etc/hearth/gateway.toml"]

    tried = subprocess.run(
        ["sh", str(ROOT / "packaging" / "deb" / "try_install.sh"), str(deb)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = tried.stdout.splitlines()
    results = [line for line in lines if line.startswith("RESULT ")]
    assert results, tried.stdout[-3000:] + tried.stderr[-3000:]
    steps = json.loads(results[-1].removeprefix("RESULT "))
    failed = {k: v for k, v in steps.items() if isinstance(v, dict) and "failed" in v}
    assert not failed, failed
    assert tried.returncode == 0, tried.stderr[-3000:]
    assert steps["version"] == f"hearth-gateway {_version('gateway')}"
    assert "devices" in steps["completion"]  # bash completion, installed and answering
    assert "--config /etc/hearth/gateway.toml" in steps["exec_start"]
    assert steps["doctor"]["worker network"] == "ok"
    assert steps["job"] == "hello from a packaged gateway"
    assert steps["purged_paths"] == []
    leftovers = {line.split(maxsplit=2)[2] for line in lines if line.startswith("LEFTOVER ")}
    # onnxruntime keeps a cache database under the home directory of whoever imports it (here
    # root, running the CLI): a user's file, which no package's purge may touch (Debian policy),
    # not the package's. The service itself runs as its DynamicUser, with no such home.
    leftovers = {p for p in leftovers if not p.startswith("/root/.cache/")}
    assert leftovers <= DPKG_RECORDS, sorted(leftovers - DPKG_RECORDS)
