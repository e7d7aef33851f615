"""Encryption at rest: what the gateway stores for devices (job requests and answers, task
checkpoints, key-value state and queued events) is sealed with AES-256-GCM.

The key is a systemd credential (``LoadCredential=hearth-at-rest.key:...`` puts it in
``$CREDENTIALS_DIRECTORY``) when the service has one, else a 0600 file in the state directory,
created on first start. Each sealed value is bound to where it is stored (the associated data
names the table, column and row), so a value copied into another row does not open.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hearth_gateway import _systemd
from hearth_gateway.errors import GatewayError

__all__ = ["CREDENTIAL_NAME", "SealError", "Sealer"]

CREDENTIAL_NAME = "hearth-at-rest.key"
_VERSION = b"\x01"  # format of a sealed value: version, 12-byte nonce, ciphertext + tag
_NONCE = 12


class SealError(GatewayError):
    """A stored value did not open: a wrong key, or the database was tampered with."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SealError("the at-rest key must be 32 bytes")
        self._aead = AESGCM(key)
        self._key = key

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> Sealer:
        credentials = _systemd.credentials_dir()
        if credentials is not None and (credentials / CREDENTIAL_NAME).is_file():
            return cls((credentials / CREDENTIAL_NAME).read_bytes()[:32])
        path = state_dir / "keys" / "at-rest.key"
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        return cls(path.read_bytes())

    def derive(self, label: bytes) -> bytes:
        """A 32-byte key of its own for ``label`` (HKDF-SHA256 of the at-rest key): handed to
        a worker that must open one sealed file, it opens nothing else."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(self._key)

    def seal(self, data: bytes, where: bytes) -> bytes:
        if not data:
            return b""
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, data, where)

    def open(self, sealed: bytes | None, where: bytes) -> bytes:
        if not sealed:
            return b""
        if sealed[:1] != _VERSION or len(sealed) < 1 + _NONCE + 16:
            raise SealError(f"not a sealed value ({where.decode(errors='replace')})")
        try:
            return self._aead.decrypt(sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :], where)
        except InvalidTag:
            raise SealError(f"stored value does not open ({where.decode(errors='replace')})"
                            ) from None  # fmt: skip
