"""Camera calibration (intrinsics + lidar->camera extrinsics) from dataset files and from a static YAML.

Every reader returns ``CameraCalibration`` with a plain pinhole/distortion ``CameraModel`` and a rigid
``T_cam_lidar``. Dataset projection matrices ``P = K [I | K^-1 p]`` (KITTI's rectified P2/P3 carry a
baseline column) are split into ``K`` and a translation folded into ``T_cam_lidar``, so that
``project_points`` reproduces ``P @ T`` exactly.

Static extrinsics YAML, for rigs without TF (``write_static_extrinsics`` writes this form)::

    lidar_frame_id: velodyne          # default for the cameras below
    cameras:
      - name: front                   # the camera name in the sal_ros configuration
        frame_id: front_optical       # the frame_id of its images
        lidar_frame_id: velodyne      # optional, overrides the default
        T_cam_lidar:                  # 4x4, lidar points -> camera optical frame (x right, y down, z forward)
          - [0.0, -1.0, 0.0, 0.0]
          - [0.0, 0.0, -1.0, -0.08]
          - [1.0, 0.0, 0.0, -0.27]
          - [0.0, 0.0, 0.0, 1.0]
        time_offset: 0.0              # optional, seconds: camera stamp - lidar stamp of a matching pair
        intrinsics:                   # optional; otherwise CameraInfo provides them
          width: 1241
          height: 376
          K: [[718.856, 0.0, 607.19], [0.0, 718.856, 185.22], [0.0, 0.0, 1.0]]
          D: []
          distortion_model: none
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

from sal_ros.core.camera import CameraModel
from sal_ros.core.errors import CalibrationError
from sal_ros.core.files import atomic_write
from sal_ros.core.msgtypes import NS_PER_S
from sal_ros.core.transforms import is_rigid
from sal_ros.core.yamlfile import load_yaml

NUSCENES_IMAGE_SIZE = (1600, 900)
NUSCENES_CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
RIGID_TOL = 1e-4  # dataset and hand-written rotations carry ~1e-7..1e-5 of rounding


@dataclass
class CameraCalibration:
    """One camera: intrinsics (None when CameraInfo supplies them) and the lidar->camera transform."""

    name: str
    camera: CameraModel | None
    T_cam_lidar: np.ndarray  # (4, 4) float64, lidar -> camera optical frame
    frame_id: str  # camera optical frame id
    lidar_frame_id: str
    time_offset_ns: int = 0  # camera stamp - lidar stamp
    stamp_ns: int | None = None  # absolute camera stamp where a dataset records one (nuScenes)

    def __post_init__(self) -> None:
        self.T_cam_lidar = _rigid_matrix(self.T_cam_lidar, f"camera {self.name!r}: T_cam_lidar")
        self.time_offset_ns = int(self.time_offset_ns)


def _rigid_matrix(value: Any, what: str) -> np.ndarray:
    try:
        T = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{what}: not a numeric matrix ({exc})") from exc
    if T.shape != (4, 4):
        raise CalibrationError(f"{what}: expected a 4x4 matrix, got shape {T.shape}")
    if not is_rigid(T, RIGID_TOL):
        raise CalibrationError(f"{what}: not a rigid transform (rotation must be orthonormal with det +1, "
                               f"last row [0 0 0 1]):\n{np.array2string(T, precision=6)}")
    return T


def fold_projection(P: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 3x4 projection ``P = [K | p]`` applied after ``T`` into ``K`` and ``T'`` with ``K T'[:3] == P T``."""
    P = np.asarray(P, dtype=np.float64)
    K = P[:, :3].copy()
    if not (np.allclose(K[2], [0, 0, 1]) and K[1, 0] == 0 and K[0, 0] > 0 and K[1, 1] > 0):
        raise CalibrationError(f"projection matrix is not of the form K [I | t]: {P.tolist()}")
    T = np.array(T, dtype=np.float64)
    T[:3, 3] += np.linalg.solve(K, P[:, 3])
    return K, T


# ------------------------------------------------------------------------------------------------- KITTI


def read_kitti_txt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``KEY: v1 v2 ...`` lines of a KITTI calibration file -> flat float64 arrays."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration {path}: {exc}") from exc
    out = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, values = line.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            out[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as exc:
            raise CalibrationError(f"{path}:{number}: not a 'KEY: numbers' line ({exc})") from exc
    return out


def _kitti_entry(calib: dict[str, np.ndarray], key: str, shape: tuple[int, int], path: Any) -> np.ndarray:
    if key not in calib:
        raise CalibrationError(f"{path}: no {key} (has {', '.join(calib)})")
    values = calib[key]
    if values.size != shape[0] * shape[1]:
        raise CalibrationError(f"{path}: {key} has {values.size} values, expected {shape[0] * shape[1]}")
    return values.reshape(shape)


def _homogeneous(M: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[: M.shape[0], : M.shape[1]] = M
    return T


def read_semantickitti_calib(
    calib_txt: str | os.PathLike,
    image_size: tuple[int, int] = (1241, 376),
    cameras: Iterable[str] = ("image_0",),
    lidar_frame_id: str = "velodyne",
) -> dict[str, CameraCalibration]:
    """Odometry-form ``calib.txt``: camera ``image_k`` projects as ``Pk @ Tr`` (rectified, no R0_rect)."""
    calib = read_kitti_txt(calib_txt)
    Tr = _homogeneous(_kitti_entry(calib, "Tr", (3, 4), calib_txt))
    out = {}
    for name in cameras:
        index = _kitti_camera_index(name)
        K, T = fold_projection(_kitti_entry(calib, f"P{index}", (3, 4), calib_txt), Tr)
        out[name] = CameraCalibration(name=name, camera=CameraModel(K=K, width=image_size[0], height=image_size[1]),
                                      T_cam_lidar=T, frame_id=f"cam{index}", lidar_frame_id=lidar_frame_id)
    return out


def read_kitti_object_calib(
    path: str | os.PathLike,
    image_size: tuple[int, int],
    camera: str = "image_2",
    lidar_frame_id: str = "velodyne",
) -> CameraCalibration:
    """Object-form calibration: ``image_k`` projects as ``Pk @ R0_rect @ Tr_velo_to_cam``."""
    calib = read_kitti_txt(path)
    index = _kitti_camera_index(camera)
    rect = _homogeneous(_kitti_entry(calib, "R0_rect", (3, 3), path))
    velo_to_cam = _homogeneous(_kitti_entry(calib, "Tr_velo_to_cam", (3, 4), path))
    K, T = fold_projection(_kitti_entry(calib, f"P{index}", (3, 4), path), rect @ velo_to_cam)
    return CameraCalibration(name=camera, camera=CameraModel(K=K, width=image_size[0], height=image_size[1]),
                             T_cam_lidar=T, frame_id=f"cam{index}", lidar_frame_id=lidar_frame_id)


def read_kitti_frustum_calib(
    calib_json: str | os.PathLike,
    image_size: tuple[int, int] = (1242, 375),
    lidar_frame_id: str = "velodyne",
) -> CameraCalibration:
    """The frustum sample's ``calib.json`` (4x4 P2, R0_rect, Tr_velo_to_cam; lidar2img checked against them)."""
    data = load_calibration_json(calib_json)
    mats = {}
    for key in ("P2", "R0_rect", "Tr_velo_to_cam", "lidar2img"):
        M = np.asarray(_key(data, key, calib_json), dtype=np.float64)
        if M.shape != (4, 4):
            raise CalibrationError(f"{calib_json}: {key} must be 4x4, got {M.shape}")
        mats[key] = M
    K, T = fold_projection(mats["P2"][:3], mats["R0_rect"] @ mats["Tr_velo_to_cam"])
    product = mats["P2"] @ mats["R0_rect"] @ mats["Tr_velo_to_cam"]
    if not np.allclose(product, mats["lidar2img"], rtol=1e-5, atol=1e-3):
        raise CalibrationError(f"{calib_json}: lidar2img disagrees with P2 @ R0_rect @ Tr_velo_to_cam")
    return CameraCalibration(name="image_2", camera=CameraModel(K=K, width=image_size[0], height=image_size[1]),
                             T_cam_lidar=T, frame_id="cam2", lidar_frame_id=lidar_frame_id)


def _kitti_camera_index(name: str) -> int:
    match = re.fullmatch(r"image_([0-3])", name)
    if not match:
        raise CalibrationError(f"unknown KITTI camera {name!r} (expected image_0 .. image_3)")
    return int(match.group(1))


# ----------------------------------------------------------------------------------------------- nuScenes


def nuscenes_stamp_ns(seconds: float) -> int:
    """nuScenes timestamps are integer microseconds; JSON floats in seconds are rounded back to them."""
    return int(round(float(seconds) * 1e6)) * 1000


def nuscenes_stamp_from_name(filename: str) -> int | None:
    """Stamp (ns) from a nuScenes sample file name ``...__CHANNEL__<microseconds>.ext``, or None."""
    match = re.search(r"__(\d{10,})\.", Path(filename).name)
    return int(match.group(1)) * 1000 if match else None


def read_nuscenes_calib(
    calib_json: str | os.PathLike,
    image_size: tuple[int, int] = NUSCENES_IMAGE_SIZE,
    lidar_frame_id: str = "LIDAR_TOP",
) -> dict[str, CameraCalibration]:
    """Six cameras: K = cam2img, T_cam_lidar = lidar2cam (ego motion to each camera's time already included),
    ``stamp_ns`` = the camera's timestamp, ``time_offset_ns`` = camera stamp - lidar stamp."""
    data = load_calibration_json(calib_json)
    lidar_stamp = nuscenes_stamp_from_name(str(data.get("lidar_path", "")))
    if lidar_stamp is None:
        lidar_stamp = nuscenes_stamp_ns(_key(data, "timestamp", calib_json))
    cams = _key(data, "cams", calib_json)
    out = {}
    for name, cam in cams.items():
        where = f"{calib_json}: cams.{name}"
        stamp = nuscenes_stamp_ns(_key(cam, "timestamp", where))
        K = np.asarray(_key(cam, "cam2img", where), dtype=np.float64)
        if K.shape != (3, 3):
            raise CalibrationError(f"{where}.cam2img must be 3x3, got {K.shape}")
        try:
            model = CameraModel(K=K, width=image_size[0], height=image_size[1])
        except CalibrationError as exc:
            raise CalibrationError(f"{where}: {exc}") from exc
        out[name] = CameraCalibration(name=name, camera=model, T_cam_lidar=_key(cam, "lidar2cam", where),
                                      frame_id=name, lidar_frame_id=lidar_frame_id,
                                      time_offset_ns=stamp - lidar_stamp, stamp_ns=stamp)
    return out


def load_calibration_json(path: str | os.PathLike) -> dict:
    """A JSON calibration file as a dict (CalibrationError when unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read calibration {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a JSON object")
    return data


def _key(data: Mapping, key: str, where: Any) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise CalibrationError(f"{where}: missing '{key}'")
    return data[key]


# ------------------------------------------------------------------------------------- static extrinsics

_CAMERA_KEYS = {"name", "frame_id", "lidar_frame_id", "T_cam_lidar", "time_offset", "intrinsics"}
_INTRINSICS_KEYS = {"width", "height", "K", "D", "distortion_model"}


def write_static_extrinsics(
    path: str | os.PathLike, calibs: Mapping[str, CameraCalibration] | Iterable[CameraCalibration],
    lidar_frame_id: str,
) -> None:
    """Write the static-extrinsics YAML atomically (temp file + rename), values exact on reading back."""
    items = list(calibs.values()) if isinstance(calibs, Mapping) else list(calibs)
    cameras = []
    for c in items:
        entry: dict[str, Any] = {"name": c.name, "frame_id": c.frame_id}
        if c.lidar_frame_id != lidar_frame_id:
            entry["lidar_frame_id"] = c.lidar_frame_id
        entry["T_cam_lidar"] = [[float(v) for v in row] for row in np.asarray(c.T_cam_lidar)]
        entry["time_offset"] = c.time_offset_ns / NS_PER_S
        if c.camera is not None:
            entry["intrinsics"] = {
                "width": c.camera.width,
                "height": c.camera.height,
                "K": [[float(v) for v in row] for row in c.camera.K],
                "D": [float(v) for v in c.camera.D],
                "distortion_model": c.camera.distortion_model,
            }
        cameras.append(entry)
    text = ("# sal_ros static extrinsics: T_cam_lidar maps lidar points into the camera optical frame\n"
            + yaml.safe_dump({"lidar_frame_id": lidar_frame_id, "cameras": cameras},
                             sort_keys=False, default_flow_style=None))
    atomic_write(path, text)


def read_static_extrinsics(path: str | os.PathLike) -> dict[str, CameraCalibration]:
    """The static-extrinsics YAML -> calibrations by camera name (CalibrationError naming what is wrong)."""
    try:
        data = load_yaml(path, "static extrinsics")
    except OSError as exc:
        raise CalibrationError(f"cannot read static extrinsics {path}: {exc}") from exc
    except ValueError as exc:  # the text names the file
        raise CalibrationError(f"cannot read {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cameras"), list) or not data["cameras"]:
        raise CalibrationError(f"{path}: expected a mapping with a non-empty 'cameras' list")
    default_lidar = data.get("lidar_frame_id")
    out: dict[str, CameraCalibration] = {}
    for i, entry in enumerate(data["cameras"]):
        calib = _static_camera(entry, default_lidar, f"{path}: cameras[{i}]")
        if calib.name in out:
            raise CalibrationError(f"{path}: camera {calib.name!r} appears twice")
        out[calib.name] = calib
    return out


def _static_camera(entry: Any, default_lidar: Any, where: str) -> CameraCalibration:
    if not isinstance(entry, dict):
        raise CalibrationError(f"{where}: expected a mapping")
    unknown = set(entry) - _CAMERA_KEYS
    if unknown:
        raise CalibrationError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_CAMERA_KEYS)})")
    for key in ("name", "frame_id", "T_cam_lidar"):
        _key(entry, key, where)
    lidar = entry.get("lidar_frame_id", default_lidar)
    if not lidar:
        raise CalibrationError(f"{where}: missing 'lidar_frame_id' (per camera or at the top level)")
    try:
        offset_ns = int(round(float(entry.get("time_offset", 0.0)) * NS_PER_S))
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{where}: time_offset must be a number of seconds") from exc
    camera = _static_intrinsics(entry["intrinsics"], f"{where}.intrinsics") if "intrinsics" in entry else None
    try:
        return CameraCalibration(name=str(entry["name"]), camera=camera, T_cam_lidar=entry["T_cam_lidar"],
                                 frame_id=str(entry["frame_id"]), lidar_frame_id=str(lidar),
                                 time_offset_ns=offset_ns)
    except CalibrationError as exc:
        raise CalibrationError(f"{where}: {exc}") from exc


def _static_intrinsics(data: Any, where: str) -> CameraModel:
    if not isinstance(data, dict):
        raise CalibrationError(f"{where}: expected a mapping")
    unknown = set(data) - _INTRINSICS_KEYS
    if unknown:
        raise CalibrationError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_INTRINSICS_KEYS)})")
    for key in ("width", "height", "K"):
        _key(data, key, where)
    try:
        K = np.array(data["K"], dtype=np.float64)
        D = np.array(data.get("D") or [], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{where}: K and D must be numeric ({exc})") from exc
    if K.shape != (3, 3):
        raise CalibrationError(f"{where}: K must be 3x3, got shape {K.shape}")
    try:
        return CameraModel(K=K, width=int(data["width"]), height=int(data["height"]), D=D,
                           distortion_model=str(data.get("distortion_model", "none")))
    except (CalibrationError, TypeError, ValueError) as exc:
        raise CalibrationError(f"{where}: {exc}") from exc
