"""The package boundaries the architecture relies on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_sdk_never_imports_the_gateway() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "device-sdk" / "src").rglob("*.py")
        if any(name.split(".")[0] == "hearth_gateway" for name in _imports(path))
    ]
    assert offenders == []


def test_the_gateway_takes_the_protocol_from_the_sdk() -> None:
    gateway = ROOT / "gateway" / "src" / "hearth_gateway"
    assert any("hearth.protocol" in _imports(p) for p in gateway.rglob("*.py"))
    # No second definition of the wire messages on the gateway side.
    assert not any("msgspec.Struct, tag=" in p.read_text() for p in gateway.rglob("*.py"))


def test_the_sdk_offloads_without_the_local_extra() -> None:
    """A device without wasmtime/onnxruntime/numpy can still import the SDK and discover."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('wasmtime', 'onnxruntime', 'numpy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import hearth
from hearth.placement import Placement
with hearth.Client('127.0.0.1:1', timeout_s=0.5) as client:
    assert not client._local_available()
    try:
        client.run_wasm(b'\\x00asm\\x01\\x00\\x00\\x00')
    except hearth.GatewayUnavailable:
        print('ok')
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
