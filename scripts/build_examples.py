"""Build the example workloads that tests, demos and benchmarks use.

Compiles every ``examples/wasm/*.c`` to a stripped WASI command module in
``build/examples/wasm/`` and every ``examples/tasks/*.c`` to a stripped WASI
reactor module (a persistent task, see docs/tasks.md) in
``build/examples/tasks/``, with the zig toolchain from the ``ziglang`` wheel.
Where Binaryen's ``wasm-opt`` is installed, each command module also gets a
migratable twin ``build/examples/wasm/NAME.migratable.wasm`` (instrumented by
``hearth.runtime.asyncify``, see docs/migration.md). Then it trains and exports
the digits model (``scripts/train_digits.py``) into ``build/examples/models/``
when it is missing or older than that script.

Up-to-date artifacts are skipped, so running it again is cheap. ``make`` runs it
with the project's venv; by hand::

    python scripts/build_examples.py            # build what is out of date
    python scripts/build_examples.py --clean    # remove build/examples first
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WASM_SRC_DIR = REPO_ROOT / "examples" / "wasm"
BUILD_DIR = REPO_ROOT / "build" / "examples"
WASM_OUT_DIR = BUILD_DIR / "wasm"
TASKS_SRC_DIR = REPO_ROOT / "examples" / "tasks"
TASKS_OUT_DIR = BUILD_DIR / "tasks"
MODELS_OUT_DIR = BUILD_DIR / "models"
ZIG_CACHE_DIR = REPO_ROOT / "build" / "zig-cache"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_digits.py"
SDK_SRC_DIR = REPO_ROOT / "device-sdk" / "src"
ASYNCIFY_MODULE = SDK_SRC_DIR / "hearth" / "runtime" / "asyncify.py"
MIGRATABLE_SUFFIX = ".migratable.wasm"
DIGITS_MODEL = MODELS_OUT_DIR / "digits.onnx"
DIGITS_OUTPUTS = (
    DIGITS_MODEL,
    MODELS_OUT_DIR / "digits_test_X.npy",
    MODELS_OUT_DIR / "digits_test_y.npy",
)

# The build machine has 2 cores; zig's first compile also builds wasi-libc (~30 s).
MAX_PARALLEL_COMPILES = 2
COMPILE_TIMEOUT_S = 600
WASM_STACK_BYTES = 1024 * 1024
# Persistent tasks stay instantiated (and checkpointed) between events, so their
# idle footprint matters: with a 64 KiB stack the example tasks are 2 wasm pages
# (128 KiB: stack, then data) and stay there.
TASK_STACK_BYTES = 64 * 1024

# zig's default wasm stack is 16 MiB, which every instance would take as initial
# linear memory before doing anything; the examples need far less, and tests of
# memory limits want a small baseline.
COMMAND_FLAGS = (f"-Wl,-z,stack-size={WASM_STACK_BYTES}",)
TASK_FLAGS = (
    # A reactor: no main(); exports _initialize (runs constructors once) and
    # leaves the exports that hearth_task.h marks with export_name callable.
    "-mexec-model=reactor",
    f"-Wl,-z,stack-size={TASK_STACK_BYTES}",
    "-I",
    str(TASKS_SRC_DIR),
)
TRAIN_TIMEOUT_S = 600


class BuildError(Exception):
    """A build step failed; the message says which one and why."""


@dataclass(frozen=True)
class WasmTarget:
    source: Path
    output: Path
    flags: tuple[str, ...] = COMMAND_FLAGS
    # Headers the source includes: editing one rebuilds the target.
    headers: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.source.stem

    def is_up_to_date(self) -> bool:
        if not self.output.exists():
            return False
        # This script holds the compiler flags, so editing it rebuilds everything.
        inputs = (self.source, Path(__file__), *self.headers)
        newest_input = max(p.stat().st_mtime for p in inputs)
        return self.output.stat().st_mtime >= newest_input


def rel(path: Path) -> str:
    """Path relative to the repository root, for messages."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def zig_env() -> dict[str, str]:
    # Keep zig's caches inside build/ so nothing is written to $HOME.
    env = dict(os.environ)
    env["ZIG_GLOBAL_CACHE_DIR"] = str(ZIG_CACHE_DIR)
    env["ZIG_LOCAL_CACHE_DIR"] = str(ZIG_CACHE_DIR)
    return env


def wasm_targets() -> list[WasmTarget]:
    # Shared headers (wasi_nn.h: the wasi-nn imports nn_digits.c uses) rebuild what includes them.
    headers = tuple(sorted(WASM_SRC_DIR.glob("*.h")))
    return [
        WasmTarget(source=src, output=WASM_OUT_DIR / f"{src.stem}.wasm", headers=headers)
        for src in sorted(WASM_SRC_DIR.glob("*.c"))
    ]


def task_targets() -> list[WasmTarget]:
    headers = tuple(sorted(TASKS_SRC_DIR.glob("*.h")))
    return [
        WasmTarget(
            source=src,
            output=TASKS_OUT_DIR / f"{src.stem}.wasm",
            flags=TASK_FLAGS,
            headers=headers,
        )
        for src in sorted(TASKS_SRC_DIR.glob("*.c"))
    ]


def compile_wasm(target: WasmTarget, env: dict[str, str]) -> None:
    # Write to a temporary name first so an interrupted build never leaves a
    # truncated module that looks up to date.
    partial = target.output.with_suffix(".wasm.partial")
    cmd = [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        "-target",
        "wasm32-wasi",
        "-O2",
        "-s",  # strip: without it a hello world is ~1 MB of debug info
        *target.flags,
        "-o",
        str(partial),
        str(target.source),
    ]
    try:
        result = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial.unlink(missing_ok=True)
        raise BuildError(
            f"compiling {rel(target.source)} took more than {COMPILE_TIMEOUT_S} s"
        ) from exc
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        output = (result.stderr + result.stdout).strip()
        raise BuildError(
            f"compiling {rel(target.source)} failed (exit {result.returncode}):\n{output}"
        )
    partial.replace(target.output)


def build_wasm() -> None:
    targets = wasm_targets()
    if not targets:
        raise BuildError(f"no C sources found in {rel(WASM_SRC_DIR)}")
    targets += task_targets()
    for out_dir in {t.output.parent for t in targets}:
        out_dir.mkdir(parents=True, exist_ok=True)
    ZIG_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stale = [t for t in targets if not t.is_up_to_date()]
    for target in targets:
        if target not in stale:
            print(f"up to date  {rel(target.output)}")

    env = zig_env()
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_COMPILES, thread_name_prefix="zig-cc") as pool:
        futures = [(t, pool.submit(compile_wasm, t, env)) for t in stale]
        for target, future in futures:
            try:
                future.result()
            except BuildError as exc:
                errors.append(str(exc))
            else:
                size = target.output.stat().st_size
                print(f"built       {rel(target.output)} ({size} bytes)")
    if errors:
        raise BuildError("\n\n".join(errors))


@dataclass(frozen=True)
class MigratableTarget:
    """The Asyncify-instrumented twin of a command module (docs/migration.md)."""

    plain: Path
    output: Path

    def is_up_to_date(self) -> bool:
        if not self.output.exists():
            return False
        # The instrumentation (wasm-opt's passes, the exported globals) lives in asyncify.py.
        inputs = (self.plain, Path(__file__), ASYNCIFY_MODULE)
        return self.output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def migratable_targets() -> list[MigratableTarget]:
    return [
        MigratableTarget(t.output, t.output.with_name(t.name + MIGRATABLE_SUFFIX))
        for t in wasm_targets()
    ]


def instrument_module(target: MigratableTarget) -> None:
    # This checkout's instrumentation, whichever copy of the SDK the interpreter has installed.
    if str(SDK_SRC_DIR) not in sys.path:
        sys.path.insert(0, str(SDK_SRC_DIR))
    from hearth.errors import JobError
    from hearth.runtime.asyncify import instrument

    partial = target.output.with_suffix(".partial")
    try:
        partial.write_bytes(instrument(target.plain.read_bytes()))
    except JobError as exc:
        partial.unlink(missing_ok=True)
        raise BuildError(f"instrumenting {rel(target.plain)} failed: {exc}") from exc
    partial.replace(target.output)


def build_migratable() -> None:
    if str(SDK_SRC_DIR) not in sys.path:
        sys.path.insert(0, str(SDK_SRC_DIR))
    from hearth.runtime.asyncify import wasm_opt_path

    targets = migratable_targets()
    if wasm_opt_path() is None:
        print(f"skipped     {len(targets)} migratable examples (no wasm-opt: install binaryen)")
        return
    stale = [t for t in targets if not t.is_up_to_date()]
    for target in targets:
        if target not in stale:
            print(f"up to date  {rel(target.output)}")
    errors: list[str] = []
    # wasm-opt is single-threaded per module; as many at once as the compiles.
    workers = MAX_PARALLEL_COMPILES
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asyncify") as pool:
        futures = [(t, pool.submit(instrument_module, t)) for t in stale]
        for target, future in futures:
            try:
                future.result()
            except BuildError as exc:
                errors.append(str(exc))
            else:
                size = target.output.stat().st_size
                print(f"built       {rel(target.output)} ({size} bytes)")
    if errors:
        raise BuildError("\n\n".join(errors))


def build_model() -> None:
    script_mtime = TRAIN_SCRIPT.stat().st_mtime
    if all(p.exists() and p.stat().st_mtime >= script_mtime for p in DIGITS_OUTPUTS):
        print(f"up to date  {rel(DIGITS_MODEL)}")
        return
    try:
        result = subprocess.run(
            [sys.executable, str(TRAIN_SCRIPT)],
            cwd=REPO_ROOT,
            timeout=TRAIN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{rel(TRAIN_SCRIPT)} took more than {TRAIN_TIMEOUT_S} s") from exc
    if result.returncode != 0:
        raise BuildError(f"{rel(TRAIN_SCRIPT)} failed (exit {result.returncode})")
    print(f"built       {rel(DIGITS_MODEL)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--clean", action="store_true", help="remove build/examples before building"
    )
    args = parser.parse_args(argv)

    if args.clean and BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
        print(f"removed     {rel(BUILD_DIR)}")
    try:
        build_wasm()
        build_migratable()
        build_model()
    except BuildError as exc:
        print(f"build_examples: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
