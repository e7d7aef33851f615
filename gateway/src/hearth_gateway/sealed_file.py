"""Files sealed at rest as they are written, a piece at a time: a migratable run's snapshot
blob (docs/migration.md §9) holds the run's memory, its input and its output, so it is stored
like everything else the gateway keeps for devices (crypto.py), never as plaintext on disk,
not even while its upload is half done.

A sealed file is a header, then records, one per piece written (an upload's chunk):

    magic "\\x89HSEAL\\r\\n" (8 bytes), version 1 (2 bytes, big-endian)
    per record: length (4 bytes, big-endian), then a 12-byte nonce and the AES-256-GCM
    ciphertext with its tag; associated data: the record's index (8 bytes, big-endian)

The key is the file's own (``Sealer.derive`` of a label naming the blob), so the worker that
resumes the run is given that key and opens that file and nothing else. The index in each
record's associated data keeps records in their order; what the file holds in all is checked
by the blob's sha256 after opening, as for any blob.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hearth.errors import ErrorCode, JobError

__all__ = ["SEALED_MAGIC", "SealedWriter", "is_sealed", "open_sealed"]

SEALED_MAGIC = b"\x89HSEAL\r\n"
_HEADER = SEALED_MAGIC + struct.pack(">H", 1)
_LENGTH = struct.Struct(">I")
_INDEX = struct.Struct(">Q")
_NONCE = 12


class SealedWriter:
    """Seals the pieces of one file in order: ``header()`` first, then ``record(piece)``."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._index = 0

    @staticmethod
    def header() -> bytes:
        return _HEADER

    def record(self, piece: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, piece, _INDEX.pack(self._index))
        self._index += 1
        return _LENGTH.pack(len(sealed)) + sealed


def is_sealed(head: bytes) -> bool:
    return head.startswith(SEALED_MAGIC)


def open_sealed(path: Path, key: bytes) -> bytes:
    """The plaintext of a sealed file. Raises JobError(bad_snapshot) for a file that does not
    open with ``key`` (another key, a record changed, moved or cut short)."""
    data = path.read_bytes()
    if not data.startswith(_HEADER):
        raise JobError(ErrorCode.BAD_SNAPSHOT, "stored snapshot: not a sealed file of version 1")
    aead = AESGCM(key)
    pieces: list[bytes] = []
    at = len(_HEADER)
    with memoryview(data) as view:
        while at < len(data):
            if at + _LENGTH.size > len(data):
                raise JobError(ErrorCode.BAD_SNAPSHOT, "stored snapshot: cut short")
            (length,) = _LENGTH.unpack_from(view, at)
            at += _LENGTH.size
            record = view[at : at + length]
            if len(record) != length or length < _NONCE + 16:
                raise JobError(ErrorCode.BAD_SNAPSHOT, "stored snapshot: cut short")
            try:
                nonce, sealed = bytes(record[:_NONCE]), bytes(record[_NONCE:])
                pieces.append(aead.decrypt(nonce, sealed, _INDEX.pack(len(pieces))))
            except InvalidTag:
                raise JobError(
                    ErrorCode.BAD_SNAPSHOT, "stored snapshot does not open (key or contents)"
                ) from None
            at += length
    return b"".join(pieces)
