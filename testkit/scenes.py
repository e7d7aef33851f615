"""Synthetic camera sequences with known motion, for testing and benchmarking ``vision.odometry``:
no files, no downloads, everything from a seed.

The scene is a textured room (floor, ceiling, four walls in 2 m tiles) with boxes of random
size and height standing on the floor, so that every view holds surfaces at many depths: a
single plane would make the essential matrix degenerate. The camera drives a circle of 5 m
radius at 0.1 m per frame (yaw about 1.15 degrees per frame), sways sideways by 0.3 m and turns
its head by a few degrees around the direction of travel (so it does not always look where it
goes), and bobs by a few centimetres. Frame ``i`` is the same whatever ``n_frames`` is.

Rendering is exact for the geometry: each tile is a homography of its texture (mip-mapped, so
distant tiles do not shimmer), clipped against the near plane and composited with a z-buffer of
inverse depth, which is affine in pixel coordinates for a plane. Then a little optical blur and
Gaussian sensor noise::

    seq = render_sequence(60, seed=3)
    seq.frames[0].shape        # (480, 640, 3) uint8, BGR
    seq.K                      # 3x3 intrinsics (fx = fy = 0.9 * width, centre of the image)
    R, t = seq.poses[10]       # camera-to-world: x_world = R @ x_camera + t

Cameras follow OpenCV's convention (x right, y down, z forward); the world frame is the first
camera's frame.
"""

from __future__ import annotations

import math
import statistics
import string
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "Sequence",
    "relative_errors",
    "relative_motion",
    "render_poses",
    "render_sequence",
    "trajectory",
]

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Pose = tuple[F64, F64]  # (R 3x3, t 3): camera-to-world

_TILE_M = 2.0  # edge of a room tile, metres
_TEX_PX = 512  # texture edge, texels (256 per metre on the room's tiles)
_N_TEXTURES = 20
_NEAR_M = 0.05  # near clipping plane

# The trajectory (see the module docstring); per frame, so a longer sequence extends a shorter.
_RADIUS_M = 5.0
_STEP_RAD = 0.02  # along the circle per frame: 0.1 m of travel
_SWAY_M, _SWAY_PERIOD = 0.3, 40.0
_HEAD_RAD, _HEAD_PERIOD = 0.08, 55.0
_BOB_M, _BOB_PERIOD = 0.03, 23.0
_PITCH_RAD, _PITCH_PERIOD = 0.02, 31.0

# The room around the circle (centre at x = 5, z = 0): floor 1.2 m below the camera, ceiling
# 1.8 m above it. Boxes stand inside and outside the circle, clear of the swaying path.
_ROOM_X = (-4.0, 14.0)
_ROOM_Z = (-9.0, 9.0)
_FLOOR_Y, _CEIL_Y = 1.2, -1.8
_N_BOXES = 36


@dataclass(frozen=True)
class Sequence:
    """Rendered frames with the ground truth: ``poses[i]`` is camera-to-world for ``frames[i]``."""

    frames: list[U8]
    K: F64
    poses: list[Pose]
    width: int
    height: int
    seed: int
    noise_sigma: float


def _rot_y(a: float) -> F64:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(a: float) -> F64:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def trajectory(n_frames: int) -> list[Pose]:
    """The camera-to-world poses of frames 0..n-1, with frame 0 at the origin looking along +z."""
    poses: list[Pose] = []
    for i in range(n_frames):
        theta = _STEP_RAD * i
        tangent_pos = _RADIUS_M * np.array([1.0 - math.cos(theta), 0.0, math.sin(theta)])
        side = np.array([math.cos(theta), 0.0, -math.sin(theta)])  # right of travel
        sway = _SWAY_M * math.sin(2 * math.pi * i / _SWAY_PERIOD)
        bob = _BOB_M * math.sin(2 * math.pi * i / _BOB_PERIOD)
        position = tangent_pos + sway * side + np.array([0.0, bob, 0.0])
        yaw = theta + _HEAD_RAD * math.sin(2 * math.pi * i / _HEAD_PERIOD)
        pitch = _PITCH_RAD * math.sin(2 * math.pi * i / _PITCH_PERIOD)
        poses.append((_rot_y(yaw) @ _rot_x(pitch), position))
    return poses  # frame 0 is the identity: every sway, bob and turn starts at phase 0


def relative_motion(a: Pose, b: Pose) -> Pose:
    """The motion from camera pose ``a`` to ``b`` (both camera-to-world) in OpenCV's
    recoverPose convention: ``x_b = R @ x_a + t``."""
    ra, ta = a
    rb, tb = b
    return rb.T @ ra, rb.T @ (ta - tb)


def _angle_deg(r: F64) -> float:
    cos = (float(np.trace(r)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def relative_errors(
    est_poses: list[Pose], true_poses: list[Pose]
) -> tuple[list[float], list[float]]:
    """Per consecutive frame pair: the rotation error (angle of ``R_est^T R_true``, degrees) and
    the translation-direction error (angle between the unit translations, degrees) of the
    relative motion. Scale does not enter: monocular odometry has none. A pair whose true or
    estimated translation is zero gets a direction error of 180."""
    if len(est_poses) != len(true_poses):
        raise ValueError(f"{len(est_poses)} estimated poses for {len(true_poses)} true ones")
    rot_errs: list[float] = []
    dir_errs: list[float] = []
    for i in range(1, len(true_poses)):
        r_est, t_est = relative_motion(est_poses[i - 1], est_poses[i])
        r_true, t_true = relative_motion(true_poses[i - 1], true_poses[i])
        rot_errs.append(_angle_deg(r_est.T @ r_true))
        n_est, n_true = float(np.linalg.norm(t_est)), float(np.linalg.norm(t_true))
        if n_est == 0.0 or n_true == 0.0:
            dir_errs.append(180.0)
            continue
        cos = float(t_est @ t_true) / (n_est * n_true)
        dir_errs.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))))
    return rot_errs, dir_errs


# --- textures -------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, size: int = _TEX_PX) -> U8:
    """A surface rich in corners at several scales: smooth colour variation, blobs, rectangles,
    lines, a checker patch and printed letters (what ORB and Shi-Tomasi find in a real room)."""
    base = rng.uniform(60, 200, size=3)
    coarse = rng.normal(0.0, 35.0, size=(6, 6, 3)).astype(np.float32)
    mid = rng.normal(0.0, 18.0, size=(24, 24, 3)).astype(np.float32)
    img = (
        base.astype(np.float32)
        + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        + cv2.resize(mid, (size, size), interpolation=cv2.INTER_CUBIC)
    )
    tex = np.asarray(np.clip(img, 0, 255), np.uint8)

    def colour() -> tuple[int, int, int]:
        c = rng.integers(0, 256, size=3)
        return int(c[0]), int(c[1]), int(c[2])

    def point() -> tuple[int, int]:
        p = rng.integers(0, size, size=2)
        return int(p[0]), int(p[1])

    for _ in range(int(rng.integers(25, 45))):
        kind = int(rng.integers(4))
        if kind == 0:
            radius = int(rng.integers(size // 60, size // 10))
            cv2.circle(tex, point(), radius, colour(), -1, cv2.LINE_AA)
        elif kind == 1:
            x, y = point()
            w, h = (int(v) for v in rng.integers(size // 40, size // 6, size=2))
            cv2.rectangle(tex, (x, y), (x + w, y + h), colour(), -1)
        elif kind == 2:
            cv2.line(tex, point(), point(), colour(), int(rng.integers(2, 8)), cv2.LINE_AA)
        else:
            pts = rng.integers(0, size // 5, size=(3, 2)) + np.array(point())
            cv2.fillConvexPoly(tex, pts.astype(np.int32), colour(), cv2.LINE_AA)
    # A checker patch: crisp corners at a known scale.
    cell = int(rng.integers(size // 40, size // 20))
    x0, y0 = (int(v) for v in rng.integers(0, size - 8 * cell, size=2))
    for j in range(6):
        for i in range(6):
            if (i + j) % 2 == 0:
                x, y = x0 + i * cell, y0 + j * cell
                cv2.rectangle(tex, (x, y), (x + cell - 1, y + cell - 1), colour(), -1)
    letters = string.ascii_uppercase + string.digits
    for _ in range(int(rng.integers(3, 7))):
        text = "".join(str(rng.choice(list(letters))) for _ in range(int(rng.integers(3, 8))))
        scale = float(rng.uniform(0.8, 2.5))
        cv2.putText(tex, text, point(), cv2.FONT_HERSHEY_SIMPLEX, scale, colour(),
                    max(1, int(scale * 2)), cv2.LINE_AA)  # fmt: skip
    return tex


def _pyramid(tex: U8) -> list[U8]:
    levels = [tex]
    while levels[-1].shape[0] > 16:
        levels.append(np.asarray(cv2.pyrDown(levels[-1]), np.uint8))
    return levels


# --- scene ----------------------------------------------------------------------------------


@dataclass
class _Quads:
    """Planar rectangles: corner ``origin`` and edges ``u`` (texture x) and ``v`` (texture y);
    the visible side faces along ``normal``. ``shade`` is a fixed lighting factor, ``texture``
    an index into the texture pool."""

    origin: F64  # (Q, 3)
    u: F64
    v: F64
    normal: F64
    shade: F64
    texture: npt.NDArray[np.int64]


class _QuadList:
    def __init__(self) -> None:
        self.rows: list[tuple[F64, F64, F64, F64, float]] = []

    def add(self, origin: F64, u: F64, v: F64, shade: float, toward: F64) -> None:
        """A rectangle whose visible side faces the point ``toward``."""
        normal = np.cross(u, v)
        normal /= np.linalg.norm(normal)
        if normal @ (toward - (origin + (u + v) / 2)) < 0:
            normal = -normal
        self.rows.append((origin, u, v, normal, shade))

    def build(self, rng: np.random.Generator) -> _Quads:
        origin, u, v, normal, shade = (np.array(column) for column in zip(*self.rows, strict=True))
        texture = rng.integers(0, _N_TEXTURES, size=len(self.rows))
        return _Quads(origin, u, v, normal, shade, texture)


_EX, _EY, _EZ = np.eye(3)  # world axes; y points down


def _room(quads: _QuadList) -> None:
    """Floor, ceiling and walls in tiles, seen from inside."""
    x0, x1 = _ROOM_X
    z0, z1 = _ROOM_Z
    height = _FLOOR_Y - _CEIL_Y
    inside = np.array([(x0 + x1) / 2, 0.0, (z0 + z1) / 2])
    nx, nz = round((x1 - x0) / _TILE_M), round((z1 - z0) / _TILE_M)
    for i in range(nx):
        x = x0 + i * _TILE_M
        for j in range(nz):
            z = z0 + j * _TILE_M
            quads.add(np.array([x, _FLOOR_Y, z]), _TILE_M * _EZ, _TILE_M * _EX, 0.95, inside)
            quads.add(np.array([x, _CEIL_Y, z]), _TILE_M * _EX, _TILE_M * _EZ, 0.7, inside)
        quads.add(np.array([x, _CEIL_Y, z1]), _TILE_M * _EX, height * _EY, 0.85, inside)
        quads.add(np.array([x, _CEIL_Y, z0]), _TILE_M * _EX, height * _EY, 0.8, inside)
    for j in range(nz):
        z = z0 + j * _TILE_M
        quads.add(np.array([x0, _CEIL_Y, z]), _TILE_M * _EZ, height * _EY, 0.75, inside)
        quads.add(np.array([x1, _CEIL_Y, z]), _TILE_M * _EZ, height * _EY, 0.9, inside)


def _boxes(quads: _QuadList, rng: np.random.Generator) -> None:
    """Boxes on the floor, inside and outside the trajectory's circle but clear of it."""
    centre = np.array([_RADIUS_M, 0.0, 0.0])
    for _ in range(_N_BOXES):
        inner = rng.random() < 0.35
        r = rng.uniform(1.0, 3.2) if inner else rng.uniform(6.9, 8.6)
        a = rng.uniform(0, 2 * math.pi)
        c = centre + r * np.array([math.cos(a), 0.0, math.sin(a)])
        w, d = rng.uniform(0.4, 1.0, size=2)
        h = rng.uniform(0.5, 2.9)
        yaw = rng.uniform(0, math.pi / 2)
        ax = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])  # the box's own x and z axes
        az = np.array([math.sin(yaw), 0.0, math.cos(yaw)])
        top = _FLOOR_Y - h
        # Four sides and the top, each facing away from the box's centre.
        base = c - ax * w / 2 - az * d / 2 + np.array([0.0, top, 0.0])
        corners = [base, base + ax * w, base + ax * w + az * d, base + az * d]
        edges = [ax * w, az * d, -ax * w, -az * d]
        middle = c + np.array([0.0, top + h / 2, 0.0])
        for k in range(4):
            face_centre = corners[k] + edges[k] / 2 + h * _EY / 2
            away = 2 * face_centre - middle
            quads.add(corners[k], edges[k], h * _EY, float(rng.uniform(0.6, 1.0)), away)
        quads.add(base, ax * w, az * d, 1.0, middle - h * _EY)


def _scene(rng: np.random.Generator) -> _Quads:
    quads = _QuadList()
    _room(quads)
    _boxes(quads, rng)
    return quads.build(rng)


def _clip_near(pts: F64) -> F64:
    """Clip a convex polygon (N, 3) in camera coordinates to z >= near (Sutherland-Hodgman)."""
    out: list[F64] = []
    n = len(pts)
    for k in range(n):
        a, b = pts[k], pts[(k + 1) % n]
        a_in, b_in = a[2] >= _NEAR_M, b[2] >= _NEAR_M
        if a_in:
            out.append(a)
        if a_in != b_in:
            s = (_NEAR_M - a[2]) / (b[2] - a[2])
            out.append(a + s * (b - a))
    return np.array(out)


class _Renderer:
    def __init__(self, width: int, height: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.width, self.height = width, height
        f = 0.9 * width
        self.K = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
        self.K_inv = np.linalg.inv(self.K)
        self.pyramids = [_pyramid(_texture(rng)) for _ in range(_N_TEXTURES)]
        self.quads = _scene(rng)
        # Horizontal and vertical half-angles' tangents, with a margin: for frustum culling.
        self.tan_x = (width / 2.0 + 2) / f
        self.tan_y = (height / 2.0 + 2) / f

    def render(self, pose: Pose) -> U8:
        r_cw, t_cw = pose
        q = self.quads
        r_wc = r_cw.T
        corners = np.stack([q.origin, q.origin + q.u, q.origin + q.u + q.v, q.origin + q.v], 1)
        cam = (corners - t_cw) @ r_wc.T  # (Q, 4, 3) in camera coordinates
        facing = np.einsum("qk,qk->q", q.normal, t_cw - q.origin) > 0
        z = cam[..., 2]
        x, y = cam[..., 0], cam[..., 1]
        outside = (
            np.all(z < _NEAR_M, axis=1)
            | np.all(x > self.tan_x * z, axis=1)
            | np.all(x < -self.tan_x * z, axis=1)
            | np.all(y > self.tan_y * z, axis=1)
            | np.all(y < -self.tan_y * z, axis=1)
        )
        visible = np.nonzero(facing & ~outside)[0]

        w, h = self.width, self.height
        image = np.zeros((h, w, 3), np.uint8)
        zbuf = np.zeros((h, w), np.float32)  # inverse depth; 0 = infinitely far
        for idx in visible:
            self._draw(int(idx), cam[idx], r_wc, t_cw, image=image, zbuf=zbuf)
        return image

    def _draw(self, idx: int, cam: F64, r_wc: F64, t_cw: F64, *, image: U8, zbuf: Any) -> None:
        q = self.quads
        poly = _clip_near(cam)
        if len(poly) < 3:
            return
        proj = poly @ self.K.T
        px = proj[:, :2] / proj[:, 2:3]
        xa, ya = np.floor(px.min(0)).astype(int)
        xb, yb = np.ceil(px.max(0)).astype(int) + 1
        xa, ya = max(xa, 0), max(ya, 0)
        xb, yb = min(xb, self.width), min(yb, self.height)
        if xb <= xa or yb <= ya:
            return
        bw, bh = xb - xa, yb - ya

        # Texture (level 0 texels) -> image pixels.
        pyramid = self.pyramids[int(q.texture[idx])]
        size = pyramid[0].shape[0]
        origin_c = r_wc @ (q.origin[idx] - t_cw)
        homography = self.K @ np.column_stack(
            [r_wc @ q.u[idx] / size, r_wc @ q.v[idx] / size, origin_c]
        )
        # Mip level from the texels per pixel at the polygon's centre (|det J| = det H / w^3).
        centre = px.mean(0)
        st = np.linalg.solve(homography, np.array([centre[0], centre[1], 1.0]))
        px_per_texel = abs(float(np.linalg.det(homography))) * abs(float(st[2])) ** 3  # areas
        texels_per_px = 1.0 / max(px_per_texel, 1e-12)
        level = min(int(0.5 * math.log2(max(texels_per_px, 1.0))), len(pyramid) - 1)
        tex = pyramid[level]
        scale = float(2**level)
        to_local = np.array([[1.0, 0.0, -xa], [0.0, 1.0, -ya], [0.0, 0.0, 1.0]])
        h_local = to_local @ homography @ np.diag([scale, scale, 1.0])
        warped = cv2.warpPerspective(tex, h_local, (bw, bh), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT)  # fmt: skip

        mask = np.zeros((bh, bw), np.uint8)
        shift = 4  # sub-pixel polygon edges (1/16 px)
        pts = np.round((px - [xa, ya]) * (1 << shift)).astype(np.int32)
        cv2.fillConvexPoly(mask, pts, 1, cv2.LINE_8, shift)

        # Inverse depth of the plane n.X = d at pixel (u, v): n . K^-1 [u, v, 1] / d.
        n_c = r_wc @ q.normal[idx]
        d_c = float(n_c @ origin_c)
        coeff = (n_c @ self.K_inv) / d_c
        us = np.arange(xa, xb, dtype=np.float32)
        vs = np.arange(ya, yb, dtype=np.float32)
        inv_z = (coeff[0] * us)[None, :] + (coeff[1] * vs + coeff[2])[:, None]
        region = zbuf[ya:yb, xa:xb]
        write = (mask > 0) & (inv_z > region)
        np.copyto(region, inv_z, where=write)
        shaded = cv2.convertScaleAbs(warped, alpha=float(q.shade[idx]))
        np.copyto(image[ya:yb, xa:xb], shaded, where=write[..., None])


def render_sequence(
    n_frames: int, *, width: int = 640, height: int = 480, seed: int = 0, noise_sigma: float = 2.0
) -> Sequence:
    """Render ``n_frames`` frames of the scene of ``seed`` along the fixed trajectory (see the
    module docstring), with Gaussian pixel noise of ``noise_sigma`` grey levels. About 30 ms of
    one core per 640x480 frame, plus 0.3 s for the textures."""
    if n_frames < 1:
        raise ValueError("need at least one frame")
    return render_poses(
        trajectory(n_frames), width=width, height=height, seed=seed, noise_sigma=noise_sigma
    )


def render_poses(
    poses: list[Pose],
    *,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    noise_sigma: float = 2.0,
) -> Sequence:
    """Render the scene of ``seed`` from the given camera-to-world poses (for motions the
    fixed trajectory lacks: standing still, turning on the spot). Poses must stay inside the
    room, x in (-4, 14), z in (-9, 9), and clear of its boxes near the circle of
    ``trajectory``."""
    if width < 16 or height < 16:
        raise ValueError("frames must be at least 16x16 pixels")
    renderer = _Renderer(width, height, seed)
    noise_rng = np.random.default_rng(seed + 0x5EED)
    # Gaussian noise through its 256 quantiles: a table look-up of random bytes costs a third
    # of numpy's normal sampler, and the sum is rounded to whole grey levels anyway.
    normal = statistics.NormalDist()
    quantiles = np.array([normal.inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
    noise_lut = quantiles * np.float32(noise_sigma / float(quantiles.std()))
    frames: list[U8] = []
    for pose in poses:
        image = cv2.GaussianBlur(renderer.render(pose), (0, 0), 0.6)
        if noise_sigma > 0:
            uniform = np.asarray(noise_rng.integers(0, 256, image.shape, np.uint8), np.uint8)
            noise = cv2.LUT(uniform, noise_lut)
            # Rounds and saturates to 0..255.
            image = cv2.addWeighted(image, 1.0, noise, 1.0, 0.0, dtype=cv2.CV_8U)
        frames.append(np.asarray(image, np.uint8))
    return Sequence(
        frames=frames,
        K=renderer.K.copy(),
        poses=list(poses),
        width=width,
        height=height,
        seed=seed,
        noise_sigma=noise_sigma,
    )
