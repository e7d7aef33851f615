"""``vision.odometry``: monocular visual odometry, a camera's pose from its frames, per session.

A session follows one camera. Its first frame is the origin (identity pose). Each later frame
is compared with the reference frame (the last one whose motion was measured): Shi-Tomasi
corners are followed with pyramidal Lucas-Kanade optical flow, the essential matrix is
estimated robustly (``cv2.findEssentialMat``, MAGSAC++, p = 0.999, 1 px) and decomposed into
the rotation and the direction of travel (``cv2.recoverPose``), and that motion is chained onto
the reference's pose. Corners that disagree with the motion are dropped; new ones are found at
keyframes. Tracking corners was chosen over matching ORB features frame to frame: on the
sequences of ``testkit/scenes.py`` it is about four times as fast, and its sub-pixel positions
make the errors several times smaller (median 0.6 against 4.5 degrees for the direction of
travel).

Scale: one camera cannot tell a small room from a big one, so every measured step has length
1 (in the session's arbitrary unit). When the camera stands still or only turns (under
``min_parallax_px`` of motion left after removing the rotation), the step is zero: the
rotation is measured alone and the reference stays, so that a slow motion adds up until it
can be seen.

The map is small and bounded: the last ``MAX_KEYFRAMES`` keyframes (pose, ORB keypoints and
descriptors). A frame becomes a keyframe when the corners moved ``keyframe_parallax_px``
(median) since the last one or half of them were lost. When tracking fails (a dark or blurred
frame, a covered lens, a jump), the result is ``ok=False`` with the pose carried over; the
next frames are tried against the reference and then against the recent keyframes (ORB
matching), so the session picks up again where it can. After ``_RESTART_AFTER_LOST`` (10)
frames lost in a row, tracking restarts from the current view and continues from the last
pose known: the motion while lost is missing from the trajectory.

Sessions are kept by ``OdometrySessions``: opened by their first frame, closed explicitly or
after ``idle_timeout_s`` without frames. The id of a closed session is remembered, and a frame
for it is refused (``no_session``) rather than silently starting a new origin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import cv2
import msgspec
import numpy as np
import numpy.typing as npt

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import PoseResult

__all__ = [
    "DEFAULT_FOCAL_FACTOR",
    "MAX_KEYFRAMES",
    "Keyframe",
    "OdometryParams",
    "OdometrySession",
    "OdometrySessions",
    "checked_params",
    "to_gray",
]

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

log = logging.getLogger(__name__)

# Focal length when none is given, as a fraction of the image width: fx = 0.9 * width is a
# horizontal field of view of 58 degrees, a common webcam's.
DEFAULT_FOCAL_FACTOR = 0.9
# The map: keyframes kept per session (each up to max_features ORB features, 40 bytes each).
MAX_KEYFRAMES = 32
# Keyframes tried, newest first, to pick up again after tracking was lost.
_RELOCALISE_KEYFRAMES = 3
# Frames lost in a row after which tracking starts afresh from the current view.
_RESTART_AFTER_LOST = 10
_MIN_SIZE_PX = 32

# Lucas-Kanade: 21x21 windows over 4 pyramid levels follow motions of up to ~100 px. (A
# forward-backward check of the flow was tried: the essential matrix's inlier test already
# drops the tracks it would, at half the cost.)
_LK_WINDOW = (21, 21)
_LK_LEVELS = 3
_LK_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01)
# MAGSAC++ (OpenCV's USAC framework) is RANSAC whose best model is polished by local
# optimisation and a final fit over all its inliers. On the sequences of testkit/scenes.py it
# cuts the median error of the direction of travel from about 5 degrees (cv2.RANSAC, which keeps
# the model of a minimal 5-point sample) to about 0.5, at the same speed.
_ESSENTIAL_METHOD = cv2.USAC_MAGSAC
_RANSAC_PROB = 0.999
# Below this share of agreeing correspondences, what RANSAC found is most likely noise.
_MIN_INLIER_FRACTION = 0.25
# Correspondences that vote on which of the essential matrix's four motions is the real one.
_VOTERS = 200


class OdometryParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of ``vision.odometry``, read on a session's first frame (later frames'
    parameters are ignored: the camera does not change within a session)."""

    # Intrinsics in pixels. 0: fx = 0.9 * width, fy = fx, (cx, cy) = the image's centre.
    fx: Annotated[float, msgspec.Meta(ge=0.0, le=1e5)] = 0.0
    fy: Annotated[float, msgspec.Meta(ge=0.0, le=1e5)] = 0.0
    cx: Annotated[float, msgspec.Meta(ge=0.0, le=1e5)] = 0.0
    cy: Annotated[float, msgspec.Meta(ge=0.0, le=1e5)] = 0.0
    # Corners followed per frame (more: steadier and slower).
    max_features: Annotated[int, msgspec.Meta(ge=50, le=5000)] = 2000
    # Correspondences that must agree with the motion for a frame to count as tracked.
    min_inliers: Annotated[int, msgspec.Meta(ge=8, le=5000)] = 15
    # Median corner motion since the last keyframe, pixels, that makes a new keyframe.
    keyframe_parallax_px: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 40.0
    # Median motion, pixels, left after removing the rotation, below which the camera is taken
    # to have only turned (or stood still): no step.
    min_parallax_px: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.5
    # RANSAC's distance from an epipolar line, pixels, within which a correspondence agrees.
    ransac_threshold_px: Annotated[float, msgspec.Meta(gt=0.0, le=20.0)] = 1.0


def checked_params(params: OdometryParams) -> OdometryParams:
    """``params`` with their bounds enforced: msgspec checks them when it decodes, not when a
    struct is built in Python. Raises ``JobError(BAD_PARAMS)``."""
    try:
        # numpy scalars (a K matrix's entries) become Python numbers first.
        fields = {
            k: v.item() if isinstance(v, np.generic) else v
            for k, v in msgspec.structs.asdict(params).items()
        }
        return msgspec.convert(fields, OdometryParams)
    except msgspec.ValidationError as exc:
        raise JobError(ErrorCode.BAD_PARAMS, f"odometry params: {exc}") from None


def to_gray(image: Any) -> npt.NDArray[np.uint8]:
    """A grey uint8 copy of a BGR, BGRA or grey uint8 frame. Raises BAD_IMAGE."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise JobError(ErrorCode.BAD_IMAGE, "odometry needs 8-bit frames")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        gray = image.copy()  # kept as the reference: the caller may reuse its buffer
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        gray = cv2.cvtColor(image, code)
    else:
        raise JobError(ErrorCode.BAD_IMAGE, f"odometry needs grey or BGR frames, not {image.shape}")
    if min(gray.shape) < _MIN_SIZE_PX:
        raise JobError(ErrorCode.BAD_IMAGE, f"frames must be at least {_MIN_SIZE_PX} pixels")
    return np.asarray(gray, np.uint8)


@dataclass(frozen=True)
class Keyframe:
    """A map entry: where the camera was, and what it saw there (for relocalisation)."""

    frame: int
    rotation: F64  # camera-to-world
    translation: F64
    points: F32  # (N, 2) pixel positions of the ORB descriptors' corners
    descriptors: npt.NDArray[np.uint8]  # (N, 32)


@dataclass(frozen=True)
class _Motion:
    rotation: F64  # x_cur = R x_ref + t
    translation: F64  # unit length, or zero when there was no measurable parallax
    points: F32  # (M, 2) current positions of the correspondences that agree
    index: npt.NDArray[np.intp]  # their rows in the reference's points
    count: int


class OdometrySession:
    """The odometry of one camera. Not thread-safe: ``OdometrySessions`` serialises frames.

    >>> session = OdometrySession("robot", OdometryParams(), 640, 480)
    >>> first = session.track(frame)   # identity pose, ok=True, frame=1
    >>> result = session.track(next_frame)
    """

    def __init__(self, session_id: str, params: OdometryParams, width: int, height: int) -> None:
        if width < _MIN_SIZE_PX or height < _MIN_SIZE_PX:
            raise JobError(ErrorCode.BAD_PARAMS, f"frames must be at least {_MIN_SIZE_PX} pixels")
        self.session_id = session_id
        self.params = checked_params(params)
        self.width, self.height = width, height
        p = self.params
        fx = p.fx or DEFAULT_FOCAL_FACTOR * width
        fy = p.fy or fx
        cx = p.cx or width / 2.0
        cy = p.cy or height / 2.0
        self.K: F64 = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        self._K_inv: F64 = np.asarray(np.linalg.inv(self.K), np.float64)
        self.frames = 0
        self.keyframes: deque[Keyframe] = deque(maxlen=MAX_KEYFRAMES)
        # Camera-to-world pose of the last frame reported, and of the reference frame.
        self.rotation: F64 = np.eye(3)
        self.translation: F64 = np.zeros(3)
        self._ref_rotation: F64 = np.eye(3)
        self._ref_translation: F64 = np.zeros(3)
        self._ref_gray: npt.NDArray[np.uint8] | None = None  # until a frame with enough corners
        self._ref_points: F32 = np.empty((0, 2), np.float32)
        self._kf_points: F32 = np.empty((0, 2), np.float32)  # the same corners at the keyframe
        self._kf_count = 0
        self._min_distance_px = max(5, round(min(width, height) / 60))
        self._disc = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * self._min_distance_px + 1, 2 * self._min_distance_px + 1)
        )
        self._orb: Any = None  # created with the first keyframe
        self._lost_in_row = 0

    # -- public -----------------------------------------------------------------------------

    def track(self, image: Any) -> PoseResult:
        """The camera's pose after ``image`` (BGR, BGRA or grey uint8, the session's size).

        Raises ``JobError(BAD_PARAMS)`` when the frame's size is not the session's and
        ``JobError(BAD_IMAGE)`` when it is not an 8-bit picture."""
        gray = to_gray(image)
        if gray.shape != (self.height, self.width):
            raise JobError(
                ErrorCode.BAD_PARAMS,
                f"odometry session {self.session_id!r} has {self.width}x{self.height} frames, "
                f"not {gray.shape[1]}x{gray.shape[0]}: the camera cannot change within a session",
            )
        self.frames += 1
        if self._ref_gray is None:
            return self._start(gray)

        motion = self._track_reference(gray)
        base_rotation, base_translation = self._ref_rotation, self._ref_translation
        relocalised = False
        if motion is None:
            found = self._relocalise(gray)
            if found is None:
                self._lost_in_row += 1
                if self._lost_in_row >= _RESTART_AFTER_LOST:
                    self._restart(gray)
                return self._lost(0)
            motion, keyframe = found
            base_rotation, base_translation = keyframe.rotation, keyframe.translation
            relocalised = True

        # Chain: x_world = R_ref x_ref + t_ref and x_ref = R^T (x_cur - t).
        rotation = base_rotation @ motion.rotation.T
        translation = base_translation - rotation @ motion.translation
        rel_rotation = rotation.T @ self.rotation
        rel_translation = rotation.T @ (self.translation - translation)
        self.rotation, self.translation = rotation, translation

        self._lost_in_row = 0
        moved = bool(np.any(motion.translation))
        keyframe_now = relocalised or self._needs_keyframe(motion)
        if moved or keyframe_now:
            # The reference moves on; while the camera only turns it stays, so that a slow
            # translation adds up to measurable parallax.
            self._ref_rotation, self._ref_translation = rotation, translation
            self._ref_gray = gray
            self._ref_points = motion.points
            # (after relocalisation the keyframe made below resets these)
            self._kf_points = motion.points if relocalised else self._kf_points[motion.index]
        if keyframe_now:
            self._make_keyframe(gray)
        return self._result(True, motion.count, keyframe_now, rel_rotation, rel_translation)

    # -- steps --------------------------------------------------------------------------------

    def _start(self, gray: npt.NDArray[np.uint8]) -> PoseResult:
        """The first frame with enough corners is the origin; until then, frames are lost."""
        points = self._corners(gray, np.empty((0, 2), np.float32))
        if len(points) < self.params.min_inliers:
            return self._lost(len(points))
        self._ref_gray = gray
        self._ref_points = points
        self._kf_points = points.copy()
        self._make_keyframe(gray, replenish=False)
        eye = np.eye(3)
        return self._result(True, len(points), True, eye, np.zeros(3))

    def _restart(self, gray: npt.NDArray[np.uint8]) -> None:
        """Track from this view on, from the last pose known: lost for this long, the camera
        is somewhere neither the reference nor the keyframes can place it."""
        points = self._corners(gray, np.empty((0, 2), np.float32))
        if len(points) < self.params.min_inliers:
            return
        log.info(
            "odometry session %r lost for %d frames: tracking restarts from frame %d",
            self.session_id, self._lost_in_row, self.frames,
        )  # fmt: skip
        self._lost_in_row = 0
        self._ref_rotation, self._ref_translation = self.rotation, self.translation
        self._ref_gray = gray
        self._ref_points = points
        self._make_keyframe(gray, replenish=False)

    def _corners(self, gray: npt.NDArray[np.uint8], existing: F32) -> F32:
        """New Shi-Tomasi corners away from the ``existing`` ones, up to max_features in all."""
        wanted = self.params.max_features - len(existing)
        if wanted <= 0:
            return np.empty((0, 2), np.float32)
        mask: Any = np.full(gray.shape, 255, np.uint8)
        if len(existing):
            # Zero at each corner, grown to a disc of min_distance around it by erosion.
            xy = np.round(existing).astype(np.intp)
            mask[xy[:, 1].clip(0, self.height - 1), xy[:, 0].clip(0, self.width - 1)] = 0
            mask = cv2.erode(mask, self._disc)
        # None when there is none (OpenCV's stubs do not say so).
        found: Any = cv2.goodFeaturesToTrack(
            gray, wanted, 0.01, self._min_distance_px, mask=mask, blockSize=7
        )
        if found is None:
            return np.empty((0, 2), np.float32)
        return np.asarray(found, np.float32).reshape(-1, 2)

    def _track_reference(self, gray: npt.NDArray[np.uint8]) -> _Motion | None:
        """Corners of the reference followed into this frame, and the motion they agree on."""
        ref, ref_gray = self._ref_points, self._ref_gray
        if ref_gray is None or len(ref) < self.params.min_inliers:
            return None
        flow, status, _ = cv2.calcOpticalFlowPyrLK(
            ref_gray, gray, ref, np.empty_like(ref), winSize=_LK_WINDOW, maxLevel=_LK_LEVELS,
            criteria=_LK_CRITERIA,
        )  # fmt: skip
        cur = np.asarray(flow, np.float32).reshape(-1, 2)
        x, y = cur[:, 0], cur[:, 1]
        inside = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
        good = (status[:, 0] == 1) & inside
        motion = self._motion(ref[good], cur[good])
        if motion is None:
            return None
        index = np.flatnonzero(good)[motion.index]
        return _Motion(motion.rotation, motion.translation, motion.points, index, motion.count)

    def _motion(self, ref: F32, cur: F32) -> _Motion | None:
        """The relative motion from correspondences (``index`` into these); None when too few
        agree on one."""
        p = self.params
        if len(ref) < max(p.min_inliers, 8):
            return None
        if float(np.median(np.linalg.norm(cur - ref, axis=1))) < p.min_parallax_px:
            return self._still(ref, cur)  # the essential matrix of no motion is undefined
        found = self._essential(ref, cur)
        if found is None:
            return None
        essential, agree = found
        ref, cur = ref[agree], cur[agree]
        # Of the four motions an essential matrix allows, the one that puts the points in
        # front of both cameras; points farther than 50 baselines do not vote (their depth's
        # sign is noise). A few hundred voters decide as well as thousands, for a tenth of
        # the triangulation.
        voters = slice(None, None, max(1, len(agree) // _VOTERS))
        votes, r_cv, t_cv, _ = cv2.recoverPose(essential, ref[voters], cur[voters], self.K)
        rotation = np.asarray(r_cv, np.float64)
        translation = np.asarray(t_cv, np.float64).ravel()
        # Parallax: how far the corners moved beyond what any rotation explains. Without it
        # the direction of travel is noise (and the essential matrix degenerate, its rotation
        # and inliers included): then the motion is a turn, fitted to the corners alone. The
        # vote above may then have picked the wrong one of the matrix's two rotations.
        r1, r2, _ = cv2.decomposeEssentialMat(essential)
        guess = min(
            (rotation, np.asarray(r1, np.float64), np.asarray(r2, np.float64)),
            key=lambda r: float(np.median(self._residual_px(r, ref, cur))),
        )
        turn = self._turn(ref, cur, guess, agree)
        if turn is not None:
            parallax = float(np.median(self._residual_px(turn.rotation, ref, cur)))
            if parallax < p.min_parallax_px:
                return turn
        if int(votes) == 0:
            return turn
        translation /= float(np.linalg.norm(translation))
        return _Motion(rotation, translation, cur, agree, len(agree))

    def _essential(self, ref: F32, cur: F32) -> tuple[Any, npt.NDArray[np.intp]] | None:
        """The essential matrix and the rows that agree with it, if enough do."""
        essential, mask = cv2.findEssentialMat(
            ref, cur, self.K, method=_ESSENTIAL_METHOD, prob=_RANSAC_PROB,
            threshold=self.params.ransac_threshold_px,
        )  # fmt: skip
        if essential is None or essential.shape != (3, 3) or mask is None:
            return None
        agree = np.flatnonzero(mask.ravel() != 0)
        # A few agreeing among many is what RANSAC finds in noise (flow that jumped too far,
        # a frame of another place): better no motion than a wrong one.
        if len(agree) < max(self.params.min_inliers, _MIN_INLIER_FRACTION * len(ref)):
            return None
        return essential, agree

    def _still(self, ref: F32, cur: F32) -> _Motion | None:
        """The motion of a camera that (nearly) stood still: a small rotation at most."""
        return self._turn(ref, cur, np.eye(3), np.arange(len(ref)))

    def _turn(self, ref: F32, cur: F32, guess: F64, index: npt.NDArray[np.intp]) -> _Motion | None:
        """A rotation without translation, fitted to the correspondences within
        ransac_threshold_px of what ``guess`` predicts, then of what the fit predicts."""
        rotation = guess
        for _ in range(2):
            keep = np.flatnonzero(
                self._residual_px(rotation, ref, cur) < self.params.ransac_threshold_px
            )
            if len(keep) < max(self.params.min_inliers, _MIN_INLIER_FRACTION * len(ref)):
                return None
            rotation = self._rotation_only(ref[keep], cur[keep])
        return _Motion(rotation, np.zeros(3), cur[keep], index[keep], len(keep))

    def _residual_px(self, rotation: F64, ref: F32, cur: F32) -> F64:
        """How far each corner is from where the rotation alone would have taken it."""
        rays = np.column_stack([ref, np.ones(len(ref))]) @ self._K_inv.T
        rotated = rays @ (self.K @ rotation).T
        predicted = rotated[:, :2] / rotated[:, 2:3]
        return np.asarray(np.linalg.norm(predicted - cur, axis=1), np.float64)

    def _rotation_only(self, ref: F32, cur: F32) -> F64:
        """The rotation that best aligns the two sets of viewing rays (Kabsch): the essential
        matrix does not determine it when the camera did not move."""
        a = np.column_stack([ref, np.ones(len(ref))]) @ self._K_inv.T
        b = np.column_stack([cur, np.ones(len(cur))]) @ self._K_inv.T
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        u, _, vt = np.linalg.svd(a.T @ b)
        d = np.sign(np.linalg.det(vt.T @ u.T))
        return np.asarray(vt.T @ np.diag([1.0, 1.0, d]) @ u.T, np.float64)

    def _needs_keyframe(self, motion: _Motion) -> bool:
        if len(motion.points) < max(self._kf_count // 2, self.params.min_inliers):
            return True
        shift = np.linalg.norm(motion.points - self._kf_points[motion.index], axis=1)
        return bool(np.median(shift) > self.params.keyframe_parallax_px)

    def _make_keyframe(self, gray: npt.NDArray[np.uint8], *, replenish: bool = True) -> None:
        """Top the corners up and remember this frame in the map."""
        if replenish:
            new = self._corners(gray, self._ref_points)
            self._ref_points = np.concatenate([self._ref_points, new])
        self._kf_points = self._ref_points.copy()
        self._kf_count = len(self._ref_points)
        points, descriptors = self._describe(gray)
        self.keyframes.append(
            Keyframe(self.frames, self.rotation, self.translation, points, descriptors)
        )

    def _relocalise(self, gray: npt.NDArray[np.uint8]) -> tuple[_Motion, Keyframe] | None:
        """After the reference was lost: match ORB descriptors against recent keyframes."""
        if not self.keyframes:
            return None
        points, descriptors = self._describe(gray)
        if len(points) < self.params.min_inliers:
            return None
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
        for keyframe in list(self.keyframes)[::-1][:_RELOCALISE_KEYFRAMES]:
            matches = [
                m for m in matcher.match(keyframe.descriptors, descriptors) if m.distance < 64
            ]
            if len(matches) < self.params.min_inliers:
                continue
            ref = keyframe.points[[m.queryIdx for m in matches]]
            cur = points[[m.trainIdx for m in matches]]
            motion = self._motion(ref, cur)
            if motion is not None:
                return motion, keyframe
        return None

    def _describe(self, gray: npt.NDArray[np.uint8]) -> tuple[F32, Any]:
        """ORB keypoints and descriptors of a frame. ORB finds its own (multi-scale, oriented)
        keypoints: descriptors of the tracked corners would not match after a turn or a
        step forward, which is when relocalisation is needed."""
        if self._orb is None:
            self._orb = cv2.ORB.create(nfeatures=self.params.max_features)
        keypoints, descriptors = self._orb.detectAndCompute(gray, None)
        if descriptors is None or not keypoints:
            return np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8)
        return np.asarray(cv2.KeyPoint.convert(keypoints), np.float32).reshape(-1, 2), descriptors

    def _lost(self, inliers: int) -> PoseResult:
        return self._result(False, inliers, False, np.eye(3), np.zeros(3))

    def _result(
        self, ok: bool, inliers: int, keyframe: bool, rel_rotation: F64, rel_translation: F64
    ) -> PoseResult:
        return PoseResult(
            session=self.session_id,
            frame=self.frames,
            ok=ok,
            inliers=inliers,
            keyframe=keyframe,
            rotation=[float(v) for v in self.rotation.ravel()],
            translation=[float(v) for v in self.translation],
            rel_rotation=[float(v) for v in rel_rotation.ravel()],
            rel_translation=[float(v) for v in rel_translation],
        )


class OdometrySessions:
    """The open odometry sessions of a worker, by id (the caller scopes ids per device).

    >>> sessions = OdometrySessions(idle_timeout_s=60)
    >>> sessions.frame("dev1/nav", frame)     # opens "dev1/nav": identity pose
    >>> sessions.close("dev1/nav")            # frames it processed
    >>> sessions.frame("dev1/nav", frame)     # JobError(NO_SESSION): closed ids stay closed
    """

    def __init__(
        self,
        idle_timeout_s: float = 60.0,
        max_sessions: int = 16,
        remember_closed: int = 1024,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self.remember_closed = remember_closed
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, tuple[OdometrySession, threading.Lock]] = {}
        self._last_used: dict[str, float] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> why, oldest first

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._open

    def frame(
        self, session_id: str, image: Any, params: OdometryParams | None = None
    ) -> PoseResult:
        """Track ``image`` in session ``session_id``, opening it with ``params`` (default
        intrinsics when None) on its first frame.

        Raises ``JobError``: NO_SESSION when the session was closed, QUOTA_EXCEEDED when
        ``max_sessions`` are open, BAD_PARAMS for bad parameters or a frame of another size,
        BAD_IMAGE when the frame is not an 8-bit grey or BGR picture."""
        gray = to_gray(image)  # before opening anything for a frame that cannot be used
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            why = self._closed.get(session_id)
            if why is not None:
                raise JobError(
                    ErrorCode.NO_SESSION,
                    f"odometry session {session_id!r} was closed ({why}); "
                    "start a new session under another name",
                )
            entry = self._open.get(session_id)
            if entry is None:
                if len(self._open) >= self.max_sessions:
                    raise JobError(
                        ErrorCode.QUOTA_EXCEEDED,
                        f"{len(self._open)} odometry sessions are open, the most allowed; "
                        "close one or let one idle out",
                    )
                height, width = gray.shape
                session = OdometrySession(session_id, params or OdometryParams(), width, height)
                entry = (session, threading.Lock())
                self._open[session_id] = entry
            self._last_used[session_id] = now
        session, session_lock = entry
        # Tracking takes milliseconds: other sessions' frames need not wait for it.
        with session_lock:
            return session.track(gray)

    def close(self, session_id: str) -> int:
        """Close a session; the frames it processed (0 when it was not open). Idempotent."""
        with self._lock:
            return self._close_locked(session_id, "closed by its client")

    def expire(self, now: float | None = None) -> list[str]:
        """Close the sessions idle for longer than ``idle_timeout_s``; their ids."""
        with self._lock:
            return self._expire_locked(self._clock() if now is None else now)

    def _expire_locked(self, now: float) -> list[str]:
        idle = [s for s, t in self._last_used.items() if now - t > self.idle_timeout_s]
        for session_id in idle:
            self._close_locked(session_id, f"idle for more than {self.idle_timeout_s:g} s")
        return idle

    def _close_locked(self, session_id: str, why: str) -> int:
        entry = self._open.pop(session_id, None)
        self._last_used.pop(session_id, None)
        if entry is None:
            return 0
        self._closed[session_id] = why
        self._closed.move_to_end(session_id)
        while len(self._closed) > self.remember_closed:
            self._closed.popitem(last=False)
        return entry[0].frames
