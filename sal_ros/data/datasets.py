"""Readers of the raw datasets (SemanticKITTI, KITTI object, nuScenes samples, KITTI frustum) into ``Frame``s.

``iter_*`` functions read one frame at a time (a full SemanticKITTI sequence does not fit in memory with
images); ``load_*`` are the list forms. sal_ros.data.layouts recognises the layouts (``is_*``) and
parses a ``Selection``; sal_ros.data.sources opens them.

Layouts (as in ../shared/data):
- semantickitti: ``sequences/<seq>/{velodyne/*.bin, labels/*.label, image_k/*.png, calib.txt, times.txt, poses.txt}``
  (several sequences under one root; any of the cameras image_0..image_3, e.g. the colour image_2 with P2; a
  ``Selection`` such as ``00,05:0-4`` picks sequences and scan ranges);
- kitti_object: ``[training/]{velodyne, calib, image_2, label_2}/<id>.*`` (no time stamps: frame ``i`` is stamped
  ``i * 100 ms``, the sensor rate, so replays keep the order);
- nuscenes: a folder with ``calib.json`` naming the LIDAR_TOP file and the six camera images;
- kitti_frustum: a folder with ``calib.json`` holding ``lidar2img``, ``<id>.bin`` and ``<id>.png``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from sal_ros.core.calibration import (
    CameraCalibration,
    load_calibration_json,
    nuscenes_stamp_from_name,
    nuscenes_stamp_ns,
    read_kitti_frustum_calib,
    read_kitti_object_calib,
    read_kitti_txt,
    read_nuscenes_calib,
    read_semantickitti_calib,
)
from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import check_regular_file
from sal_ros.core.image import DEFAULT_MAX_PIXELS, check_pixels, compressed_image_size
from sal_ros.core.types import CameraView, Frame
from sal_ros.core.yamlfile import load_yaml
from sal_ros.data.layouts import Selection, selected_sequences, semantickitti_sequences

KITTI_PERIOD_NS = 100_000_000  # 10 Hz
HEADER_BYTES = 1 << 18  # where an image file's size must show up (a JPEG's APP segments come first)
SEMANTICKITTI_THINGS = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                        "motorcyclist")


# --------------------------------------------------------------------------------------------- file readers


def read_points(path: str | os.PathLike, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 point file with ``columns`` values per point -> (xyz (N, 3) float32, intensity (N,) float32)."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % columns:
        raise SensorDataError(f"{path}: {raw.size} float32 values is not a multiple of {columns} per point")
    raw = raw.reshape(-1, columns)
    return np.ascontiguousarray(raw[:, :3]), np.ascontiguousarray(raw[:, 3])


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file -> (H, W) uint8 mono or (H, W, 3) uint8 RGB (16-bit mono stays uint16). A file PIL cannot
    decode (corrupt, truncated, empty, not an image, not a regular file, a header over ``max_pixels``) raises
    SensorDataError naming it."""
    try:
        check_regular_file(path, None, "image")
        with open(path, "rb") as f:  # PNG / JPEG size from the header, before Pillow sees the file
            check_pixels(compressed_image_size(f.read(HEADER_BYTES)), max_pixels, "the image")
        with Image.open(path) as im:
            check_pixels(im.size, max_pixels, "the image")  # other formats: Pillow's header; not decoded yet
            if im.mode in ("L", "I;16", "I;16B", "I;16L"):
                return np.asarray(im)
            if im.mode == "LA" or (im.mode == "P" and not _palette_has_colour(im)):
                return np.asarray(im.convert("L"))
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL fails on broken files in many ways (OSError, SyntaxError, struct...)
        raise SensorDataError(f"cannot read image {path}: {exc}") from None


def _palette_has_colour(im: Image.Image) -> bool:
    pal = np.asarray(im.convert("RGB"))
    return not (np.array_equal(pal[..., 0], pal[..., 1]) and np.array_equal(pal[..., 1], pal[..., 2]))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding."""
    try:
        check_regular_file(path, None, "image")
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - as in read_image
        raise SensorDataError(f"cannot read image {path}: {exc}") from None


def _attach(frame: Frame, name: str, image_path: Path, view_of) -> None:
    """Add camera ``name``'s view (``view_of()``), or leave the camera out of this frame with the reason (image
    file missing or unreadable) in ``frame.camera_problems``: one bad file costs that camera of that frame only,
    and every reader (convert, pseudo-labeling, evaluation) can name and count it."""
    try:
        if not image_path.is_file():
            raise SensorDataError(f"image {image_path} not found")
        frame.cameras[name] = view_of()
    except SensorDataError as exc:
        frame.camera_problems[name] = str(exc)
        frame.missing_cameras = tuple(dict.fromkeys((*frame.missing_cameras, name)))


def _view(calib: CameraCalibration, image_path: Path, stamp_ns: int) -> CameraView:
    return CameraView(name=calib.name, image=read_image(image_path), camera=calib.camera,
                      T_cam_lidar=calib.T_cam_lidar, stamp_ns=stamp_ns, frame_id=calib.frame_id)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SensorDataError(f"{what} not found: {path}")
    return path


# ------------------------------------------------------------------------------------------- SemanticKITTI


def iter_semantickitti(seq_dir: str | os.PathLike, scans: Iterable[int | str] | None = None,
                       images: bool = True, select: "Selection | str | None" = None) -> Iterator[Frame]:
    """Frames of one sequence folder (``.../sequences/00``), or of every sequence under a dataset root.

    Points, intensity, ground truth from ``labels/`` when present, stamps from ``times.txt``, and one
    CameraView per ``image_k`` folder (``images=False`` skips them, e.g. for lidar-only evaluation).
    ``select`` (a Selection or its text, e.g. ``00,05:0-4``) keeps only the sequences and scans it names.
    """
    seq_dir = Path(seq_dir)
    selection = Selection.parse(select) if isinstance(select, str) else select
    if not (seq_dir / "velodyne").is_dir() and (seq_dir / "sequences").is_dir():
        subs = selected_sequences(seq_dir, selection)
        for sub in subs:
            yield from iter_semantickitti(sub, scans, images, selection)
        return
    velodyne = _require(seq_dir / "velodyne", "SemanticKITTI velodyne folder")
    all_names = sorted(p.stem for p in velodyne.glob("*.bin"))
    names = all_names
    if scans is not None:
        wanted = {f"{int(s):06d}" for s in scans}
        missing = wanted - set(names)
        if missing:
            raise SensorDataError(f"{velodyne}: no scan(s) {sorted(missing)}")
        names = [n for n in names if n in wanted]
    if selection is not None:
        if not selection.names_sequence(seq_dir.name):
            raise SensorDataError(f"{seq_dir}: selection {selection.text!r} does not name sequence {seq_dir.name}")
        names = [n for n in names if selection.matches(seq_dir.name, int(n))]
    stamps = _semantickitti_times(seq_dir / "times.txt")
    rows = scan_rows(len(stamps), all_names, seq_dir / "times.txt") if stamps is not None else {}
    cam_dirs = sorted(p for p in seq_dir.glob("image_[0-3]") if p.is_dir()) if images else []
    calibs = _semantickitti_calibs(seq_dir, cam_dirs)
    for name in names:
        stamp = int(stamps[rows[name]]) if stamps is not None else int(name) * KITTI_PERIOD_NS
        xyz, intensity = read_points(velodyne / f"{name}.bin", 4)
        frame = Frame(stamp_ns=stamp, frame_id="velodyne", points=xyz, intensity=intensity,
                      key=f"{seq_dir.name}_{name}", gt_labels=_semantickitti_labels(seq_dir, name, len(xyz)))
        for cam_dir in cam_dirs:
            image_path = cam_dir / f"{name}.png"
            _attach(frame, cam_dir.name, image_path, lambda: _view(_sized(calibs, cam_dir, image_path), image_path, stamp))
        yield frame


def scan_rows(n_rows: int, names: list[str], path: Path) -> dict[str, int]:
    """Line of a per-scan file (times.txt, poses.txt) for each scan name: the scan number, as in the full
    dataset; or, for a trimmed list with exactly one line per scan present (scans 000100-000109 and ten lines),
    the scan's place in order. Anything else is ambiguous and an error naming the file."""
    numbers = [int(n) for n in names]
    if not numbers or max(numbers) < n_rows:
        return dict(zip(names, numbers))
    if n_rows == len(names):
        return {n: i for i, n in enumerate(names)}
    raise SensorDataError(f"{path}: {n_rows} lines, but scans run to {max(numbers):06d} and there are {len(names)}: "
                          "neither one line per scan number nor one per scan present")


def load_semantickitti(seq_dir: str | os.PathLike, scans: Iterable[int | str] | None = None,
                       images: bool = True, select: "Selection | str | None" = None) -> list[Frame]:
    return list(iter_semantickitti(seq_dir, scans, images, select))


def semantickitti_poses(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The lidar's pose per frame key of a SemanticKITTI sequence (or of each sequence under a root): poses.txt
    gives camera 0 in the first camera 0 frame, so the velodyne's is ``inv(Tr) @ pose @ Tr``. A sequence without
    poses.txt adds nothing."""
    out = {}
    for seq_dir in semantickitti_sequences(Path(path)):
        if not (seq_dir / "poses.txt").exists():
            continue
        calib = read_kitti_txt(seq_dir / "calib.txt")
        if "Tr" not in calib:
            raise SensorDataError(f"{seq_dir / 'calib.txt'}: no Tr line (lidar -> camera 0)")
        tr = np.eye(4)
        tr[:3] = calib["Tr"].reshape(3, 4)
        poses = np.loadtxt(seq_dir / "poses.txt", dtype=np.float64, ndmin=2).reshape(-1, 3, 4)
        names = sorted(p.stem for p in (seq_dir / "velodyne").glob("*.bin"))
        for name, row in scan_rows(len(poses), names, seq_dir / "poses.txt").items():
            pose = np.eye(4)
            pose[:3] = poses[row]
            out[f"{seq_dir.name}_{name}"] = np.linalg.inv(tr) @ pose @ tr
    return out


def _semantickitti_times(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        seconds = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise SensorDataError(f"{path}: not one time in seconds per line ({exc})") from exc
    return np.round(seconds * 1e9).astype(np.int64)


def _semantickitti_calibs(seq_dir: Path, cam_dirs: list[Path]) -> dict[str, CameraCalibration]:
    """Calibration of each camera folder; the image size is fixed per sequence, read from one file header."""
    calibs = {}
    for cam_dir in cam_dirs:
        size = _first_image_size(sorted(cam_dir.glob("*.png")))
        if size is not None:
            calibs.update(read_semantickitti_calib(seq_dir / "calib.txt", size, (cam_dir.name,)))
    return calibs


def _sized(calibs: dict[str, CameraCalibration], cam_dir: Path, image_path: Path) -> CameraCalibration:
    if cam_dir.name not in calibs:
        image_size(image_path)  # the frame's own file named when it is unreadable, as with a calibration
        raise SensorDataError(f"{cam_dir}: no readable image to take the camera's size from")
    return calibs[cam_dir.name]


def _first_image_size(paths: list[Path]) -> tuple[int, int] | None:
    """The size of the first readable image: an empty or corrupt first file costs its own frame, not the
    camera's calibration (and with it every frame); None when none is readable."""
    for path in paths:
        try:
            return image_size(path)
        except SensorDataError:
            continue
    return None


def _semantickitti_labels(seq_dir: Path, name: str, n: int) -> np.ndarray | None:
    path = seq_dir / "labels" / f"{name}.label"
    if not path.exists():
        return None
    labels = np.fromfile(path, dtype=np.uint32)
    if labels.size != n:
        raise SensorDataError(f"{path}: {labels.size} labels for {n} points")
    return labels


@dataclass(frozen=True)
class SemanticKittiConfig:
    """semantic-kitti.yaml: raw label names and colours, the 19-class learning map and its inverse."""

    labels: dict[int, str]  # raw id -> name
    learning_map: dict[int, int]  # raw id -> class 0..19 (0 = ignored)
    learning_map_inv: dict[int, int]  # class -> raw id
    colors: dict[int, tuple[int, int, int]]  # raw id -> RGB (the file stores BGR)
    learning_ignore: dict[int, bool]
    class_names: tuple[str, ...]  # class k (1..19) is class_names[k - 1]
    things: tuple[str, ...]  # class names that have instances

    def learning_lut(self) -> np.ndarray:
        """Lookup table raw semantic id -> class, for ``lut[labels & 0xFFFF]``."""
        lut = np.zeros(max(self.learning_map) + 1, dtype=np.uint16)
        for raw, cls in self.learning_map.items():
            lut[raw] = cls
        return lut


def read_semantickitti_config(yaml_path: str | os.PathLike) -> SemanticKittiConfig:
    try:
        data = load_yaml(yaml_path, "SemanticKITTI config")
        labels = {int(k): str(v) for k, v in data["labels"].items()}
        learning_map = {int(k): int(v) for k, v in data["learning_map"].items()}
        inv = {int(k): int(v) for k, v in data["learning_map_inv"].items()}
        colors = {int(k): (int(v[2]), int(v[1]), int(v[0])) for k, v in data["color_map"].items()}
        ignore = {int(k): bool(v) for k, v in data.get("learning_ignore", {}).items()}
    except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise SensorDataError(f"cannot read SemanticKITTI config {yaml_path}: {exc!r}") from exc
    class_names = tuple(labels[inv[k]] for k in sorted(inv) if k > 0)
    return SemanticKittiConfig(labels=labels, learning_map=learning_map, learning_map_inv=inv, colors=colors,
                               learning_ignore=ignore, class_names=class_names,
                               things=tuple(n for n in class_names if n in SEMANTICKITTI_THINGS))


# -------------------------------------------------------------------------------------------- KITTI object


def iter_kitti_object(root: str | os.PathLike, camera: str = "image_2") -> Iterator[Frame]:
    """KITTI object frames (``root`` or ``root/training``): full scans with the colour camera."""
    root = Path(root)
    if not (root / "velodyne").is_dir() and (root / "training" / "velodyne").is_dir():
        root = root / "training"
    velodyne = _require(root / "velodyne", "KITTI object velodyne folder")
    for i, path in enumerate(sorted(velodyne.glob("*.bin"))):
        name, stamp = path.stem, i * KITTI_PERIOD_NS
        xyz, intensity = read_points(path, 4)
        frame = Frame(stamp_ns=stamp, frame_id="velodyne", points=xyz, intensity=intensity, key=name)
        image_path = root / camera / f"{name}.png"

        def view_of():
            calib = read_kitti_object_calib(_require(root / "calib" / f"{name}.txt", "KITTI object calibration"),
                                            image_size(image_path), camera)
            return _view(calib, image_path, stamp)

        _attach(frame, camera, image_path, view_of)
        yield frame


def load_kitti_object(root: str | os.PathLike) -> list[Frame]:
    return list(iter_kitti_object(root))


# ----------------------------------------------------------------------------------------------- nuScenes


def iter_nuscenes(root: str | os.PathLike) -> Iterator[Frame]:
    """The nuScenes sample in ``root`` (``calib.json`` + files): LIDAR_TOP sweep and its six cameras, each
    CameraView stamped with its own capture time; the lidar stamp comes from the LIDAR_TOP file name."""
    root = Path(root)
    calib_path = _require(root / "calib.json", "nuScenes calib.json")
    data = load_calibration_json(calib_path)
    lidar_path = _require(root / Path(str(data.get("lidar_path", ""))).name, "nuScenes LIDAR_TOP file")
    stamp = nuscenes_stamp_from_name(lidar_path.name) or nuscenes_stamp_ns(data["timestamp"])
    xyz, intensity = read_points(lidar_path, 5)
    frame = Frame(stamp_ns=stamp, frame_id="LIDAR_TOP", points=xyz, intensity=intensity,
                  key=str(data.get("sample_token") or stamp))
    calibs = read_nuscenes_calib(calib_path)
    for name, calib in calibs.items():
        image_path = root / Path(str(data["cams"][name].get("img_path", ""))).name
        _attach(frame, name, image_path, lambda: _view(calib, image_path, int(calib.stamp_ns)))
    yield frame


def load_nuscenes(root: str | os.PathLike) -> list[Frame]:
    return list(iter_nuscenes(root))


# ------------------------------------------------------------------------------------------ KITTI frustum


def iter_kitti_frustum(root: str | os.PathLike) -> Iterator[Frame]:
    """The frustum-cropped KITTI sample(s) in ``root``: ``<id>.bin`` + ``<id>.png`` + ``calib.json``."""
    root = Path(root)
    calib_path = _require(root / "calib.json", "KITTI frustum calib.json")
    for i, path in enumerate(sorted(root.glob("*.bin"))):
        image_path = _require(path.with_suffix(".png"), "KITTI frustum image")
        calib = read_kitti_frustum_calib(calib_path, image_size(image_path))
        xyz, intensity = read_points(path, 4)
        frame = Frame(stamp_ns=i * KITTI_PERIOD_NS, frame_id="velodyne", points=xyz, intensity=intensity,
                      key=path.stem)
        frame.cameras[calib.name] = _view(calib, image_path, frame.stamp_ns)
        yield frame


def load_kitti_frustum(root: str | os.PathLike) -> list[Frame]:
    return list(iter_kitti_frustum(root))


class SemanticKittiScans:
    """Scans of a SemanticKITTI folder by key ``<seq>_<scan>``, read one at a time (a sequence does not fit in
    memory with images); ``select`` (a Selection or its text) limits the keys to the scans it names."""

    def __init__(self, path: str | os.PathLike, select: "Selection | str | None" = None) -> None:
        self.path = Path(path)
        self.selection = Selection.parse(select) if isinstance(select, str) else select
        if (self.path / "velodyne").is_dir():
            seqs = semantickitti_sequences(self.path)
        else:
            seqs = selected_sequences(self.path, self.selection)
        self._sequences = {seq.name: seq for seq in seqs}

    def keys(self) -> list[str]:
        return [f"{name}_{p.stem}" for name, seq in self._sequences.items() for p in sorted(seq.glob("velodyne/*.bin"))
                if self.selection is None or self.selection.matches(name, int(p.stem))]

    def load(self, key: str) -> Frame:
        seq, _, scan = key.rpartition("_")
        if seq not in self._sequences:
            raise KeyError(f"{self.path}: no sequence for frame key {key!r}")
        return next(iter(iter_semantickitti(self._sequences[seq], scans=[scan])))
