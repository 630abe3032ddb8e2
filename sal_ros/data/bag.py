"""Frames out of a rosbag2 (mcap or sqlite3), through the node's own LidarAnchoredSynchronizer.

This is the offline replay path of evaluation and training: messages go through the same synchronizer, in log
order, as they would reach the nodes, so offline results match what the robot computes. The bag is read with
rosbags (pure Python, no ROS install).

What is read, unless given:

- the cloud topic: the bag's only PointCloud2 topic (or ``/lidar/points`` among several);
- cameras: those named in the extrinsics YAML, else every ``/<name>/image_raw`` (Image or CompressedImage) topic,
  with ``/<name>/camera_info`` for intrinsics and the YAML's ``time_offset`` as the sync offset;
- extrinsics: ``extrinsics.yaml`` in the bag folder (``sal-ros convert`` writes it), else the bag's ``/tf_static``
  (chains of static transforms are followed);
- ground truth: ``labels.npz`` in the bag folder, keyed by the cloud stamp in ns.

``config`` takes a node parameters YAML (``cloud_topic``, ``cameras``, ``camera.<name>.*``, ``sync.*``,
``calibration.source`` / ``calibration.file``), so evaluation uses exactly the robot's settings and calibration
comes from where the nodes (segmenter, recorder) take it: ``tf`` reads the bag's /tf_static, ``static`` the file.

Every reader of bags (this module, replay, eval online) opens them with ``open_bag``: an mcap file with a truncated
tail (a recorder killed, a copy cut short: no summary, no end magic) is read up to its last complete record, and a
warning names the file, the bytes lost and the messages kept.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from sal_ros.core.calibration import CameraCalibration, read_static_extrinsics
from sal_ros.core.errors import CalibrationError, SensorDataError
from sal_ros.core.msgtypes import image_topic, info_topic
from sal_ros.core.params_file import RECORDER_NODE, SEGMENTER_NODE, load_params_file
from sal_ros.core.sync import MATCH_THRESHOLD_NS, SYNC_TIMEOUT_NS
from sal_ros.core.frame_builder import FrameBuilder
from sal_ros.core.tf import ExtrinsicsSource, StaticExtrinsics, StaticTfTree, TfHistory
from sal_ros.core.types import Frame

log = logging.getLogger(__name__)

CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_STATIC_TOPIC = "/tf_static"
TF_TOPIC = "/tf"
DEFAULT_CLOUD_TOPIC = "/lidar/points"
EXTRINSICS_FILE = "extrinsics.yaml"
LABELS_FILE = "labels.npz"


@dataclass(frozen=True)
class BagCamera:
    name: str
    image_topic: str
    info_topic: str | None = None  # None: intrinsics from the extrinsics YAML
    time_offset_ns: int = 0  # expected image stamp - cloud stamp
    rectified: bool = False  # image_rect: project with CameraInfo's P and R (as the node's camera.<name>.rectified)


CameraSpec = BagCamera | tuple  # (name, image_topic, info_topic, time_offset_ns[, rectified])


def open_bag(bag_path: str | os.PathLike) -> Any:
    """A rosbags ``AnyReader`` for ``bag_path`` (use it as a context manager) that salvages truncated mcap files."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2.storage_mcap import McapReader

    reader = AnyReader([Path(bag_path)])
    salvaging = _salvaging_mcap_reader()
    for bag in getattr(reader, "readers", []):
        storage = getattr(bag, "storage", None)
        if isinstance(storage, McapReader):  # a bare .mcap file
            bag.storage = salvaging(storage.path)
        elif hasattr(storage, "STORAGE_PLUGINS"):  # a bag folder: the class is looked up when it opens
            storage.STORAGE_PLUGINS = {**storage.STORAGE_PLUGINS, "mcap": salvaging}
    return reader


def _salvaging_mcap_reader() -> type:
    from rosbags.rosbag2.errors import ReaderError
    from rosbags.rosbag2.storage_mcap import McapReader

    class SalvagingMcapReader(McapReader):
        """rosbags' mcap reader; a file whose end (footer, summary) is missing or broken is read by scanning its
        complete records instead of failing with "File end magic is invalid"."""

        def _open(self) -> None:
            try:
                super()._open()
            except ReaderError as exc:
                if not self.data_start:  # the start is bad too: not an mcap this can read
                    raise
                self._salvage(exc)

        def _salvage(self, why: Exception) -> None:
            size = self.bio.seek(0, os.SEEK_END)
            self.data_end = _complete_records_end(self.bio, self.data_start, size)
            self.schemas, self.channels, self.chunks, self.connections = {}, {}, [], []
            self.meta_scan()  # schemas, channels and message counts of the complete records
            stats = self.statistics
            self.connections = [c._replace(msgcount=stats.channel_message_counts.get(c.id, 0))
                                for c in self.connections]
            n = stats.message_count
            self.metadata = self.metadata._replace(
                duration=stats.end_time - stats.start_time + 1 if n else 0,
                start_time=stats.start_time if n else 2**63 - 1, end_time=stats.end_time + 1 if n else 0,
                message_count=n)
            log.warning("%s is truncated (%s): read the %d complete messages before byte %d; %d bytes after it "
                        "are lost", self.path, why, n, self.data_end, size - self.data_end)

    return SalvagingMcapReader


def _complete_records_end(bio: Any, start: int, size: int) -> int:
    """Where the complete records of an mcap data section end: at its DataEnd record, or before the first record
    that runs past the end of the file (each record: opcode byte, uint64 length, body)."""
    pos = start
    while pos + 9 <= size:
        bio.seek(pos)
        opcode, length = struct.unpack("<BQ", bio.read(9))
        if opcode == 0x0F or pos + 9 + length > size:  # DataEnd: the summary follows
            break
        pos += 9 + length
    return pos


def iter_bag_frames(
    bag_path: str | os.PathLike,
    cloud_topic: str | None = None,
    cameras: Iterable[CameraSpec] | None = None,
    extrinsics: str | os.PathLike | Mapping[str, CameraCalibration] | None = None,
    *,
    match_threshold_ns: int = MATCH_THRESHOLD_NS,
    timeout_ns: int = SYNC_TIMEOUT_NS,
    allow_partial: bool = True,
    config: str | os.PathLike | None = None,
    labels: bool = True,
) -> Iterator[Frame]:
    """Synced Frames of the bag, in cloud stamp order (see the module docstring for the defaults).

    ``extrinsics``: a static-extrinsics YAML path, calibrations by camera name, or None (the bag's own).
    Frames whose cameras did not all match, or lack a transform to the lidar, list them in ``missing_cameras``
    (the node's rule); ``allow_partial=False`` skips them.
    """
    from sal_ros.core.sync import LidarAnchoredSynchronizer

    bag_path = Path(bag_path)
    if not bag_path.exists():
        raise FileNotFoundError(f"bag {bag_path} does not exist")
    if config is not None:
        settings = _read_node_config(config)
        cloud_topic = cloud_topic or settings.get("cloud_topic")
        cameras = cameras if cameras is not None else _config_cameras(settings)
        extrinsics, bag_tf = _config_extrinsics(settings, extrinsics)
        match_threshold_ns = int(round(settings.get("sync.match_threshold", match_threshold_ns / 1e9) * 1e9))
        timeout_ns = int(round(settings.get("sync.timeout", timeout_ns / 1e9) * 1e9))
        allow_partial = bool(settings.get("sync.allow_partial", allow_partial))
    else:
        bag_tf = False
    with open_bag(bag_path) as reader:
        calibs = None if bag_tf else _static_calibrations(bag_path, extrinsics)
        cloud_conn = _cloud_connection(reader, cloud_topic, bag_path)
        cams = _cameras(reader, cameras, calibs, bag_path)
        source = _tf_static(reader) if calibs is None else StaticExtrinsics(calibs)
        sync = LidarAnchoredSynchronizer([c.name for c in cams], {c.name: c.time_offset_ns for c in cams},
                                         match_threshold_ns=match_threshold_ns, timeout_ns=timeout_ns)
        assembler = _Assembler(reader, cams, source, _open_labels(bag_path) if labels else None)
        by_topic = {c.image_topic: c.name for c in cams}
        infos = {c.info_topic: c.name for c in cams if c.info_topic}
        wanted = [cloud_conn] + [c for c in reader.connections if c.topic in by_topic or c.topic in infos]
        for conn, _, raw in reader.messages(connections=wanted):
            if conn.topic in infos:
                assembler.builder.infos[infos[conn.topic]] = assembler.decode(conn, raw)  # the latest, as a node
                continue
            stamp = _header_stamp(raw)
            if conn is cloud_conn:
                ready = sync.add_cloud(stamp, (conn, raw))
            else:
                ready = sync.add_camera(by_topic[conn.topic], stamp, (conn, raw))
            yield from assembler.frames(ready, allow_partial)
        yield from assembler.frames(sync.flush(), allow_partial)


def bag_poses(bag_path: str | os.PathLike, fixed_frame: str, cloud_topic: str | None = None
              ) -> tuple[dict[str, np.ndarray], str | None]:
    """The lidar's pose in ``fixed_frame`` (T_fixed_lidar, 4x4) at each cloud's stamp, from the bag's /tf and
    /tf_static (sal_ros.core.tf.TfHistory: interpolated, never extrapolated), keyed as iter_bag_frames keys its
    frames (the cloud stamp in ns). Returns (poses, None) or (the poses found, why the other clouds have none)."""
    bag_path = Path(bag_path)
    history, clouds = TfHistory(), {}
    with open_bag(bag_path) as reader:
        cloud_conn = _cloud_connection(reader, cloud_topic, bag_path)
        tf_conns = [c for c in reader.connections if c.topic in (TF_TOPIC, TF_STATIC_TOPIC)]
        for conn, _, raw in reader.messages(connections=[cloud_conn, *tf_conns]):
            if conn is cloud_conn:
                clouds[_header_stamp(raw)] = _header_frame_id(raw)
            else:
                history.add(reader.deserialize(raw, conn.msgtype).transforms, static=conn.topic == TF_STATIC_TOPIC)
    poses = {}
    for stamp, lidar_frame in clouds.items():
        T = history.lookup(fixed_frame, lidar_frame, stamp)
        if T is not None:
            poses[str(stamp)] = T
    if len(poses) == len(clouds):
        return poses, None
    lidar_frames = sorted(set(clouds.values()))
    why = (f"the bag has no {TF_TOPIC}" if not history.moving else
           f"{TF_TOPIC} links no {fixed_frame!r} to {', '.join(map(repr, lidar_frames))} at their stamps "
           f"(moving frames: {', '.join(sorted({f for pair in history.moving for f in pair}))})")
    return poses, f"{len(clouds) - len(poses)} of {len(clouds)} clouds have no pose in {fixed_frame!r}: {why}"


# ------------------------------------------------------------------------------------------------ decoding


class _Assembler:
    """Synced sets -> Frames: decodes the cloud, adds labels and the cameras core.frame_builder admits."""

    def __init__(self, reader: Any, cams: list[BagCamera], extrinsics: ExtrinsicsSource, labels: Any) -> None:
        self.reader, self.cams, self.labels = reader, cams, labels
        self.builder = FrameBuilder({c.name: c for c in cams}, extrinsics)
        self._warned: set[tuple[str, str]] = set()

    def frames(self, ready: list, allow_partial: bool) -> Iterator[Frame]:
        for synced in ready:
            frame = self.frame(synced)
            if allow_partial or not frame.missing_cameras:
                yield frame

    def frame(self, synced: Any) -> Frame:
        from sal_ros.core.pointcloud2 import read_xyz_intensity

        cloud = self.decode(*synced.cloud)
        xyz, intensity = read_xyz_intensity(cloud)
        frame = Frame(stamp_ns=synced.stamp_ns, frame_id=str(cloud.header.frame_id), points=xyz,
                      intensity=intensity, key=str(synced.stamp_ns))
        if self.labels is not None and frame.key in self.labels:
            frame.gt_labels = self._labels(frame)
        missing = list(synced.missing)
        for name, (_, (conn, raw)) in synced.images.items():
            view, reason, text = self.builder.camera_view(name, self.decode(conn, raw), frame)
            if view is None:  # left out and listed, as the node does; the bag reads on
                self._left_out(name, reason, text)
                missing.append(name)
                continue
            frame.cameras[name] = view
        frame.missing_cameras = tuple(c.name for c in self.cams if c.name in missing)
        return frame

    def decode(self, conn: Any, raw: bytes) -> Any:
        return self.reader.deserialize(raw, conn.msgtype)

    def _labels(self, frame: Frame) -> np.ndarray:
        labels = np.asarray(self.labels[frame.key], np.uint32)
        if labels.shape != (frame.num_points,):
            raise SensorDataError(f"{LABELS_FILE}: {labels.size} labels for the {frame.num_points} points of the "
                                  f"cloud at {frame.key}")
        return labels

    def _left_out(self, name: str, reason: str, text: str) -> None:
        if (name, reason) not in self._warned:  # once per camera and reason: every frame would repeat it
            self._warned.add((name, reason))
            log.warning("%s; left out of the frames (listed in missing_cameras)", text)


def _header_stamp(raw: bytes) -> int:
    """The header stamp without decoding the payload: CDR puts the header first (4-byte encapsulation, then
    int32 sec, uint32 nanosec), little- or big-endian per the encapsulation id."""
    sec, nanosec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def _header_frame_id(raw: bytes) -> str:
    """The header's frame id without decoding the payload: the CDR string after the stamp (uint32 length with
    the terminating NUL, then the bytes)."""
    (size,) = struct.unpack_from("<I" if raw[1] & 1 else ">I", raw, 12)
    return raw[16:16 + max(size - 1, 0)].decode()


# -------------------------------------------------------------------------------------- topics and cameras


def _cloud_connection(reader: Any, topic: str | None, bag: Path) -> Any:
    clouds = [c for c in reader.connections if c.msgtype == CLOUD_TYPE]
    if topic is not None:
        match = [c for c in clouds if c.topic == topic]
        if not match:
            raise SensorDataError(f"{bag}: no PointCloud2 topic {topic} (clouds: {sorted(c.topic for c in clouds)})")
        return match[0]
    if len(clouds) == 1:
        return clouds[0]
    match = [c for c in clouds if c.topic == DEFAULT_CLOUD_TOPIC]
    if match:
        return match[0]
    raise SensorDataError(f"{bag}: {'no' if not clouds else 'several'} PointCloud2 topics "
                          f"({sorted(c.topic for c in clouds)}); name the cloud topic")


def _cameras(reader: Any, cameras: Iterable[CameraSpec] | None, calibs: dict[str, CameraCalibration] | None,
             bag: Path) -> list[BagCamera]:
    topics = {c.topic: c.msgtype for c in reader.connections}
    if cameras is not None:
        cams = [c if isinstance(c, BagCamera) else BagCamera(*c) for c in cameras]
    else:
        names = list(calibs) if calibs is not None else _image_namespaces(topics)
        cams = [_default_camera(name, topics, calibs) for name in names]
        cams = [c for c in cams if c is not None]
    for c in cams:
        if topics.get(c.image_topic) not in IMAGE_TYPES:
            raise SensorDataError(f"{bag}: camera {c.name}: no Image/CompressedImage topic {c.image_topic}")
        if c.info_topic is not None and topics.get(c.info_topic) != INFO_TYPE:
            raise SensorDataError(f"{bag}: camera {c.name}: no CameraInfo topic {c.info_topic}")
    return cams


def _image_namespaces(topics: dict[str, str]) -> list[str]:
    names = []
    for topic, msgtype in topics.items():
        parts = topic.strip("/").split("/")
        if msgtype in IMAGE_TYPES and len(parts) >= 2 and "image_raw" in parts:
            names.append("/".join(parts[:parts.index("image_raw")]))
    return sorted(set(names))


def _default_camera(name: str, topics: dict[str, str], calibs: dict[str, CameraCalibration] | None) -> BagCamera | None:
    raw = image_topic(name)
    image = raw if topics.get(raw) in IMAGE_TYPES else f"{raw}/compressed"
    if topics.get(image) not in IMAGE_TYPES:
        return None  # a calibrated camera that was not recorded
    info = info_topic(name)
    offset = calibs[name].time_offset_ns if calibs and name in calibs else 0
    return BagCamera(name, image, info if topics.get(info) == INFO_TYPE else None, offset)


# --------------------------------------------------------------------------------------------- calibration


def _config_extrinsics(settings: dict[str, Any], extrinsics: Any) -> tuple[Any, bool]:
    """Where a node with these parameters takes its calibration from, so the bag reader takes it from the same
    place: ``calibration.source: static`` -> ``calibration.file``; ``tf`` -> the bag's own /tf_static (any
    extrinsics.yaml beside the bag is ignored, as the node would ignore it). Returns (extrinsics, use bag TF)."""
    source = settings.get("calibration.source")
    if extrinsics is not None or source is None:  # given explicitly, or a params file without calibration
        return extrinsics or settings.get("calibration.file") or None, False
    if source == "static":
        if not settings.get("calibration.file"):
            raise CalibrationError("node config: calibration.source is 'static' but calibration.file is empty")
        return settings["calibration.file"], False
    if source == "tf":
        return None, True
    raise CalibrationError(f"node config: unknown calibration.source {source!r} (expected 'tf' or 'static')")


def _static_calibrations(bag: Path, extrinsics: Any) -> dict[str, CameraCalibration] | None:
    """Calibrations from the given YAML / mapping, else the bag's extrinsics.yaml; None: use /tf_static."""
    if isinstance(extrinsics, Mapping):
        return dict(extrinsics)
    if extrinsics is not None:
        return read_static_extrinsics(extrinsics)
    beside = (bag if bag.is_dir() else bag.parent) / EXTRINSICS_FILE
    return read_static_extrinsics(beside) if beside.is_file() else None


def _tf_static(reader: Any) -> StaticTfTree:
    conns = [c for c in reader.connections if c.topic == TF_STATIC_TOPIC]
    return StaticTfTree.from_transforms(tf for conn, _, raw in reader.messages(connections=conns)
                                        for tf in reader.deserialize(raw, conn.msgtype).transforms)


# ------------------------------------------------------------------------------------------ labels, config


def _open_labels(bag: Path) -> Any:
    path = (bag if bag.is_dir() else bag.parent) / LABELS_FILE
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _read_node_config(path: str | os.PathLike) -> dict[str, Any]:
    """Flat parameters of a node params YAML: the ``/**`` section, then the segmenter's and recorder's on top."""
    try:
        return load_params_file(path, SEGMENTER_NODE, RECORDER_NODE)
    except ValueError as exc:
        raise SensorDataError(f"node config: {exc}") from None


def _config_cameras(settings: dict[str, Any]) -> list[BagCamera] | None:
    names = settings.get("cameras") or []
    if not names:
        return None
    return [BagCamera(str(n), settings.get(f"camera.{n}.image_topic", image_topic(n)),
                      settings.get(f"camera.{n}.info_topic", info_topic(n)),
                      int(round(float(settings.get(f"camera.{n}.time_offset", 0.0)) * 1e9)),
                      bool(settings.get(f"camera.{n}.rectified", False))) for n in names]
