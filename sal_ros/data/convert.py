"""``sal-ros convert DATASET OUT``: a dataset folder (SemanticKITTI, KITTI object, nuScenes, KITTI frustum) into a
rosbag2 (mcap by default) that looks like a robot recording, so every tool downstream (replay, the nodes, the bag
reader of evaluation) runs on it unchanged.

Topics (log time = header stamp):

- ``/lidar/points``: sensor_msgs/PointCloud2, x y z intensity float32, frame ``lidar`` (``--lidar-frame``);
- ``/<camera>/image_raw`` + ``/<camera>/camera_info``: sensor_msgs/Image (mono8/mono16/rgb8, as the files) and
  CameraInfo, stamped with each camera's own capture time (nuScenes cameras fire up to ~45 ms before the sweep);
- ``/tf_static``: tf2_msgs/TFMessage, lidar frame -> each camera optical frame (recorded transient-local);
- ``/tf``: tf2_msgs/TFMessage, ``odom`` (``--pose-frame``; empty: none) -> lidar frame at each cloud stamp, when
  the dataset has the sequence's motion (SemanticKITTI poses.txt, as the velodyne's pose ``inv(Tr) @ pose @ Tr``),
  so the bag carries it to whatever reads /tf (Seal's temporal term through sal_ros.data.bag.bag_poses, rviz, a
  replay).

In the bag folder, beside its data files:

- ``extrinsics.yaml``: the static-extrinsics YAML of sal_ros.core.calibration (exact T, intrinsics, time offsets);
- ``labels.npz``: ground-truth per-point labels (uint32, SemanticKITTI panoptic form) keyed by the cloud stamp in
  ns as a string, when the dataset has them.

KITTI times start at zero, and a zero stamp means "unset" in ROS: those datasets are shifted by ``--time-base``
(default 1 s). The bag is written to a temporary folder and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from sal_ros.core.calibration import CameraCalibration, write_static_extrinsics
from sal_ros.core.errors import SensorDataError
from sal_ros.core.msgtypes import NS_PER_S, image_topic, info_topic
from sal_ros.core.types import CameraView, Frame
from sal_ros.data.datasets import semantickitti_poses
from sal_ros.data.sources import detect_source

CLOUD_TOPIC = "/lidar/points"
TF_STATIC_TOPIC = "/tf_static"
TF_TOPIC = "/tf"
LIDAR_FRAME = "lidar"
POSE_FRAME = "odom"  # REP 105's world-fixed frame of continuous motion; bag_poses' and seal.pose_frame's default
EXTRINSICS_FILE = "extrinsics.yaml"
LABELS_FILE = "labels.npz"
RELATIVE_TIME_KINDS = ("semantickitti", "kitti_object", "kitti_frustum")  # times.txt / frame index from zero
T_TOLERANCE = 1e-9  # a bag holds one static calibration per camera; frames must agree to this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (SemanticKITTI sequence or root, KITTI object, "
                                                   "nuScenes sample, KITTI frustum), as in ../shared/data")
    parser.add_argument("out", type=Path, help="rosbag2 folder to create")
    parser.add_argument("--frames", nargs="+", default=None,
                        help="only these frames, by key or scan name (e.g. 000001 or 00_000001)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--lidar-frame", default=LIDAR_FRAME, help=f"frame_id of the clouds (default {LIDAR_FRAME})")
    parser.add_argument("--pose-frame", default=POSE_FRAME,
                        help=f"parent frame of the lidar's motion on /tf, when the dataset has poses (default "
                             f"{POSE_FRAME}; '' writes no /tf)")
    parser.add_argument("--time-base", type=float, default=1.0,
                        help="seconds added to datasets whose times start at zero (KITTI; default 1.0)")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage (mcap)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.epilog = ("Exit status: 0 written; 1 nothing written (error named); 3 written, but frames whose image "
                     "was missing or unreadable lack that camera (each named on stderr).")


def main(args: argparse.Namespace) -> int:
    try:
        summary = convert(args.dataset, args.out, frames=args.frames, max_frames=args.max_frames,
                          lidar_frame=args.lidar_frame, pose_frame=args.pose_frame,
                          time_base_ns=int(round(args.time_base * NS_PER_S)),
                          storage=args.storage, overwrite=args.overwrite)
    except (SensorDataError, FileExistsError, FileNotFoundError, OutputOverlapsInput) as exc:
        print(f"sal-ros convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {summary.path}: {summary.frames} frames, cameras {list(summary.cameras)}, "
          f"{summary.labelled} with ground truth, {summary.posed} with a pose on {TF_TOPIC}, "
          f"{len(summary.problems)} with a camera left out")
    for key, cameras in summary.problems.items():
        for camera, why in cameras.items():
            print(f"sal-ros convert: frame {key}: camera {camera} left out: {why}", file=sys.stderr)
    if summary.problems:
        print(f"sal-ros convert: {len(summary.problems)} of {summary.frames} frames lack a camera image "
              "(the bag holds them without it); exit status 3", file=sys.stderr)
        return 3
    return 0


@dataclass
class ConvertSummary:
    path: Path
    kind: str
    frames: int = 0
    labelled: int = 0
    posed: int = 0  # frames whose pose went to /tf
    time_shift_ns: int = 0
    cameras: dict[str, CameraCalibration] = field(default_factory=dict)
    problems: dict[str, dict[str, str]] = field(default_factory=dict)  # frame key -> {camera left out: why}


def convert(
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    *,
    frames: Iterable[str] | None = None,
    max_frames: int | None = None,
    lidar_frame: str = LIDAR_FRAME,
    pose_frame: str = POSE_FRAME,
    time_base_ns: int = NS_PER_S,
    storage: str = "mcap",
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Write the bag (see the module docstring); returns what was written."""
    dataset, out = Path(dataset), Path(out)
    if not dataset.exists():
        raise FileNotFoundError(f"dataset {dataset} does not exist")
    _refuse_overlap(dataset, out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    if out.exists() or out.is_symlink():
        _refuse_replacing_other_things(out)
    source_kind = detect_source(dataset)
    if source_kind.recording:
        raise SensorDataError(f"{dataset}: a {source_kind.name}, not a dataset folder")
    kind = source_kind.name
    summary = ConvertSummary(path=out, kind=kind, time_shift_ns=time_base_ns if kind in RELATIVE_TIME_KINDS else 0)
    source = _select(source_kind.frames(dataset), frames, max_frames)
    # the bag is built in a hidden sibling folder under its final name (rosbag2 names its data files after it)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        poses = semantickitti_poses(dataset) if kind == "semantickitti" and pose_frame else {}
        _write_bag(tmp / out.name, source, summary, lidar_frame, storage, progress, (pose_frame, poses))
        if summary.frames == 0:
            chosen = f" (--frames {list(frames)})" if frames else ""
            raise SensorDataError(f"{dataset}: no frames to convert{chosen}")
        _replace_dir(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


class OutputOverlapsInput(ValueError):
    """The bag would be written over, inside or around the dataset it is made from, or --overwrite would delete
    something that is not a bag this command wrote."""


def _refuse_overlap(dataset: Path, out: Path) -> None:
    # --overwrite replaces OUT as a whole: OUT == DATASET (or a folder around it) would delete the input, and a
    # bag inside it would become part of the dataset. Links are followed, so an alias is caught too, and so is a
    # link inside the dataset (velodyne/ -> OUT) whose files --overwrite would delete.
    dst = out.resolve()
    for where, src in _dataset_places(dataset):
        if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
            via = "" if where == dataset else f" (through the link {where})"
            raise OutputOverlapsInput(f"output {out} overlaps the input dataset {dataset}{via} (it is, contains or "
                                      f"lies inside it); write the bag somewhere else")


def _dataset_places(dataset: Path) -> Iterator[tuple[Path, Path]]:
    """(path, resolved path) of the dataset folder and of every link inside it: the places its files live."""
    yield dataset, dataset.resolve()
    for folder, dirs, files in os.walk(dataset.resolve()):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                yield path, path.resolve()


# What a bag `sal-ros convert` wrote holds; --overwrite deletes nothing else.
BAG_FILES = ("metadata.yaml", EXTRINSICS_FILE, LABELS_FILE)
BAG_SUFFIXES = (".mcap", ".db3", ".db3-shm", ".db3-wal")


def _refuse_replacing_other_things(out: Path) -> None:
    """--overwrite replaces a bag this command wrote, never a file, a link or another folder."""
    if out.is_symlink() or not out.is_dir():
        raise OutputOverlapsInput(f"--overwrite: {out} is {'a link' if out.is_symlink() else 'a file'}, not a bag "
                                  "folder sal-ros convert wrote; remove it yourself or choose another output")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.is_file() and not p.is_symlink() and (p.name in BAG_FILES or p.suffix in BAG_SUFFIXES)))
    if foreign or not (out / "metadata.yaml").is_file():
        what = f"it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}" if foreign else \
            "it has no metadata.yaml"
        raise OutputOverlapsInput(f"--overwrite: {out} is not a bag sal-ros convert wrote ({what}); nothing "
                                  "deleted: remove it yourself or choose another output")


def _select(source: Iterator[Frame], keys: Iterable[str] | None, max_frames: int | None) -> Iterator[Frame]:
    wanted = None if keys is None else {str(k) for k in keys}
    n = 0
    for frame in source:
        if max_frames is not None and n >= max_frames:
            return
        if wanted is None or frame.key in wanted or frame.key.rpartition("_")[2] in wanted:
            n += 1
            yield frame


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished bag into place; an existing one (--overwrite) is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ----------------------------------------------------------------------------------------------------- writing


class _BagWriter:
    """A rosbags Writer with one connection per topic, messages serialized with the Kilted typestore."""

    def __init__(self, path: Path, storage: str) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        from sal_ros.core.msgtypes import rosbags_types

        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.types = rosbags_types(self.typestore)
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(path, version=9, storage_plugin=plugin)
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> "_BagWriter":
        self._writer.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.close()

    def write(self, topic: str, msg: Any, log_time_ns: int, latched: bool = False) -> None:
        msgtype = type(msg).__msgtype__
        conn = self._connections.get(topic)
        if conn is None:
            qos = (_latched_qos(),) if latched else ()
            conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore, offered_qos_profiles=qos)
            self._connections[topic] = conn
        self._writer.write(conn, log_time_ns, self.typestore.serialize_cdr(msg, msgtype))


def _latched_qos() -> Any:
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    never = QosTime(0x7FFFFFFF, 0xFFFFFFFF)  # rmw's "infinite" duration
    return Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, never, never,
               QosLiveliness.AUTOMATIC, never, False)


def _write_bag(path: Path, source: Iterator[Frame], summary: ConvertSummary, lidar_frame: str, storage: str,
               progress: bool, motion: tuple[str, dict[str, np.ndarray]] = (POSE_FRAME, {})) -> None:
    """``motion``: the pose frame and the lidar's pose in it per frame key (a frame without one has no /tf)."""
    from tqdm import tqdm

    pose_frame, poses = motion
    shift = summary.time_shift_ns
    labels: dict[str, np.ndarray] = {}
    with _BagWriter(path, storage) as bag:
        for frame in tqdm(source, desc=f"convert {summary.kind}", unit="frame", disable=not progress):
            stamp = frame.stamp_ns + shift
            if stamp <= 0:
                raise SensorDataError(f"frame {frame.key}: stamp {stamp} ns is not a valid ROS time "
                                      "(raise --time-base)")
            first = not summary.cameras
            _check_calibrations(frame, summary.cameras, lidar_frame, stamp, shift)
            if first and summary.cameras:
                bag.write(TF_STATIC_TOPIC, _tf_static(summary.cameras.values(), stamp, bag.types),
                          _first_stamp(frame, shift), latched=True)
            if frame.key in poses:
                tf = _transform(pose_frame, lidar_frame, poses[frame.key], stamp, bag.types)
                bag.write(TF_TOPIC, bag.types.TFMessage(transforms=[tf]), stamp)
                summary.posed += 1
            for topic, msg, t in sorted(_frame_messages(frame, lidar_frame, shift, bag.types), key=lambda m: m[2]):
                bag.write(topic, msg, t)
            if frame.gt_labels is not None:
                labels[str(stamp)] = np.asarray(frame.gt_labels, np.uint32)
                summary.labelled += 1
            summary.frames += 1
            if frame.missing_cameras:
                summary.problems[frame.key] = {c: frame.camera_problems.get(c, "no image")
                                               for c in frame.missing_cameras}
    if summary.cameras:
        write_static_extrinsics(path / EXTRINSICS_FILE, summary.cameras, lidar_frame)
    if labels:
        np.savez(path / LABELS_FILE, **labels)


def _first_stamp(frame: Frame, shift: int) -> int:
    return min([frame.stamp_ns] + [v.stamp_ns for v in frame.cameras.values()]) + shift


def _check_calibrations(frame: Frame, calibs: dict[str, CameraCalibration], lidar_frame: str, stamp: int,
                        shift: int) -> None:
    """Record each camera's calibration from its first frame; later frames must agree (one /tf_static)."""
    for name, view in frame.cameras.items():
        known = calibs.get(name)
        if known is None:
            calibs[name] = CameraCalibration(name=name, camera=view.camera, T_cam_lidar=view.T_cam_lidar,
                                             frame_id=view.frame_id or name, lidar_frame_id=lidar_frame,
                                             time_offset_ns=view.stamp_ns + shift - stamp)
        elif not np.allclose(known.T_cam_lidar, view.T_cam_lidar, rtol=0, atol=T_TOLERANCE):
            raise SensorDataError(
                f"camera {name}: the lidar->camera calibration of frame {frame.key} differs from the first frame's "
                "(KITTI object frames come from different drives); a bag holds one static calibration: convert "
                "such frames one at a time (--frames)")


def _frame_messages(frame: Frame, lidar_frame: str, shift: int, types: Any) -> list[tuple[str, Any, int]]:
    from sal_ros.core.pointcloud2 import encode_cloud

    stamp = frame.stamp_ns + shift
    fields = {"xyz": frame.points}
    intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
    fields["intensity"] = np.asarray(intensity, np.float32)
    out = [(CLOUD_TOPIC, encode_cloud(fields, lidar_frame, stamp, types), stamp)]
    for name, view in frame.cameras.items():
        t = view.stamp_ns + shift
        out.append((info_topic(name), _camera_info(view, t, types), t))  # first: the image completes the set
        out.append((image_topic(name), _image_msg(view, t, types), t))
    return out


def _image_msg(view: CameraView, stamp: int, types: Any) -> Any:
    from sal_ros.core.image import encode_image

    image = np.asarray(view.image)
    encodings = {(2, "uint8"): "mono8", (2, "uint16"): "mono16", (2, "float32"): "32FC1", (3, "uint8"): "rgb8"}
    encoding = encodings.get((image.ndim, image.dtype.name))
    if encoding is None:
        raise SensorDataError(f"camera {view.name}: cannot store a {image.dtype} image of shape {image.shape}")
    return encode_image(image, encoding, view.frame_id or view.name, stamp, types)


def _camera_info(view: CameraView, stamp: int, types: Any) -> Any:
    from sal_ros.core.msgtypes import make_header

    fields = view.camera.to_camera_info_fields()
    for key in ("k", "d", "r", "p"):
        fields[key] = np.asarray(fields[key], np.float64)  # rosbags keeps numeric arrays as numpy
    return types.CameraInfo(header=make_header(view.frame_id or view.name, stamp, types), **fields)


def _tf_static(calibs: Iterable[CameraCalibration], stamp: int, types: Any) -> Any:
    """Lidar (parent) -> camera optical frame (child): the transform maps camera coordinates into the lidar frame."""
    from sal_ros.core.transforms import invert_transform

    return types.TFMessage(transforms=[_transform(c.lidar_frame_id, c.frame_id, invert_transform(c.T_cam_lidar),
                                                  stamp, types) for c in calibs])


def _transform(parent: str, child: str, T_parent_child: np.ndarray, stamp: int, types: Any) -> Any:
    """A TransformStamped parent -> child: ``T_parent_child`` maps child coordinates into the parent frame."""
    from sal_ros.core.msgtypes import make_header
    from sal_ros.core.transforms import matrix_to_transform_fields

    (x, y, z), (qx, qy, qz, qw) = matrix_to_transform_fields(T_parent_child)
    return types.TransformStamped(header=make_header(parent, stamp, types), child_frame_id=child,
                                  transform=types.Transform(translation=types.Vector3(x=x, y=y, z=z),
                                                            rotation=types.Quaternion(x=qx, y=qy, z=qz, w=qw)))
