"""The vision runner: capability calls (``call``) and ONNX image pipelines (``pipeline``).

Stateful capabilities keep their state here, in the worker process: the daemon sends every
frame of a stream or session to the same worker (workers.py, affinity), and tells it when a
session ends (``VisionClose``). A worker that dies takes its sessions with it; the next frame
of such a session is answered ``no_session`` by the fresh worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from hearth.errors import ErrorCode, JobError
from hearth.protocol import (
    CallJob,
    CallResult,
    PipelineJob,
    PipelineReply,
    Reply,
    SessionClosed,
)
from hearth.runtime.onnx import array_to_tensor
from hearth_gateway.runners import VisionClose, WorkerSettings, WorkItem, onnx_runtime
from hearth_gateway.vision import CAPABILITIES

__all__ = ["VisionRunner"]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=msgspec.Struct)


def _params(params: dict[str, Any], kind: type[P]) -> P:
    try:
        return msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        raise JobError(ErrorCode.BAD_PARAMS, str(exc)) from None


class VisionRunner:
    def __init__(self, settings: WorkerSettings) -> None:
        import cv2

        from hearth_gateway.vision import faces, motion, odometry

        # One thread per worker process: the daemon runs a worker per core, and OpenCV's own
        # pool would oversubscribe the box (and make latency jittery) on top of that.
        cv2.setNumThreads(1)
        self._max_megapixels = settings.max_megapixels
        self._onnx = onnx_runtime(settings)
        self._faces = faces.FaceDetector()
        self._motion = motion.MotionStreams(max_streams=settings.max_streams)
        # The daemon closes idle sessions and enforces the per-device quota (streams.py); the
        # limits here only bound what a worker would hold if that bookkeeping ever failed.
        self._odometry = odometry.OdometrySessions(idle_timeout_s=3600.0, max_sessions=256)
        self._plate: Any = None  # loaded on first use: the OCR models take a while
        self._handlers: dict[str, Callable[[CallJob, WorkItem], msgspec.Struct]] = {
            "vision.faces": self._call_faces,
            "vision.motion": self._call_motion,
            "vision.features": self._call_features,
            "vision.plate": self._call_plate,
            "vision.odometry": self._call_odometry,
        }
        self._versions = dict(CAPABILITIES)
        self._versions["vision.faces"] += f" ({faces.VERSION})"

    def run(self, item: WorkItem) -> Reply:
        job = item.job
        if isinstance(job, VisionClose):
            frames = self._odometry.close(job.session)
            return SessionClosed(session=job.session.split("/", 1)[1], frames=frames)
        assert isinstance(job, CallJob | PipelineJob)
        try:
            if isinstance(job, PipelineJob):
                return self._pipeline(job, item)
            return self._call(job, item)
        except (JobError, OSError):
            raise  # the worker answers these
        except Exception as exc:  # an OpenCV assertion on an input we did not foresee
            # This worker's other streams and sessions are still good: fail this one job with
            # the reason instead of dying and taking them along.
            log.exception("%s failed", getattr(job, "capability", "pipeline"))
            raise JobError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:300]) from None

    def _call(self, job: CallJob, item: WorkItem) -> CallResult:
        handler = self._handlers.get(job.capability)
        if handler is None:
            raise JobError(ErrorCode.UNKNOWN_CAPABILITY, f"no capability {job.capability!r} here")
        # bytes stay bytes (MessagePack bin), as everywhere in the protocol.
        result = msgspec.to_builtins(handler(job, item), builtin_types=(bytes,))
        return CallResult(
            job_id=job.job_id,
            capability=job.capability,
            version=self._versions[job.capability],
            result=result,
            provider=self._plate.provider if job.capability == "vision.plate" else "",
        )

    def _image(self, job: CallJob | PipelineJob) -> Any:
        from hearth_gateway.vision.images import decode

        if job.image is None:
            raise JobError(ErrorCode.BAD_IMAGE, "this call needs an image")
        return decode(job.image, max_megapixels=self._max_megapixels)

    # -- capabilities -------------------------------------------------------------------------

    def _call_faces(self, job: CallJob, _item: WorkItem) -> msgspec.Struct:
        from hearth.protocol.vision import FacesResult
        from hearth_gateway.vision.faces import FacesParams

        params = _params(job.params, FacesParams)
        image = self._image(job)
        height, width = image.shape[:2]
        return FacesResult(width=width, height=height, faces=self._faces.detect(image, params))

    def _call_motion(self, job: CallJob, item: WorkItem) -> msgspec.Struct:
        from hearth_gateway.vision.motion import MotionParams

        if job.stream is None:
            raise JobError(ErrorCode.BAD_PARAMS, "vision.motion needs a stream name")
        params = _params(job.params, MotionParams)
        result: msgspec.Struct = self._motion.update(
            f"{item.scope}/{job.stream}", self._image(job), params
        )
        return result

    def _call_features(self, job: CallJob, _item: WorkItem) -> msgspec.Struct:
        from hearth_gateway.vision.features import FeaturesParams, orb_features

        params = _params(job.params, FeaturesParams)
        result: msgspec.Struct = orb_features(self._image(job), params)
        return result

    def _call_plate(self, job: CallJob, _item: WorkItem) -> msgspec.Struct:
        from hearth_gateway.vision.plate import PlateParams, PlateReader

        params = _params(job.params, PlateParams)
        image = self._image(job)
        if self._plate is None:
            self._plate = PlateReader(self._onnx)
        result: msgspec.Struct = self._plate.read(image, params)
        return result

    def _call_odometry(self, job: CallJob, item: WorkItem) -> msgspec.Struct:
        from hearth_gateway.vision.odometry import OdometryParams

        if job.session is None:
            raise JobError(ErrorCode.BAD_PARAMS, "vision.odometry needs a session name")
        key = f"{item.scope}/{job.session}"
        if not item.session_new and key not in self._odometry:
            # The daemon knows the session is open, so this worker is a fresh one (the one
            # holding the map died): say so rather than silently restart from the origin.
            raise JobError(
                ErrorCode.NO_SESSION,
                f"odometry session {job.session!r} was lost with the worker that held it; "
                "start a new session",
            )
        params = _params(job.params, OdometryParams)
        pose = self._odometry.frame(key, self._image(job), params)
        return msgspec.structs.replace(pose, session=job.session)  # the device's own name

    # -- ONNX image pipelines -----------------------------------------------------------------

    def _pipeline(self, job: PipelineJob, item: WorkItem) -> PipelineReply:
        from hearth_gateway.vision.pipeline import postprocess, preprocess

        image = self._image(job)
        tensor, transform = preprocess(image, job.pre)
        name = job.input or self._onnx.input_specs(job.model, path=Path(item.blob_path))[0][0]
        outputs, provider = self._onnx.run(
            job.model, [array_to_tensor(name, tensor)], [], path=Path(item.blob_path)
        )
        arrays = {t.name: _array(t) for t in outputs}
        order = [t.name for t in outputs]
        result = postprocess(arrays, order, job.post, transform)
        raw = outputs if job.post.kind == "none" else []
        return PipelineReply(job_id=job.job_id, result=result, provider=provider, outputs=raw)

    def describe(self) -> dict[str, list[str]]:
        return {"capabilities": [f"{name}={version}" for name, version in self._versions.items()]}

    def close(self) -> None:
        self._onnx.close()


def _array(tensor: Any) -> Any:
    from hearth.runtime.onnx import tensor_to_array

    return tensor_to_array(tensor)
