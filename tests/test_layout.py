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


def _sdk_import_graph() -> dict[str, set[str]]:
    """hearth's modules -> the hearth modules each imports, wherever the import statement is
    (module level, inside a function, under TYPE_CHECKING): read from the source, not run."""
    src = ROOT / "device-sdk" / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (src / "hearth").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..protocol import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from hearth.runtime import wasm` imports hearth.runtime.wasm, if it is one
                targets.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                )
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, as the modules around it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            found = visit(target)
            if found is not None:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module)
        if found is not None:
            return found
    return None


def test_the_sdk_has_no_import_cycles() -> None:
    """Each of hearth's modules can be read knowing only the ones it imports (a package's
    ``__init__`` importing its own modules is the one way up, and nothing imports it back)."""
    graph = _sdk_import_graph()
    assert {"hearth.client", "hearth.vision", "hearth.discovery", "hearth.pairing"} <= set(graph)
    assert graph["hearth.client"], "the graph must see the client's imports"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
