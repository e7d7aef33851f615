"""The persistent-task runner: one event of one task, from its checkpoint to its next one.

A task is a WASI reactor module (docs/tasks.md). For each event the worker instantiates the
module, restores linear memory and exported globals from the checkpoint (or calls
``_initialize`` the first time), hands the event to ``hearth_on_event``, and returns the new
checkpoint with the actions the task asked for. The worker keeps no state between events, so a
task survives any worker's (or the daemon's) death at its last checkpoint.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import wasmtime

from hearth.errors import ErrorCode, JobError
from hearth.protocol import Reply
from hearth.runtime.wasm import WasmRuntime
from hearth_gateway.policy import task_topic_error, topic_matches
from hearth_gateway.runners import TaskAction, TaskEvent, TaskOutcome, WorkerSettings, WorkItem

__all__ = ["TaskRunner"]

_KV_MAX_KEYS = 64
_KV_MAX_KEY = 64  # bytes
_KV_MAX_VALUE = 4096  # bytes
_OK, _DENIED, _INVALID = 0, -1, -2

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()


class _Snapshot(msgspec.Struct):
    memory: bytes
    globals: dict[str, int | float]


class _Event:
    """The host side of one event: what the guest's imports read and write."""

    def __init__(self, event: TaskEvent, max_actions: int, max_payload: int) -> None:
        self.grants = event.publish
        self.kv = dict(event.kv)
        self.actions: list[TaskAction] = []
        self.max_actions = max_actions
        self.max_payload = max_payload

    def act(self, action: TaskAction) -> bool:
        if len(self.actions) >= self.max_actions:
            return False
        self.actions.append(action)
        return True


class TaskRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        self._limits = settings.task_limits
        self._max_actions = settings.task_max_actions
        self._max_payload = settings.task_max_payload
        # Tasks are reactors with their own host API (docs/tasks.md); wasi-nn is for jobs.
        self._runtime = WasmRuntime(cache_dir=Path(settings.cache_dir) / "tasks", wasi_nn=None)
        self._event: _Event | None = None
        self._define_host(self._runtime.linker)

    # -- host functions (module "hearth") ------------------------------------------------------

    def _define_host(self, linker: wasmtime.Linker) -> None:
        def func(
            name: str, params: list[wasmtime.ValType], results: list[wasmtime.ValType], fn: Any
        ) -> None:
            linker.define_func(
                "hearth", name, wasmtime.FuncType(params, results), fn, access_caller=True
            )

        func("publish", [_I32] * 4, [_I32], self._publish)
        func("notify", [_I32] * 2, [_I32], self._notify)
        func("kv_get", [_I32] * 4, [_I32], self._kv_get)
        func("kv_set", [_I32] * 4, [_I32], self._kv_set)
        func("now_ms", [], [_I64], lambda _caller: int(time.time() * 1000))
        func("log", [_I32] * 2, [], self._log)

    @staticmethod
    def _read(caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory) or ptr < 0 or length < 0:
            return None
        if ptr + length > memory.data_len(caller):
            return None
        return bytes(memory.read(caller, ptr, ptr + length))

    def _publish(self, caller: wasmtime.Caller, tp: int, tl: int, pp: int, pl: int) -> int:
        event = self._event
        topic_bytes, payload = self._read(caller, tp, tl), self._read(caller, pp, pl)
        if event is None or topic_bytes is None or payload is None:
            return _INVALID
        try:
            topic = topic_bytes.decode()
        except UnicodeDecodeError:
            return _INVALID
        if task_topic_error(topic, is_filter=False) or len(payload) > event.max_payload:
            return _INVALID
        allowed = any(topic_matches(grant, topic) for grant in event.grants)
        # Refusals are recorded too: the daemon audits them (and re-checks the grants itself).
        if not event.act(TaskAction("publish" if allowed else "refused", topic, payload)):
            return _INVALID
        return _OK if allowed else _DENIED

    def _notify(self, caller: wasmtime.Caller, ptr: int, length: int) -> int:
        event = self._event
        message = self._read(caller, ptr, length)
        if event is None or message is None or length > 4096:
            return _INVALID
        return _OK if event.act(TaskAction("notify", "", message)) else _INVALID

    def _log(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        event = self._event
        message = self._read(caller, ptr, min(length, 1024))
        if event is not None and message is not None:
            event.act(TaskAction("log", "", message))

    def _kv_get(self, caller: wasmtime.Caller, kp: int, kl: int, bp: int, bl: int) -> int:
        event = self._event
        key = self._read(caller, kp, kl)
        if event is None or key is None:
            return _INVALID
        value = event.kv.get(key.decode(errors="replace"))
        if value is None:
            return _DENIED
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        n = min(len(value), max(0, bl))
        if n and (bp < 0 or bp + n > memory.data_len(caller)):
            return _INVALID
        if n:
            memory.write(caller, value[:n], bp)
        return len(value)

    def _kv_set(self, caller: wasmtime.Caller, kp: int, kl: int, vp: int, vl: int) -> int:
        event = self._event
        key_bytes = self._read(caller, kp, kl)
        if event is None or key_bytes is None or not 0 < kl <= _KV_MAX_KEY:
            return _INVALID
        key = key_bytes.decode(errors="replace")
        if vl == -1:
            event.kv.pop(key, None)
            return _OK
        value = self._read(caller, vp, vl)
        if value is None or vl > _KV_MAX_VALUE:
            return _INVALID
        if key not in event.kv and len(event.kv) >= _KV_MAX_KEYS:
            return _INVALID
        event.kv[key] = value
        return _OK

    # -- one event -----------------------------------------------------------------------------

    def run(self, item: WorkItem) -> Reply | TaskOutcome:
        event = item.job
        assert isinstance(event, TaskEvent)
        try:
            return self._run(event, Path(item.blob_path))
        except JobError as exc:
            return TaskOutcome(ok=False, code=str(exc.code), error=exc.message)
        except OSError as exc:
            return TaskOutcome(
                ok=False, code=str(ErrorCode.INTERNAL), error=f"module unreadable: {exc.strerror}"
            )

    def _run(self, event: TaskEvent, path: Path) -> TaskOutcome:
        module = self._runtime.module(event.module, path=path)
        store = wasmtime.Store(self._runtime.engine)
        store.set_fuel(self._limits.fuel)
        store.set_limits(memory_size=self._limits.memory_bytes)
        store.set_wasi(wasmtime.WasiConfig())  # nothing granted: no files, env, args or stdio
        host = _Event(event, self._max_actions, self._max_payload)
        self._event = host
        try:
            instance = self._runtime.linker.instantiate(store, module)
            exports = instance.exports(store)
            memory = exports.get("memory")
            handler = exports.get("hearth_on_event")
            alloc = exports.get("hearth_alloc")
            if not (
                isinstance(memory, wasmtime.Memory)
                and isinstance(handler, wasmtime.Func)
                and isinstance(alloc, wasmtime.Func)
            ):
                raise JobError(
                    ErrorCode.INVALID_MODULE,
                    "not a Hearth task: needs memory, hearth_alloc, hearth_on_event",
                )
            if event.state:
                self._restore(store, exports, memory, event.state)
            else:
                init = exports.get("_initialize")
                if isinstance(init, wasmtime.Func):
                    init(store)
            topic = event.topic.encode()
            topic_ptr = self._place(store, alloc, memory, topic)
            payload_ptr = self._place(store, alloc, memory, event.payload)
            rc = handler(store, event.kind, topic_ptr, len(topic), payload_ptr, len(event.payload))
            if rc != 0:
                raise JobError(ErrorCode.TRAP, f"hearth_on_event returned {rc}")
            state = self._snapshot(store, exports, memory)
            return TaskOutcome(
                ok=True,
                state=state,
                kv=host.kv,
                actions=host.actions,
                fuel_used=self._limits.fuel - store.get_fuel(),
                memory_bytes=memory.data_len(store),
            )
        except wasmtime.Trap as exc:
            code = (
                ErrorCode.TIMEOUT
                if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL
                else (ErrorCode.TRAP)
            )
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise JobError(code, lines[-1][:300] if lines else "trap") from None
        except wasmtime.WasmtimeError as exc:
            text = str(exc).strip().splitlines()
            raise JobError(ErrorCode.INVALID_MODULE, text[0][:300] if text else "error") from None
        finally:
            self._event = None
            store.close()  # now, on this thread (see hearth.runtime.wasm)

    @staticmethod
    def _place(
        store: wasmtime.Store, alloc: wasmtime.Func, memory: wasmtime.Memory, data: bytes
    ) -> int:
        if not data:
            return 0
        ptr = alloc(store, len(data))
        if not isinstance(ptr, int) or ptr <= 0 or ptr + len(data) > memory.data_len(store):
            raise JobError(ErrorCode.TRAP, "hearth_alloc failed")
        memory.write(store, data, ptr)
        return ptr

    @staticmethod
    def _snapshot(store: wasmtime.Store, exports: Any, memory: wasmtime.Memory) -> bytes:
        globals_: dict[str, int | float] = {}
        for name, value in exports.items():
            if isinstance(value, wasmtime.Global) and value.type(store).mutable:
                globals_[name] = value.value(store)
        snap = _Snapshot(
            memory=bytes(memory.read(store, 0, memory.data_len(store))), globals=globals_
        )
        # Level 1: most of a small task's memory is zeros; compressing costs well under a ms.
        return zlib.compress(msgspec.msgpack.encode(snap), 1)

    @staticmethod
    def _restore(
        store: wasmtime.Store, exports: Any, memory: wasmtime.Memory, state: bytes
    ) -> None:
        snap = msgspec.msgpack.decode(zlib.decompress(state), type=_Snapshot)
        missing = len(snap.memory) - memory.data_len(store)
        if missing > 0:
            try:
                memory.grow(store, -(-missing // 65536))
            except wasmtime.WasmtimeError:
                raise JobError(
                    ErrorCode.MEMORY_LIMIT, "the checkpoint's memory is over the task limit"
                ) from None
        memory.write(store, snap.memory, 0)
        for name, value in snap.globals.items():
            glob = exports.get(name)
            if isinstance(glob, wasmtime.Global):
                glob.set_value(store, value)

    def describe(self) -> dict[str, list[str]]:
        return {}

    def close(self) -> None:
        self._runtime.close()
