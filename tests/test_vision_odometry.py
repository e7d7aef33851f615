"""vision.odometry against rendered sequences whose camera motion is known (testkit/scenes.py),
and the life of its sessions: opening, closing, idling out, limits."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgspec
import numpy as np
import pytest

from hearth.errors import ErrorCode, JobError
from hearth.protocol.vision import PoseResult
from hearth_gateway.vision.odometry import OdometryParams, OdometrySession, OdometrySessions
from testkit.scenes import (
    Sequence,
    relative_errors,
    relative_motion,
    render_poses,
    render_sequence,
)

N_FRAMES = 40


@pytest.fixture(scope="module")
def sequence() -> Sequence:
    return render_sequence(N_FRAMES, seed=0)


def _params(seq: Sequence) -> OdometryParams:
    k = seq.K
    return OdometryParams(fx=k[0, 0], fy=k[1, 1], cx=k[0, 2], cy=k[1, 2])


def _pose(result: PoseResult) -> tuple[Any, Any]:
    return np.array(result.rotation).reshape(3, 3), np.array(result.translation)


def _angle_deg(rotation: Any) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, (float(np.trace(rotation)) - 1) / 2))))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- accuracy ---------------------------------------------------------------------------------


def test_relative_motion_is_recovered_on_a_rendered_sequence(sequence: Sequence) -> None:
    session = OdometrySession("robot", _params(sequence), sequence.width, sequence.height)
    results = [session.track(frame) for frame in sequence.frames]
    assert all(r.ok for r in results)
    assert [r.frame for r in results] == list(range(1, N_FRAMES + 1))
    rot_errs, dir_errs = relative_errors([_pose(r) for r in results], sequence.poses)
    rot, direction = float(np.median(rot_errs)), float(np.median(dir_errs))
    print(
        f"\nvision.odometry on {N_FRAMES} rendered 640x480 frames (noise sigma 2): median "
        f"rotation error {rot:.3f} deg (max {max(rot_errs):.3f}), median translation-direction "
        f"error {direction:.2f} deg (max {max(dir_errs):.2f})"
    )
    assert rot < 1.0
    assert direction < 5.0
    # The relative fields agree with the chained poses, and steps have unit length.
    for previous, current in itertools.pairwise(results):
        r_rel, t_rel = relative_motion(_pose(previous), _pose(current))
        assert np.allclose(r_rel.ravel(), current.rel_rotation, atol=1e-9)
        assert np.allclose(t_rel, current.rel_translation, atol=1e-9)
        assert np.linalg.norm(current.rel_translation) == pytest.approx(1.0)
    assert any(r.keyframe for r in results[1:])
    assert 0 < len(session.keyframes) <= 32


def test_default_intrinsics_match_the_renderer(sequence: Sequence) -> None:
    session = OdometrySession("robot", OdometryParams(), sequence.width, sequence.height)
    assert np.allclose(session.K, sequence.K)


def test_first_frame_is_the_origin(sequence: Sequence) -> None:
    result = OdometrySession("s", OdometryParams(), 640, 480).track(sequence.frames[0])
    assert result.ok
    assert result.frame == 1
    assert result.keyframe
    assert result.rotation == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert result.translation == [0.0, 0.0, 0.0]
    # It is the wire type: it survives msgspec's round trip.
    assert msgspec.convert(msgspec.to_builtins(result), PoseResult) == result


def test_a_camera_that_stands_still_or_turns_takes_no_step() -> None:
    def yaw(deg: float) -> Any:
        a = math.radians(deg)
        return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])

    poses = [(np.eye(3), np.zeros(3))] * 3 + [(yaw(2.0 * k), np.zeros(3)) for k in (1, 2, 3)]
    seq = render_poses(poses, seed=5)  # same place, fresh noise each frame
    session = OdometrySession("still", _params(seq), seq.width, seq.height)
    results = [session.track(frame) for frame in seq.frames]
    assert all(r.ok for r in results)
    for r in results:
        assert r.translation == [0.0, 0.0, 0.0]
        assert r.rel_translation == [0.0, 0.0, 0.0]
    rot_errs, _ = relative_errors([_pose(r) for r in results], seq.poses)
    assert max(rot_errs) < 0.2


# --- lost frames ------------------------------------------------------------------------------


def test_a_black_frame_is_not_ok_and_tracking_resumes(sequence: Sequence) -> None:
    session = OdometrySession("s", _params(sequence), 640, 480)
    for frame in sequence.frames[:4]:
        before = session.track(frame)
    black = np.zeros_like(sequence.frames[0])
    lost = session.track(black)
    assert not lost.ok
    assert lost.frame == 5
    assert (lost.rotation, lost.translation) == (before.rotation, before.translation)
    assert lost.rel_translation == [0.0, 0.0, 0.0]
    back = session.track(sequence.frames[5])
    assert back.ok
    # Measured from the last frame tracked (frame 4 of the sequence) to frame 6.
    r_true, t_true = relative_motion(sequence.poses[3], sequence.poses[5])
    r_est, t_est = relative_motion(_pose(before), _pose(back))
    assert _angle_deg(r_est.T @ r_true) < 1.0
    cos = float(t_est @ t_true) / float(np.linalg.norm(t_true))
    assert math.degrees(math.acos(min(1.0, cos))) < 5.0


def test_a_black_first_frame_is_not_the_origin(sequence: Sequence) -> None:
    session = OdometrySession("s", OdometryParams(), 640, 480)
    assert not session.track(np.zeros((480, 640), np.uint8)).ok
    first = session.track(sequence.frames[0])
    assert first.ok
    assert first.frame == 2
    assert first.translation == [0.0, 0.0, 0.0]


def test_after_a_jump_the_keyframes_relocalise(sequence: Sequence) -> None:
    """Twenty frames (2 m and 17 degrees) unseen: optical flow cannot bridge that, the ORB
    descriptors of the keyframes can."""
    session = OdometrySession("s", _params(sequence), 640, 480)
    for frame in sequence.frames[:12]:
        before = session.track(frame)
    after = session.track(sequence.frames[32])
    assert after.ok
    assert after.keyframe
    r_true, _ = relative_motion(sequence.poses[11], sequence.poses[32])
    r_est, _ = relative_motion(_pose(before), _pose(after))
    assert _angle_deg(r_true) > 10
    assert _angle_deg(r_est.T @ r_true) < 1.0


def test_lost_for_long_tracking_restarts(sequence: Sequence) -> None:
    """Carried to another room: nothing can place the camera, so after ten lost frames it
    tracks afresh from where it was last known to be."""
    elsewhere = render_sequence(12, seed=1)
    session = OdometrySession("s", _params(sequence), 640, 480)
    for frame in sequence.frames[:4]:
        before = session.track(frame)
    lost = [session.track(frame) for frame in elsewhere.frames[:10]]
    assert not any(r.ok for r in lost)
    assert all(r.translation == before.translation for r in lost)
    again = [session.track(frame) for frame in elsewhere.frames[10:]]
    assert all(r.ok for r in again)
    # The tenth lost frame became the new reference.
    r_true, _ = relative_motion(elsewhere.poses[9], elsewhere.poses[11])
    r_est, _ = relative_motion(_pose(lost[-1]), _pose(again[-1]))
    assert _angle_deg(r_est.T @ r_true) < 1.0


# --- bad input --------------------------------------------------------------------------------


def test_a_frame_of_another_size_is_refused(sequence: Sequence) -> None:
    session = OdometrySession("s", OdometryParams(), 640, 480)
    session.track(sequence.frames[0])
    with pytest.raises(JobError) as info:
        session.track(sequence.frames[1][:240, :320])
    assert info.value.code is ErrorCode.BAD_PARAMS
    assert "320x240" in info.value.message


def test_frames_that_are_not_8_bit_pictures_are_refused() -> None:
    session = OdometrySession("s", OdometryParams(), 64, 48)
    for frame in (np.zeros((48, 64), np.float32), np.zeros((48, 64, 2), np.uint8), b"jpeg"):
        with pytest.raises(JobError) as info:
            session.track(frame)
        assert info.value.code is ErrorCode.BAD_IMAGE


def test_params_are_checked() -> None:
    with pytest.raises(JobError) as info:
        OdometrySession("s", OdometryParams(max_features=1_000_000), 640, 480)
    assert info.value.code is ErrorCode.BAD_PARAMS
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"focal": 500.0}, OdometryParams)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"fx": -1.0}, OdometryParams)


# --- sessions ---------------------------------------------------------------------------------


def test_a_closed_session_stays_closed(sequence: Sequence) -> None:
    sessions = OdometrySessions()
    first = sessions.frame("dev/nav", sequence.frames[0], _params(sequence))
    assert first.session == "dev/nav"
    assert sessions.frame("dev/nav", sequence.frames[1]).frame == 2
    assert len(sessions) == 1
    assert sessions.close("dev/nav") == 2
    assert sessions.close("dev/nav") == 0  # a retried close is harmless
    assert sessions.close("dev/never") == 0
    assert len(sessions) == 0
    with pytest.raises(JobError) as info:
        sessions.frame("dev/nav", sequence.frames[2])
    assert info.value.code is ErrorCode.NO_SESSION
    assert "odometry session 'dev/nav' was closed" in info.value.message
    # Another name is a new session, with its own origin.
    again = sessions.frame("dev/nav2", sequence.frames[2])
    assert (again.frame, again.translation) == (1, [0.0, 0.0, 0.0])
    sessions.close("dev/nav2")


def test_idle_sessions_expire(sequence: Sequence) -> None:
    clock = Clock()
    sessions = OdometrySessions(idle_timeout_s=60, clock=clock)
    sessions.frame("a", sequence.frames[0])
    clock.now += 30
    sessions.frame("b", sequence.frames[0])
    clock.now += 31  # a: idle 61 s, b: 31 s
    assert sessions.expire() == ["a"]
    assert len(sessions) == 1
    with pytest.raises(JobError) as info:
        sessions.frame("a", sequence.frames[1])
    assert info.value.code is ErrorCode.NO_SESSION
    assert "idle" in info.value.message
    # A frame keeps its session alive; an idle one is closed on the next call even without
    # expire() (so it cannot be resumed after a long pause).
    assert sessions.frame("b", sequence.frames[1]).ok
    clock.now += 61
    with pytest.raises(JobError) as info:
        sessions.frame("b", sequence.frames[2])
    assert info.value.code is ErrorCode.NO_SESSION
    assert sessions.expire(now=clock.now + 1000) == []
    assert len(sessions) == 0


def test_open_sessions_are_limited(sequence: Sequence) -> None:
    sessions = OdometrySessions(max_sessions=2)
    sessions.frame("a", sequence.frames[0])
    sessions.frame("b", sequence.frames[0])
    with pytest.raises(JobError) as info:
        sessions.frame("c", sequence.frames[0])
    assert info.value.code is ErrorCode.QUOTA_EXCEEDED
    assert info.value.code.retryable
    assert sessions.frame("a", sequence.frames[1]).ok  # open ones carry on
    sessions.close("a")
    assert sessions.frame("c", sequence.frames[0]).frame == 1


def test_closed_ids_are_remembered_within_a_bound(sequence: Sequence) -> None:
    sessions = OdometrySessions(remember_closed=2)
    for name in ("a", "b", "c"):
        sessions.frame(name, sequence.frames[0])
        sessions.close(name)
    for name in ("b", "c"):
        with pytest.raises(JobError):
            sessions.frame(name, sequence.frames[0])
    # The oldest was forgotten: its name opens a new session.
    assert sessions.frame("a", sequence.frames[0]).frame == 1


def test_a_bad_first_frame_opens_nothing() -> None:
    sessions = OdometrySessions()
    with pytest.raises(JobError) as info:
        sessions.frame("a", np.zeros((8, 8), np.uint8))
    assert info.value.code is ErrorCode.BAD_IMAGE
    with pytest.raises(JobError) as info:
        sessions.frame("a", np.zeros((48, 64), np.uint8), OdometryParams(min_inliers=1))
    assert info.value.code is ErrorCode.BAD_PARAMS
    assert len(sessions) == 0


# --- the renderer -----------------------------------------------------------------------------


def test_rendering_is_deterministic_and_noisy() -> None:
    a = render_sequence(2, width=160, height=120, seed=3)
    b = render_sequence(2, width=160, height=120, seed=3)
    clean = render_sequence(2, width=160, height=120, seed=3, noise_sigma=0)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames, strict=True))
    noise = a.frames[1].astype(float) - clean.frames[1]
    assert 1.5 < float(noise.std()) < 2.5
    assert not np.array_equal(a.frames[0], a.frames[1])
    assert a.frames[0].shape == (120, 160, 3)


def test_relative_errors_of_the_truth_are_zero(sequence: Sequence) -> None:
    rot_errs, dir_errs = relative_errors(sequence.poses, sequence.poses)
    assert len(rot_errs) == len(dir_errs) == N_FRAMES - 1
    assert max(rot_errs) < 1e-5
    assert max(dir_errs) < 1e-5
