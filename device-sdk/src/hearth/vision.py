"""Vision on the gateway: one call per capability, camera streams, odometry sessions and ONNX
image pipelines. Mixed into ``hearth.Client``.

These run where the gateway's native code and accelerator are: there is no local fallback (a
device that could run them itself would not offload them). Images are private by default and,
like every private job, only ever sent to a gateway on the LAN.

>>> with hearth.Client() as client:                          # doctest: +SKIP
...     faces = client.faces("door.jpg").result.faces
...     with client.odometry("kitchen-run", fx=525, fy=525) as odo:
...         for frame in frames:
...             pose = odo.track(frame).result
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from hearth._connection import Connection
from hearth._core import ClientCore
from hearth.errors import ErrorCode, GatewayUnavailable, JobError
from hearth.placement import Placement
from hearth.protocol import (
    CallJob,
    CallResult,
    DataClass,
    Error,
    FrameDropped,
    PipelineJob,
    PipelineReply,
    Reply,
    SessionClose,
    SessionClosed,
    Timing,
)
from hearth.protocol.vision import (
    CAPABILITIES,
    FacesResult,
    FeaturesResult,
    Image,
    MotionResult,
    PipelineResult,
    PlateResult,
    PoseResult,
    Postprocess,
    Preprocess,
)

__all__ = [
    "Call",
    "CameraStream",
    "Dropped",
    "ImageSource",
    "OdometrySession",
    "PipelineRun",
    "VisionCalls",
    "as_image",
]

T = TypeVar("T")
ImageSource = Image | bytes | str | Path | Any  # Any: a numpy array (H x W or H x W x 3, uint8)
Param = str | int | float | bool | list[float]


def as_image(source: ImageSource) -> Image:
    """An Image from a file path, a file's bytes (JPEG or PNG), or a numpy uint8 array (BGR or
    grey pixels, sent raw)."""
    if isinstance(source, Image):
        return source
    if isinstance(source, str | Path):
        source = Path(source).read_bytes()
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        if data.startswith(b"\xff\xd8"):
            return Image(format="jpeg", data=data)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return Image(format="png", data=data)
        raise JobError(ErrorCode.BAD_IMAGE, "not a JPEG or PNG file", where="local")
    shape = getattr(source, "shape", None)
    if shape is None or getattr(source, "dtype", None) != "uint8" or len(shape) not in (2, 3):
        raise JobError(
            ErrorCode.BAD_IMAGE, "expected an image file or a uint8 array", where="local"
        )
    channels = 1 if len(shape) == 2 else int(shape[2])
    return Image(
        format="raw",
        data=source.tobytes(),
        width=int(shape[1]),
        height=int(shape[0]),
        channels=channels,
    )


def _plain(value: Any) -> Param:
    """numpy scalars and arrays (an intrinsics matrix's entries, say) as plain values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [float(v) for v in value]
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Call(Generic[T]):
    """A capability's answer, and how it got here."""

    capability: str
    version: str
    result: T
    job_id: str
    latency_ms: float
    gateway_id: str | None
    timing: Timing
    dropped: int = 0  # frames of this call's stream the gateway dropped so far
    where: str = "edge"
    provider: str = ""  # the execution provider(s) that ran its models ("" for none)


@dataclass(frozen=True)
class Dropped:
    """A stream frame the gateway skipped because a newer one arrived first."""

    job_id: str
    stream: str
    dropped: int  # the stream's total so far


@dataclass(frozen=True)
class PipelineRun:
    result: PipelineResult
    provider: str
    outputs: dict[str, Any]  # raw output tensors, only for post kind "none"
    job_id: str
    latency_ms: float
    gateway_id: str | None
    timing: Timing
    where: str = "edge"


def _call_from(reply: Reply, job: CallJob, started: float, gateway_id: str | None) -> Call[Any]:
    if isinstance(reply, Error):
        raise JobError(reply.code, reply.message, job_id=job.job_id, where="edge")
    if not isinstance(reply, CallResult):
        raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
    kind = CAPABILITIES.get(reply.capability)
    try:
        result = msgspec.convert(reply.result, kind) if kind is not None else reply.result
    except msgspec.ValidationError as exc:
        raise JobError(ErrorCode.MALFORMED, f"{reply.capability} result: {exc}") from None
    return Call(
        capability=reply.capability,
        version=reply.version,
        result=result,
        job_id=job.job_id,
        latency_ms=(time.perf_counter() - started) * 1e3,
        gateway_id=gateway_id,
        timing=reply.timing,
        dropped=reply.dropped,
        provider=reply.provider,
    )


class VisionCalls(ClientCore):
    """The vision calls of ``hearth.Client`` (see that class for connection and placement)."""

    def _vision_connection(self, data_class: DataClass) -> Connection:
        private = data_class == "private"
        why = self._off_lan(private, Placement.EDGE)
        if why is None:
            conn = self.connection()
            why = self._off_lan(private, Placement.EDGE)  # a discovered gateway, now known
        if why is not None:
            raise JobError(ErrorCode.FORBIDDEN, why, where="local")
        return conn

    def call(
        self,
        capability: str,
        image: ImageSource | None = None,
        params: Mapping[str, Param] | None = None,
        *,
        stream: str | None = None,
        session: str | None = None,
        data_class: DataClass = "private",
        job_id: str | None = None,
    ) -> Call[Any]:
        """Call a gateway capability (``vision.faces``, ...). Raises JobError with the
        gateway's code (``bad_image``, ``unknown_capability``, ``no_session``...) and
        GatewayUnavailable when no gateway answers."""
        job = CallJob(
            job_id=job_id or uuid.uuid4().hex,
            capability=capability,
            image=as_image(image) if image is not None else None,
            params={key: _plain(value) for key, value in (params or {}).items()},
            stream=stream,
            session=session,
            data_class=data_class,
            app=self._wire_app(),
        )
        conn = self._vision_connection(data_class)
        started = time.perf_counter()
        try:
            # One try: a stream or session frame re-sent after a timeout would run twice.
            reply = conn.request(job, job.job_id.encode(), self.timeout_s)
        except TimeoutError:
            raise GatewayUnavailable(f"no answer to {capability} in {self.timeout_s} s") from None
        return _call_from(reply, job, started, conn.gateway_id)

    def faces(self, image: ImageSource, **params: Param) -> Call[FacesResult]:
        """Face boxes (params: min_size, scale_factor, min_neighbors, max_faces)."""
        return self.call("vision.faces", image, params)

    def features(self, image: ImageSource, **params: Param) -> Call[FeaturesResult]:
        """ORB keypoints and descriptors (params: max_features, fast_threshold...)."""
        return self.call("vision.features", image, params)

    def plate(self, image: ImageSource, **params: Param) -> Call[PlateResult]:
        """License plate text (params: min_score, pattern, max_lines)."""
        return self.call("vision.plate", image, params)

    def motion(self, image: ImageSource, stream: str, **params: Param) -> Call[MotionResult]:
        """Moving regions in one frame of ``stream`` against its background model."""
        return self.call("vision.motion", image, params, stream=stream)

    def odometry(self, session: str | None = None, **params: Param) -> OdometrySession:
        """A visual-odometry session (params: fx, fy, cx, cy: the camera's intrinsics)."""
        return OdometrySession(self, session or f"odo-{uuid.uuid4().hex[:12]}", params)

    def stream(
        self,
        name: str,
        capability: str,
        *,
        data_class: DataClass = "private",
        **params: Param,
    ) -> CameraStream:
        """A camera stream: ``send()`` frames at the camera's rate without waiting; the gateway
        processes the newest and drops what it cannot keep up with."""
        plain = {key: _plain(value) for key, value in params.items()}
        return CameraStream(self, name, capability, plain, data_class)

    def close_session(self, session: str) -> int:
        """Close a session; returns the frames it processed (0 if it was already closed)."""
        conn = self.connection()
        try:
            reply = conn.request(SessionClose(session=session), uuid.uuid4().bytes, self.timeout_s)
        except TimeoutError:
            raise GatewayUnavailable(f"no answer to session_close in {self.timeout_s} s") from None
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message, where="edge")
        if not isinstance(reply, SessionClosed):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return reply.frames

    def pipeline(
        self,
        model: bytes | str | Path,
        image: ImageSource,
        pre: Preprocess,
        post: Postprocess | None = None,
        *,
        input: str = "",
        data_class: DataClass = "private",
        job_id: str | None = None,
    ) -> PipelineRun:
        """Run an ONNX model on an image with pre- and postprocessing done on the gateway: a
        camera sends a JPEG and gets labels or boxes back."""
        from hearth.runtime.onnx import tensor_to_array

        blob = self._blob(model)
        job = PipelineJob(
            job_id=job_id or uuid.uuid4().hex,
            model=blob.sha256,
            image=as_image(image),
            pre=pre,
            post=post or Postprocess(),
            input=input,
            data_class=data_class,
            app=self._wire_app(),
        )
        conn = self._vision_connection(data_class)
        started = time.perf_counter()
        reply = self._submit(conn, job, blob)
        if not isinstance(reply, PipelineReply):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return PipelineRun(
            result=reply.result,
            provider=reply.provider,
            outputs={t.name: tensor_to_array(t) for t in reply.outputs},
            job_id=job.job_id,
            latency_ms=(time.perf_counter() - started) * 1e3,
            gateway_id=conn.gateway_id,
            timing=reply.timing,
        )


class OdometrySession:
    """Frames in, camera poses out; the map lives on the gateway until ``close()`` (or the
    gateway's idle timeout, after which frames get ``no_session``)."""

    def __init__(self, client: VisionCalls, name: str, params: Mapping[str, Param]) -> None:
        self.client = client
        self.name = name
        self.params = dict(params)
        self.closed = False

    def track(self, image: ImageSource) -> Call[PoseResult]:
        return self.client.call("vision.odometry", image, self.params, session=self.name)

    def close(self) -> int:
        """Idempotent; returns the frames the session processed."""
        if self.closed:
            return 0
        self.closed = True
        return self.client.close_session(self.name)

    def __enter__(self) -> OdometrySession:
        return self

    def __exit__(self, *_: object) -> None:
        # If the gateway is gone, it closes the session after its idle timeout anyway.
        with contextlib.suppress(GatewayUnavailable, JobError):
            self.close()


@dataclass
class StreamStats:
    sent: int = 0
    processed: int = 0
    dropped: int = 0  # as reported by the gateway
    failed: int = 0


@dataclass
class CameraStream:
    """Frames of one camera, sent without waiting. Each ``send`` returns a Future that resolves
    to a ``Call`` (processed) or ``Dropped`` (skipped: latest frame wins), or raises
    JobError/GatewayUnavailable."""

    client: VisionCalls
    name: str
    capability: str
    params: dict[str, Param]
    data_class: DataClass = "private"
    stats: StreamStats = field(default_factory=StreamStats)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, image: ImageSource, job_id: str | None = None) -> Future[Call[Any] | Dropped]:
        job = CallJob(
            job_id=job_id or uuid.uuid4().hex,
            capability=self.capability,
            image=as_image(image),
            params=self.params,
            stream=self.name,
            data_class=self.data_class,
            app=self.client._wire_app(),
        )
        conn = self.client._vision_connection(self.data_class)
        outcome: Future[Call[Any] | Dropped] = Future()
        started = time.perf_counter()

        def done(reply_future: Future[Reply]) -> None:
            try:
                reply = reply_future.result()
                if isinstance(reply, FrameDropped):
                    with self._lock:
                        self.stats.dropped = max(self.stats.dropped, reply.dropped)
                    outcome.set_result(Dropped(job.job_id, reply.stream, reply.dropped))
                    return
                call = _call_from(reply, job, started, conn.gateway_id)
                with self._lock:
                    self.stats.processed += 1
                    self.stats.dropped = max(self.stats.dropped, call.dropped)
                outcome.set_result(call)
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the future
                with self._lock:
                    self.stats.failed += 1
                outcome.set_exception(exc)

        # No deadline: a frame is answered, dropped, or failed with the connection.
        conn.send(job, job.job_id.encode()).add_done_callback(done)
        with self._lock:
            self.stats.sent += 1
        return outcome
