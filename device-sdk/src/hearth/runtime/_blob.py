"""Module and model bytes, checked against the sha256 that names them every time they are
loaded: a blob changed on disk (corruption, tampering) is refused, not run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hearth.errors import ErrorCode, JobError

__all__ = ["WASM_MAGIC", "verified_bytes"]

# How every binary WebAssembly module begins (then its version, checked by wasmtime). Modules
# are binary only (docs/protocol.md §7.1); the gateway's daemon reads this much of a blob to
# tell a module from a model, without importing wasmtime.
WASM_MAGIC = b"\0asm"


def verified_bytes(
    sha256: str, data: bytes | None, path: Path | None, *, what: str, missing: ErrorCode
) -> bytes:
    """``data`` (or the file at ``path``) if it hashes to ``sha256``; JobError ``missing``
    when there is neither, ``hash_mismatch`` when the bytes are not what the hash names."""
    if data is None:
        if path is None:
            raise JobError(missing, f"{what} {sha256} not loaded")
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise JobError(ErrorCode.HASH_MISMATCH, f"{what} bytes do not match their sha256")
    return data
