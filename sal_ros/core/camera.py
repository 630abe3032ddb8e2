"""Camera intrinsics and vectorized lidar -> image projection.

Pixel convention (OpenCV / ROS image_geometry): pixel centres sit at integer coordinates,
``u = fx * x / z + s * y / z + cx``. A projected point is *valid* when it is finite, in front of the camera
(``depth > min_depth``) and ``0 <= u < width``, ``0 <= v < height``; ``Projection.pixels()`` floors valid
coordinates to (col, row) indices, which are then always inside the image.

Distortion is applied in the forward direction (3D -> pixel), as ``cv2.projectPoints`` / ``cv2.fisheye``
do, for the ROS models ``plumb_bob`` (k1 k2 p1 p2 k3), ``rational_polynomial`` (k1 k2 p1 p2 k3 k4 k5 k6) and
``equidistant`` (Kannala-Brandt fisheye, k1 k2 k3 k4). Polynomial distortion folds back beyond the radius where
its radial mapping stops increasing: a point far outside the field of view can land in the middle of the image.
Such points are marked invalid (the radial limit is computed once per model; tangential terms are not part of it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from sal_ros.core.errors import CalibrationError, MalformedMessageError, SensorDataError

# distortion model -> number of coefficients in D
DISTORTION_MODELS = {"none": 0, "plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4}


@dataclass(frozen=True, eq=False)
class CameraModel:
    """Intrinsics of the image as delivered (binning and ROI already applied to ``K`` and the size)."""

    K: np.ndarray  # (3, 3) float64, last row [0, 0, 1]
    width: int
    height: int
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    distortion_model: str = "none"

    def __post_init__(self) -> None:
        K = np.array(self.K, dtype=np.float64)
        D = np.array(self.D, dtype=np.float64).reshape(-1)
        problem = _intrinsics_problem(K, D, self.distortion_model, self.width, self.height)
        if problem:
            raise CalibrationError(f"camera model: {problem}")
        K.setflags(write=False)
        D.setflags(write=False)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "D", D)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_camera_info(cls, msg: Any, rectified: bool = False) -> "CameraModel":
        """A sensor_msgs/CameraInfo (rclpy or rosbags) -> the model of the image published with it.

        Binning and ROI are applied as image_geometry does. ``rectified=True`` describes the rectified image
        (``image_rect``): intrinsics from ``P``, no distortion; points then project from the frame that
        :meth:`rectification` maps the optical frame to.
        """
        width, height = int(msg.width), int(msg.height)
        if width <= 0 or height <= 0:
            raise MalformedMessageError(f"CameraInfo: image size {width}x{height} is empty")
        K = _matrix(msg.k, (3, 3), "k")
        D = np.asarray(msg.d, dtype=np.float64).reshape(-1)
        model = str(msg.distortion_model)
        if rectified:
            K = _matrix(msg.p, (3, 4), "p")[:, :3].copy()
            D, model = np.zeros(0), "none"
        elif model == "" and not np.any(D):
            model = "none"  # simulators often leave the model empty with no coefficients
        problem = _intrinsics_problem(K, D, model, width, height)
        if problem:
            raise MalformedMessageError(f"CameraInfo: {problem}")
        K, width, height = _apply_binning_roi(msg, K, width, height)
        return cls(K=K, width=width, height=height, D=D, distortion_model=model)

    @staticmethod
    def rectification(msg: Any) -> np.ndarray:
        """4x4 from the camera's optical frame (its TF frame) to the frame the ``rectified=True`` pinhole
        ``P[:, :3]`` looks from: the rectification rotation R, then P's translation folded in (a stereo right
        camera's baseline, ``Tx = -fx * B``), so that ``P[:, :3] (T X)[:3] == P [R X; 1]`` as image_geometry
        projects. An all-zero R (drivers that leave it unset) means identity."""
        R = _matrix(msg.r, (3, 3), "r")
        if not np.any(R):
            R = np.eye(3)
        if not np.all(np.isfinite(R)) or not np.allclose(R @ R.T, np.eye(3), atol=1e-6) or np.linalg.det(R) < 0:
            raise MalformedMessageError(f"CameraInfo: r is not a rotation: {np.array2string(R, precision=6)}")
        P = _matrix(msg.p, (3, 4), "p")
        problem = _intrinsics_problem(P[:, :3], np.zeros(0), "none", int(msg.width), int(msg.height))
        if problem:
            raise MalformedMessageError(f"CameraInfo: p: {problem}")
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = np.linalg.solve(P[:, :3], P[:, 3])
        return T

    def to_camera_info_fields(self) -> dict[str, Any]:
        """Fields of an equivalent CameraInfo (k, d, r, p, width, height, distortion_model), plain Python values.

        A model without distortion is written as ``plumb_bob`` with five zeros, which every ROS consumer reads.
        """
        model, d = self.distortion_model, [float(x) for x in self.D]
        if model == "none":
            model, d = "plumb_bob", [0.0] * 5
        p = np.zeros((3, 4))
        p[:, :3] = self.K
        return {
            "k": [float(x) for x in self.K.reshape(-1)],
            "d": d,
            "r": [float(x) for x in np.eye(3).reshape(-1)],
            "p": [float(x) for x in p.reshape(-1)],
            "width": self.width,
            "height": self.height,
            "distortion_model": model,
        }

    # ------------------------------------------------------------------------------------------- distortion

    @property
    def is_distorted(self) -> bool:
        """False when projection is plain pinhole (equidistant is never pinhole, even with zero coefficients)."""
        return self.distortion_model == "equidistant" or bool(np.any(self.D))

    def distort(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalized pinhole coordinates (x/z, y/z) -> distorted normalized coordinates."""
        if not self.is_distorted:
            return x, y
        if self.distortion_model == "equidistant":
            r = np.hypot(x, y)
            scale = _fisheye_theta_d(np.arctan(r), self.D)
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(r > 0, scale / r, 1.0)
            return x * scale, y * scale
        k1, k2, p1, p2, k3 = self.D[:5]
        r2 = x * x + y * y
        radial = _radial_factor(r2, self.D)
        xy = x * y
        xd = x * radial + 2.0 * p1 * xy + p2 * (r2 + 2.0 * x * x)
        yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * xy
        return xd, yd

    @cached_property
    def max_undistorted_radius(self) -> float:
        """Largest normalized radius sqrt((x/z)^2 + (y/z)^2) up to which the radial mapping is monotonic
        (``inf`` without distortion): beyond it distorted points fold back and are not trusted."""
        if not self.is_distorted:
            return float("inf")
        theta = np.linspace(0.0, np.pi / 2, 20001)[:-1]
        r = np.tan(theta)
        if self.distortion_model == "equidistant":
            mapped = _fisheye_theta_d(theta, self.D)
        else:
            with np.errstate(all="ignore"):
                mapped = r * _radial_factor(r * r, self.D)
        with np.errstate(invalid="ignore"):
            rising = np.isfinite(mapped[1:]) & (np.diff(mapped) > 0)
        turn = np.flatnonzero(~rising)
        return float(r[turn[0]]) if turn.size else float("inf")


def _radial_factor(r2: np.ndarray, D: np.ndarray) -> np.ndarray:
    k1, k2, _, _, k3 = D[:5]
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    if D.size == 8:  # rational_polynomial: divide by 1 + k4 r^2 + k5 r^4 + k6 r^6
        k4, k5, k6 = D[5:8]
        denom = 1.0 + r2 * (k4 + r2 * (k5 + r2 * k6))
        with np.errstate(divide="ignore", invalid="ignore"):
            radial = np.where(denom > 0, radial / denom, np.nan)
    return radial


def _fisheye_theta_d(theta: np.ndarray, D: np.ndarray) -> np.ndarray:
    k1, k2, k3, k4 = D[:4]
    t2 = theta * theta
    return theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))


def _matrix(values: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != shape[0] * shape[1]:
        raise MalformedMessageError(f"CameraInfo: {name} has {arr.size} values, expected {shape[0] * shape[1]}")
    return arr.reshape(shape)


def _intrinsics_problem(K: np.ndarray, D: np.ndarray, model: str, width: int, height: int) -> str | None:
    """What is wrong with these intrinsics, or None."""
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        return f"K must be a finite 3x3 matrix, got {np.array2string(K.reshape(-1), precision=4)}"
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        return f"K has non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]} (uncalibrated camera?)"
    if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0.0:
        return f"K must have the form [[fx s cx] [0 fy cy] [0 0 1]], got {np.array2string(K, precision=4)}"
    if int(width) <= 0 or int(height) <= 0:
        return f"image size {width}x{height} is empty"
    if model not in DISTORTION_MODELS:
        return f"unknown distortion model {model!r} (supported: {', '.join(DISTORTION_MODELS)})"
    expected = DISTORTION_MODELS[model]
    if D.size != expected and not (model == "none" and not np.any(D)):
        return f"distortion model {model!r} needs {expected} coefficients in D, got {D.size}"
    if not np.all(np.isfinite(D)):
        return "D holds non-finite coefficients"
    return None


def _apply_binning_roi(msg: Any, K: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Intrinsics of the delivered image: ROI offsets shift the principal point, binning scales everything."""
    bx, by = max(int(msg.binning_x), 1), max(int(msg.binning_y), 1)
    roi = msg.roi
    x0, y0, rw, rh = int(roi.x_offset), int(roi.y_offset), int(roi.width), int(roi.height)
    if rw == 0 or rh == 0:  # ROS: an all-zero ROI means the full image
        x0, y0, rw, rh = 0, 0, width, height
    if x0 + rw > width or y0 + rh > height:
        raise MalformedMessageError(
            f"CameraInfo: roi {rw}x{rh}+{x0}+{y0} does not fit the {width}x{height} image")
    if (bx, by, x0, y0, rw, rh) == (1, 1, 0, 0, width, height):
        return K, width, height
    K = K.copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    K[0] /= bx
    K[1] /= by
    if rw // bx == 0 or rh // by == 0:
        raise MalformedMessageError(f"CameraInfo: binning {bx}x{by} leaves no pixels of the {rw}x{rh} roi")
    return K, rw // bx, rh // by


class Projection(NamedTuple):
    """Per-point projection result, same length and order as the input points (unpacks as uv, depth, valid)."""

    uv: np.ndarray  # (N, 2) float64 pixel coordinates (u = column, v = row); NaN behind the camera
    depth: np.ndarray  # (N,) float64 z in the camera optical frame
    valid: np.ndarray  # (N,) bool: finite, depth > min_depth, inside the image, inside the model's domain

    @property
    def indices(self) -> np.ndarray:
        """Indices of the valid points (into the input points)."""
        return np.flatnonzero(self.valid)

    def pixels(self) -> np.ndarray:
        """(M, 2) int64 (col, row) of the valid points, in the order of ``indices``."""
        return np.floor(self.uv[self.valid]).astype(np.int64)


def project_points(
    points: np.ndarray, T_cam_lidar: np.ndarray, camera: CameraModel, min_depth: float = 0.0
) -> Projection:
    """Project lidar points (N, 3) into ``camera`` through ``T_cam_lidar`` (lidar -> camera optical frame)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise SensorDataError(f"project_points: points must be (N, 3), got {pts.shape}")
    T = np.asarray(T_cam_lidar, dtype=np.float64)
    if T.shape != (4, 4):
        raise CalibrationError(f"project_points: T_cam_lidar must be 4x4, got {T.shape}")
    pc = pts.astype(np.float64, copy=False) @ T[:3, :3].T + T[:3, 3]
    depth = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_z = np.where(depth > 0, 1.0 / depth, np.nan)
    x, y = pc[:, 0] * inv_z, pc[:, 1] * inv_z
    in_domain = np.hypot(x, y) < camera.max_undistorted_radius if camera.is_distorted else True
    xd, yd = camera.distort(x, y)
    K = camera.K
    u = K[0, 0] * xd + K[0, 1] * yd + K[0, 2]
    v = K[1, 1] * yd + K[1, 2]
    with np.errstate(invalid="ignore"):
        valid = (depth > min_depth) & (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
    valid &= in_domain  # NaN coordinates already failed the comparisons above
    return Projection(uv=np.stack([u, v], axis=1), depth=depth, valid=valid)


def image_size_problem(image: np.ndarray, camera: CameraModel) -> tuple[str, str] | None:
    """(reason, text) when an image cannot be the one its calibration describes, else None: an empty image, or
    one whose size differs from the camera model's (points would be projected into pixels it does not have).
    Node, recorder and pseudo-labeling all leave such a camera out under the same reason."""
    height, width = (np.shape(image) + (0, 0))[:2]
    return size_problem(width, height, camera)


def size_problem(width: int, height: int, camera: CameraModel) -> tuple[str, str] | None:
    """``image_size_problem`` from a ``width`` x ``height`` (read from a header, before decoding)."""
    if width == 0 or height == 0:
        return "empty_image", f"image is empty ({width}x{height})"
    if (width, height) != (camera.width, camera.height):
        return "image_size_mismatch", (f"image is {width}x{height} but its calibration (CameraInfo or calibration "
                                       f"file) is for {camera.width}x{camera.height}")
    return None


def in_camera_frustum(frame, min_depth: float = 1.0) -> np.ndarray:
    """(N,) bool: the point of ``frame`` projects into at least one of its camera images."""
    inside = np.zeros(frame.num_points, bool)
    for view in frame.cameras.values():
        inside |= project_points(frame.points, view.T_cam_lidar, view.camera, min_depth).valid
    return inside


def project_view(points: np.ndarray, view, min_depth: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, uv (P, 2) float, depth (P,)) of the points in front of the camera and inside its image."""
    T = np.asarray(view.T_cam_lidar, np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise CalibrationError(f"camera {view.name}: T_cam_lidar must be a finite 4x4 matrix, got {T.shape}")
    proj = project_points(points, T, view.camera, min_depth)
    h, w = view.image.shape[:2]
    uv = np.asarray(proj.uv, np.float64)
    valid = np.asarray(proj.valid, bool) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    index = np.flatnonzero(valid)
    return index, uv[index], np.asarray(proj.depth, np.float32)[index]
