"""Exceptions raised by the Hearth device SDK, and the error codes of the wire protocol.

The tree::

    HearthError                     root: catch this to catch everything the SDK raises
    ├── ProtocolError               a message could not be encoded or decoded
    ├── JobError                    a job failed; ``code`` is the wire ErrorCode
    │   └── QuotaExceeded           quota_exceeded: ``quota`` says which, ``resets_at`` when
    ├── GatewayUnavailable          no gateway could be reached (or it went away mid-job and
    │   │                           did not come back within the call's deadline)
    │   └── NotPaired               the gateway serves paired devices only (TLS) and this
    │       │                       device is not paired with it: ``command`` says how to pair
    │       └── GatewayIdentityChanged  its CA is not the one pinned at pairing (``old``, ``new``)
    ├── LocalRuntimeUnavailable     local placement asked for, but wasmtime/onnxruntime missing
    └── RequirementsError           a call's ``requires=`` is not valid (also a ValueError);
                                    nothing was sent

``ErrorCode`` is the enum that travels in ``Error`` replies; docs/protocol.md lists the same
values, and a test holds the two together.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "GatewayIdentityChanged",
    "GatewayUnavailable",
    "HearthError",
    "JobError",
    "LocalRuntimeUnavailable",
    "NotPaired",
    "ProtocolError",
    "QuotaExceeded",
    "RequirementsError",
]


class ErrorCode(enum.StrEnum):
    """Error codes sent by a gateway in an ``error`` reply (and raised locally with the same
    meaning). Retryable codes are marked in docs/protocol.md."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    FORBIDDEN = "forbidden"
    HASH_MISMATCH = "hash_mismatch"
    BLOB_INCOMPLETE = "blob_incomplete"
    INVALID_MODULE = "invalid_module"
    INVALID_MODEL = "invalid_model"
    BAD_TENSOR = "bad_tensor"
    BAD_IMAGE = "bad_image"
    BAD_PARAMS = "bad_params"
    UNKNOWN_CAPABILITY = "unknown_capability"
    NO_SESSION = "no_session"
    # A job id this device used before for a job with other content: the gateway refuses it
    # rather than answer it with the other job's result (docs/protocol.md §8).
    CONFLICT = "conflict"
    # Migratable runs (docs/migration.md): a snapshot that is corrupt or truncated, one made
    # for another module, a resume or migrate of a run that has already finished, and a run
    # id that this gateway does not hold.
    BAD_SNAPSHOT = "bad_snapshot"
    SNAPSHOT_MISMATCH = "snapshot_mismatch"
    RUN_FINISHED = "run_finished"
    NO_RUN = "no_run"
    CANCELLED = "cancelled"
    TRAP = "trap"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    WORKER_CRASHED = "worker_crashed"
    OVERLOADED = "overloaded"
    QUOTA_EXCEEDED = "quota_exceeded"
    # The job's ``requires`` cannot be met here (no such accelerator, too little memory, no
    # such capability, too slow now): the device tries another gateway or runs it itself.
    UNSATISFIABLE = "unsatisfiable"
    # The gateway's disk (or the reserve its policy keeps free) is full: nothing that would
    # store bytes (an upload, a job, a task, a snapshot) is taken until space returns.
    STORAGE_FULL = "storage_full"
    # Placement refused the job for its data label: private work that cannot run on this
    # gateway (it never leaves the LAN), or any private work sent to a cloud-tier gateway.
    POLICY_DENIED = "policy_denied"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later (on this or another placement)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.BLOB_INCOMPLETE,
        ErrorCode.WORKER_CRASHED,
        ErrorCode.OVERLOADED,
        ErrorCode.QUOTA_EXCEEDED,
        ErrorCode.STORAGE_FULL,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.INTERNAL,
    }
)


class HearthError(Exception):
    """Root of every exception the SDK raises."""


class ProtocolError(HearthError):
    """A message could not be encoded or decoded; ``code`` says how it was wrong."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class JobError(HearthError):
    """A job failed, on the gateway or locally. ``where`` is "edge" or "local"."""

    def __init__(
        self, code: ErrorCode, message: str, *, job_id: str | None = None, where: str = "edge"
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id
        self.where = where


class QuotaExceeded(JobError):
    """The gateway refused the job: this device or application is at one of its quotas
    (docs/quotas.md). ``quota`` names it ("cpu_s_per_day"...); ``resets_at`` is when it resets
    (unix seconds), None when usage falls by itself (a job of this app ending)."""

    def __init__(
        self, message: str, *, quota: str, resets_at: float | None, job_id: str | None = None
    ) -> None:
        super().__init__(ErrorCode.QUOTA_EXCEEDED, message, job_id=job_id, where="edge")
        self.quota = quota
        self.resets_at = resets_at


class RequirementsError(HearthError, ValueError):
    """A call's ``requires=`` has unknown keys, wrong types or absurd values."""


class GatewayUnavailable(HearthError):
    """No gateway answered, or the connection broke (or the gateway's Last Will fired) mid-job
    and the gateway was not back before the call's deadline."""


class NotPaired(GatewayUnavailable):
    """The gateway serves paired devices only (mutual TLS) and this device has no pairing with
    it: nothing was sent to it. ``command`` is what to run here (after ``hearth-gateway pair``
    on the gateway printed a code)."""

    def __init__(self, message: str, command: str) -> None:
        super().__init__(f"{message}; pair first: {command}")
        self.command = command


class GatewayIdentityChanged(NotPaired):
    """The gateway presents a CA other than the one this device pinned when it paired: its state
    directory was lost or replaced, or another machine answers at its address. ``old`` and
    ``new`` are the SHA-256 fingerprints (hex) of the pinned and the presented CA (``new`` is
    empty when the gateway's certificates could not be read)."""

    def __init__(self, message: str, command: str, *, old: str, new: str) -> None:
        super().__init__(message, command)
        self.old = old
        self.new = new


class LocalRuntimeUnavailable(HearthError):
    """Local execution needs the ``local`` extra: ``pip install 'hearth-device-sdk[local]'``."""
