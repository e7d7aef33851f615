"""Protocol v1 messages: typed, versioned, validated on decode.

Every message is a MessagePack map whose ``type`` key selects the struct below and whose ``v``
key is the schema version (``PROTOCOL_VERSION``). Binary fields (stdin, tensors, module bytes)
are MessagePack ``bin``: they never take a detour through base64. docs/protocol.md is the same
contract written for implementers in other languages; tests/test_protocol_doc.py keeps the two in
step.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from hearth.errors import ErrorCode
from hearth.protocol.vision import Image, PipelineResult, Postprocess, Preprocess

__all__ = [
    "PROTOCOL_VERSION",
    "Accepted",
    "AppUsage",
    "BlobChunk",
    "BlobStored",
    "CallJob",
    "CallResult",
    "DataClass",
    "Describe",
    "Described",
    "Dtype",
    "Error",
    "FrameDropped",
    "GatewayStatus",
    "NeedBlob",
    "Notification",
    "OnnxJob",
    "OnnxResult",
    "Ping",
    "PipelineJob",
    "PipelineReply",
    "Pong",
    "Reply",
    "Request",
    "Requirements",
    "RunAck",
    "RunCheckpoint",
    "RunControl",
    "RunMoved",
    "RunResult",
    "RunResume",
    "RunStart",
    "SessionClose",
    "SessionClosed",
    "Task",
    "TaskControl",
    "TaskInfo",
    "TaskInstall",
    "TaskList",
    "TaskListResult",
    "Tensor",
    "TensorInfo",
    "Timing",
    "Trigger",
    "Usage",
    "UsageResult",
    "WasmExport",
    "WasmImport",
    "WasmJob",
    "WasmResult",
]

PROTOCOL_VERSION = 1

DataClass = Literal["private", "public"]

# A sha256 digest as 64 lowercase hex characters: how modules and models are named forever.
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
# Job ids are chosen by the device and scoped to it; keep them safe inside topics and logs.
JobId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.-]{1,64}$")]

Dtype = Literal[
    "float32", "float64", "float16", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
]  # fmt: skip
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


# Capability names ("vision.faces"); stream and session names chosen by the device.
Capability = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*){1,3}$")]
# The application a job is for (docs/quotas.md): quotas are kept per device and per application.
AppName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.-]{1,64}$")]
Accelerator = Literal["cpu", "gpu", "npu"]


class Requirements(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a job needs of wherever it runs (docs/quotas.md). A gateway that cannot meet it
    refuses the job with ``unsatisfiable`` before anything is stored, so the device tries
    elsewhere. Unknown keys and absurd values are ``malformed``."""

    accelerator: Accelerator | None = None  # "cpu" is met everywhere
    memory_mb: Annotated[int, msgspec.Meta(ge=1, le=1_048_576)] | None = None  # MiB per job
    capability: Capability | None = None  # a capability the gateway provides ("vision.plate")
    max_latency_ms: Annotated[float, msgspec.Meta(ge=1, le=3_600_000)] | None = None


# Optional job fields: left out of the message when not set (msgspec.UNSET), so a job that
# states neither encodes exactly as before they existed.
Requires = Requirements | msgspec.UnsetType
App = AppName | msgspec.UnsetType


class _Message(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    v: int = PROTOCOL_VERSION


class Tensor(msgspec.Struct, frozen=True):
    """A dense tensor: little-endian, C order, ``data`` is exactly prod(shape) * itemsize bytes."""

    name: str
    dtype: Dtype
    shape: list[NonNegative]
    data: bytes


class Timing(msgspec.Struct, frozen=True):
    """Where the gateway spent a job's time, in milliseconds."""

    queue_ms: float = 0.0
    run_ms: float = 0.0
    # The upstream (cloud-tier) gateway that ran a public job this gateway forwarded, or the
    # paired LAN peer gateway that ran a job this saturated gateway forwarded; then the times
    # are that gateway's. Empty: this gateway ran it.
    upstream: str = ""
    # Why it ran there (this gateway's placement decision), when it was forwarded to a peer;
    # absent otherwise (so an answer run here is as it was).
    reason: str | msgspec.UnsetType = msgspec.UNSET


# --- requests: device -> gateway, on hearth/v1/gw/{gateway}/req/{client} ---------------------


class Ping(_Message, frozen=True, tag="ping"):
    """Round-trip probe; answered with Pong. Devices use it to measure latency and load."""


class WasmJob(_Message, frozen=True, tag="wasm"):
    """Run a WASI command module (named by hash) with args and stdin."""

    job_id: JobId
    module: Sha256
    args: list[str] = []
    stdin: bytes = b""
    data_class: DataClass = "private"
    requires: Requires = msgspec.UNSET
    app: App = msgspec.UNSET


class OnnxJob(_Message, frozen=True, tag="onnx"):
    """Run an ONNX model (named by hash) on named input tensors."""

    job_id: JobId
    model: Sha256
    inputs: list[Tensor]
    outputs: list[str] = []  # empty: all of the model's outputs
    data_class: DataClass = "private"
    requires: Requires = msgspec.UNSET
    app: App = msgspec.UNSET


StreamName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.-]{1,64}$")]
ParamValue = str | int | float | bool | list[float]
Params = Annotated[dict[str, ParamValue], msgspec.Meta(max_length=32)]


class CallJob(_Message, frozen=True, tag="call"):
    """Call a capability the gateway provides as trusted native code (``vision.faces``...; the
    list is in the gateway's status). ``params`` are checked against the capability's own
    parameter set (``bad_params``).

    ``stream`` marks the image as one frame of a camera stream: the gateway keeps at most one
    waiting frame per stream (a newer frame replaces it, answered with ``frame_dropped``), and
    ``vision.motion`` keeps its background model per stream. ``session`` names a stateful
    session (``vision.odometry``): opened by its first frame, closed by ``session_close`` or by
    the gateway after the session's idle timeout."""

    job_id: JobId
    capability: Capability
    image: Image | None = None
    params: Params = {}
    stream: StreamName | None = None
    session: StreamName | None = None
    data_class: DataClass = "private"
    requires: Requires = msgspec.UNSET
    app: App = msgspec.UNSET


class SessionClose(_Message, frozen=True, tag="session_close"):
    """Close a session of this device; answered with ``session_closed`` (also when the session
    had already been closed, so a retry is harmless)."""

    session: StreamName


class PipelineJob(_Message, frozen=True, tag="pipeline"):
    """Run an ONNX model (named by hash) on an image: the gateway decodes it, applies ``pre``
    to make the input tensor ``input`` (empty: the model's first input), runs the model and
    applies ``post`` to its output."""

    job_id: JobId
    model: Sha256
    image: Image
    pre: Preprocess
    post: Postprocess = Postprocess()
    input: str = ""
    data_class: DataClass = "private"
    requires: Requires = msgspec.UNSET
    app: App = msgspec.UNSET


class BlobChunk(_Message, frozen=True, tag="blob"):
    """One chunk of a content-addressed upload. Chunks are sent in order; the gateway answers
    the last one (``offset + len(data) == size``) with BlobStored, or any one with an Error.

    ``data_class`` labels the blob (the label of the job or task that needs it): the gateway
    keeps the label of its first complete upload, and a private blob is never forwarded."""

    sha256: Sha256
    size: NonNegative
    offset: NonNegative
    data: bytes
    data_class: DataClass = "private"
    app: App = msgspec.UNSET


# --- persistent tasks (docs/tasks.md) ------------------------------------------------------

TaskId = Annotated[str, msgspec.Meta(pattern="^t-[0-9a-f]{12}$")]
TaskName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.-]{1,64}$")]
TopicFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Trigger(msgspec.Struct, frozen=True, kw_only=True):
    """What wakes a task: messages on an MQTT topic filter, or a timer."""

    topic: TopicFilter | None = None
    every_s: Annotated[float, msgspec.Meta(ge=0.05)] | None = None


class TaskInstall(_Message, frozen=True, tag="task_install"):
    """Install a persistent task: a WASM reactor module (docs/tasks.md) kept alive by the
    gateway. ``read`` defaults to the trigger topics; every trigger topic must be covered by
    it. Answered with ``task`` (or need_blob / error)."""

    name: TaskName
    module: Sha256
    triggers: list[Trigger]
    read: list[TopicFilter] = []
    publish: list[TopicFilter] = []
    expires_at: float | None = None  # unix seconds
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None  # since owner last seen
    config: dict[str, str] = {}  # initial key-value state
    checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 1  # events between checkpoints
    checkpoint_every_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Its config, state and the messages it handles: a cloud tier installs only public tasks.
    data_class: DataClass = "private"
    app: App = msgspec.UNSET


class TaskControl(_Message, frozen=True, tag="task_control"):
    task_id: TaskId
    action: Literal["show", "pause", "resume", "cancel"]


class TaskList(_Message, frozen=True, tag="task_list"):
    pass


# --- migratable runs (docs/migration.md) ----------------------------------------------------


class RunStart(_Message, frozen=True, tag="run_start"):
    """Start a migratable run of an instrumented WASI command module (docs/migration.md).

    Answered, on the same correlation, by ``run_checkpoint`` messages while it runs (every
    ``checkpoint_every_s`` or ``checkpoint_every_mib`` of I/O progress, whichever first; 0: the
    gateway's policy) and then by exactly one of ``run_result``
    (it finished here), ``run_moved`` (it stopped here and its snapshot is in the reply: the
    device continues it) or ``error``. ``run_id`` names the run wherever it goes; ``job_id``
    names this hop of it (a new one each time the run arrives), with a job's idempotency."""

    job_id: JobId
    run_id: JobId
    module: Sha256
    args: list[str] = []
    stdin: bytes = b""
    data_class: DataClass = "private"
    app: App = msgspec.UNSET
    checkpoint_every_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    checkpoint_every_mib: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Flow control of what the hop sends before its answer (docs/migration.md §8.4): at most
    # this many bytes of run_round, run_chunk and run_checkpoint payload not yet acknowledged
    # by run_control "received"; 0: the device does not acknowledge, nothing waits.
    window_bytes: NonNegative = 0


class RunResume(_Message, frozen=True, tag="run_resume"):
    """Continue a run from a snapshot uploaded as a blob (``blob`` messages, like a module).
    Answered like ``run_start``. The snapshot names its module; the gateway asks for the
    module with ``need_blob`` if it lacks it."""

    job_id: JobId
    run_id: JobId
    module: Sha256
    snapshot: Sha256
    data_class: DataClass = "private"
    app: App = msgspec.UNSET
    checkpoint_every_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    checkpoint_every_mib: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    window_bytes: NonNegative = 0  # as in RunStart


class Describe(_Message, frozen=True, tag="describe"):
    """What a stored blob offers: an ONNX model's inputs and outputs, a WebAssembly module's
    imports and exports. Answered with ``described`` (or ``need_blob`` / ``error``); nothing
    is journaled, and the blob is opened in a worker, as a job's would be."""

    job_id: JobId  # labels the answer (and a need_blob); not journaled
    blob: Sha256


class RunControl(_Message, frozen=True, tag="run_control"):
    """Act on a run of this device that is running on the gateway: ``migrate`` stops it at
    its next migration point and answers its start with ``run_moved``; ``checkpoint`` sends
    a ``run_checkpoint`` at once; ``cancel`` ends it (its start is answered ``cancelled``).
    Answered with ``run_ack``, or ``no_run`` when the gateway holds no such running run.
    ``received`` (not answered): the device has taken in ``received`` bytes of the hop's
    run_round, run_chunk and run_checkpoint payloads (a round counts once applied): the
    acknowledgement that flow control (``window_bytes``) waits for."""

    run_id: JobId
    action: Literal["migrate", "checkpoint", "cancel", "received"]
    received: NonNegative = 0  # with "received": bytes, all the hop's so far


class Usage(_Message, frozen=True, tag="usage"):
    """This device's usage of the gateway (docs/quotas.md), by application; answered with
    ``usage_result``."""


Request = (
    Ping
    | WasmJob
    | OnnxJob
    | CallJob
    | PipelineJob
    | SessionClose
    | BlobChunk
    | TaskInstall
    | TaskControl
    | TaskList
    | RunStart
    | RunResume
    | RunControl
    | Describe
    | Usage
)


# --- replies: gateway -> device, on the request's Response Topic ------------------------------


class Pong(_Message, frozen=True, tag="pong"):
    gateway_id: str
    queue_depth: int
    workers: int
    load: float  # jobs queued or running per worker


class WasmResult(_Message, frozen=True, tag="wasm_result"):
    job_id: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    timing: Timing = Timing()


class OnnxResult(_Message, frozen=True, tag="onnx_result"):
    job_id: str
    outputs: list[Tensor]
    provider: str  # the onnxruntime execution provider that ran it
    timing: Timing = Timing()


class CallResult(_Message, frozen=True, tag="call_result"):
    """A capability's answer: ``result`` has the shape of the capability's result struct
    (hearth.protocol.vision.CAPABILITIES; docs/vision.md). ``dropped`` counts the frames of
    this call's stream dropped so far (0 outside streams)."""

    job_id: str
    capability: str
    version: str
    result: dict[str, Any]
    timing: Timing = Timing()
    dropped: int = 0
    # The execution providers that ran the capability's ONNX models, comma-separated when they
    # differ (vision.plate: detector first); "" for a capability without a model, or from a
    # gateway older than this field.
    provider: str = ""


class FrameDropped(_Message, frozen=True, tag="frame_dropped"):
    """A stream frame that was still waiting when a newer frame of its stream arrived: it was
    not processed (latest frame wins). ``dropped`` is the stream's running total."""

    job_id: str
    stream: str
    dropped: int


class SessionClosed(_Message, frozen=True, tag="session_closed"):
    session: str
    frames: int  # frames the session processed (0 when it was unknown or already closed)


class PipelineReply(_Message, frozen=True, tag="pipeline_result"):
    """``result`` from the postprocessing; ``outputs`` holds the raw output tensors only when
    ``post.kind`` is ``none``."""

    job_id: str
    result: PipelineResult
    provider: str
    outputs: list[Tensor] = []
    timing: Timing = Timing()


class NeedBlob(_Message, frozen=True, tag="need_blob"):
    """The job names a blob the gateway does not hold: upload it, then send the job again."""

    job_id: str
    sha256: str
    max_chunk: int  # bytes of ``data`` per BlobChunk the gateway accepts
    # A pool member answering a job sent to its pool: upload the blob to this gateway's own
    # request topic, and send the job again there (a chunk sent to the pool would reach any
    # member). Absent: the gateway the request was sent to (so a plain need_blob is as it was).
    gateway_id: str | msgspec.UnsetType = msgspec.UNSET


class Accepted(_Message, frozen=True, tag="accepted"):
    """A pool member took a job sent to its pool (``hearth/v1/gw/{pool}/req/{client}``) and
    journaled it: the job's answer follows from ``gateway_id``, and any re-send of ``job_id``
    goes to that member's own request topic, whose journal answers it at most once. Sent only
    for jobs that came through a pool."""

    job_id: str
    gateway_id: str  # the member that holds the job


class BlobStored(_Message, frozen=True, tag="blob_stored"):
    sha256: str
    size: int


class Error(_Message, frozen=True, tag="error"):
    code: ErrorCode
    message: str
    job_id: str | None = None
    # quota_exceeded: which quota ("cpu_s_per_day"...) and when it resets (unix seconds; left
    # out when usage falls by itself: a job ending, a blob or task removed). Left out elsewhere.
    quota: str | msgspec.UnsetType = msgspec.UNSET
    resets_at: float | msgspec.UnsetType = msgspec.UNSET


class RunResult(_Message, frozen=True, tag="run_result"):
    """A migratable run finished: its whole output (from its first start, wherever it ran),
    and ``hops``, every place it ran, oldest first."""

    job_id: str
    run_id: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    hops: list[str]
    fuel_used: int = 0
    timing: Timing = Timing()


class RunMoved(_Message, frozen=True, tag="run_moved"):
    """The run stopped on this gateway and goes on elsewhere: ``snapshot`` is the snapshot
    file (docs/migration.md); ``reason`` says why (asked by the device, gateway stopping,
    gateway overloaded). ``to``: where the gateway's placement sends it next, the broker
    address of its upstream gateway (a saturated gateway, a public run); "": its device."""

    job_id: str
    run_id: str
    snapshot: bytes
    reason: str
    to: str = ""
    snapshot_sha256: str = ""  # set, with ``snapshot`` empty: it came as run_chunk messages
    # The source's time.monotonic() when the run stopped (downtime, measured on one machine).
    paused_at: float = 0.0


class RunRound(_Message, frozen=True, tag="run_round"):
    """A pre-copy round of a run about to leave the gateway (docs/migration.md §7, §8.4): its
    memory, or what changed of it since the previous round, sent while the run goes on. The
    device applies rounds in order to an instance it holds ready; the ``run_moved`` that ends
    the hop then carries a delta against them (``precopy_rounds`` > 0 in the snapshot)."""

    job_id: str
    run_id: str
    round: bytes  # a pre-copy round file (docs/migration.md §4.6)
    round_sha256: str = ""  # set, with ``round`` empty: it came as run_chunk messages


class RunChunk(_Message, frozen=True, tag="run_chunk"):
    """One piece of a snapshot too large for one message, on the hop's correlation before the
    ``run_moved`` or ``run_checkpoint`` that names it (``snapshot_sha256``); in order, from
    offset 0, like a blob's chunks."""

    job_id: str
    run_id: str
    sha256: Sha256
    size: NonNegative
    offset: NonNegative
    data: bytes


class RunCheckpoint(_Message, frozen=True, tag="run_checkpoint"):
    """A periodic (or asked-for) snapshot of a run still going on: a device keeps the latest,
    and resumes from it if the gateway dies."""

    job_id: str
    run_id: str
    seq: int
    snapshot: bytes
    snapshot_sha256: str = ""  # as in run_moved


class RunAck(_Message, frozen=True, tag="run_ack"):
    run_id: str
    action: str


class TensorInfo(msgspec.Struct, frozen=True):
    """An ONNX model's input or output as onnxruntime reports it."""

    name: str
    dtype: str  # a Dtype name; another onnxruntime type as it names it, e.g. "seq(tensor(float))"
    shape: list[int | str]  # a dimension's size, or its symbolic name ("" when it has none)


class WasmImport(msgspec.Struct, frozen=True):
    module: str
    name: str
    kind: str  # "func", "memory", "table" or "global"


class WasmExport(msgspec.Struct, frozen=True):
    name: str
    kind: str  # "func", "memory", "table" or "global"


class Described(_Message, frozen=True, tag="described"):
    """The answer to ``describe``: ``kind`` says which fields are filled (``inputs`` and
    ``outputs`` for a model, ``imports`` and ``exports`` for a module)."""

    job_id: str
    blob: str
    kind: Literal["onnx", "wasm"]
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    imports: list[WasmImport] = []
    exports: list[WasmExport] = []


class TaskInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A task as ``show`` and ``list`` report it."""

    task_id: str
    name: str
    owner: str
    state: Literal["running", "paused", "suspended", "cancelled", "expired"]
    reason: str = ""  # why it is suspended, cancelled or expired
    created_at: float = 0.0
    expires_at: float | None = None
    idle_timeout_s: float | None = None
    triggers: list[Trigger] = []
    read: list[str] = []
    publish: list[str] = []
    data_class: DataClass = "private"  # from the install; tasks stored before labels: private
    events: int = 0  # handled
    failures: int = 0
    publishes: int = 0
    refused: int = 0  # publishes refused by the grants
    dropped: int = 0  # events not delivered (paused, suspended, backlog full)
    last_event_at: float | None = None
    last_error: str = ""
    fuel_used: int = 0
    memory_bytes: int = 0
    checkpoint_bytes: int = 0


class Task(_Message, frozen=True, tag="task"):
    task: TaskInfo


class TaskListResult(_Message, frozen=True, tag="task_list_result"):
    tasks: list[TaskInfo]


class AppUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One application of one device on a gateway (docs/quotas.md): the run time of its jobs
    on the UTC day ``day``, and what it holds now."""

    client_id: str
    app: str
    day: str  # "2026-12-04", UTC
    cpu_s: float = 0.0  # run time of its jobs that day, seconds (what cpu_s_per_day counts)
    jobs: int = 0  # jobs run that day
    stored_bytes: int = 0  # blobs it uploaded that are still stored
    tasks: int = 0  # tasks it installed that are still installed


class UsageResult(_Message, frozen=True, tag="usage_result"):
    usage: list[AppUsage]


Reply = (
    Pong
    | WasmResult
    | OnnxResult
    | CallResult
    | PipelineReply
    | FrameDropped
    | SessionClosed
    | NeedBlob
    | BlobStored
    | Error
    | Accepted
    | Task
    | TaskListResult
    | RunResult
    | RunMoved
    | RunCheckpoint
    | RunChunk
    | RunRound
    | RunAck
    | Described
    | UsageResult
)


class Notification(_Message, frozen=True, tag="notify"):
    """From a task to its owner, on hearth/v1/dev/{owner}/notify (QoS 1: a device with a
    persistent session gets the ones sent while it slept)."""

    task_id: str
    name: str
    message: str
    at: float  # unix seconds


# --- retained status: hearth/v1/gw/{gateway}/status -------------------------------------------


class GatewayStatus(_Message, frozen=True, tag="status"):
    """Retained on the status topic. The gateway's MQTT Last Will publishes the same message with
    ``state="offline"`` so devices learn at once that a gateway died."""

    gateway_id: str
    state: Literal["online", "offline"]
    version: str = ""
    tier: Literal["home", "cloud"] = "home"  # a cloud tier refuses private work
    runners: list[str] = []
    providers: list[str] = []  # onnxruntime execution providers, best first
    accelerators: list[str] = []  # what ``requires.accelerator`` can name here: "cpu", "gpu"...
    memory_mb: int = 0  # memory one job may use here, MiB (0: not said)
    capabilities: dict[str, str] = {}  # name -> version, e.g. "vision.faces"
    frames_dropped: int = 0  # stream frames replaced by newer ones (latest frame wins)
    workers: int = 0
    queue_depth: int = 0
    load: float = 0.0
    max_message_bytes: int = 0
    started_at: float = 0.0  # unix seconds
