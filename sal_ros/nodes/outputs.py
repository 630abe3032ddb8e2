"""Output messages of the segmenter: labeled cloud, instance markers, overlay images, JSON records, colours.

Reproducing a bag of outputs: ``~/labeled_points`` holds per point ``label`` (0 = no class, k = class k-1),
``vocabulary_version`` (the vocabulary ``label`` refers to, in the two bytes of padding before ``instance``, so
the cloud stays 32 bytes a point), ``instance`` and ``score``. Every output names its vocabulary version: the
cloud per point, ``~/markers`` in their ``vocabulary`` marker (id = version), ``~/info`` per frame (with the
``classes``) and ``~/vocabulary`` (transient-local: each version once, with prompts, descriptions and
thing/stuff). So any one recorded output tells which vocabulary made it, and with ``~/info`` or ``~/vocabulary``
the class names, even if the vocabulary changed mid-recording.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sal_ros.core.msgtypes import MessageTypes, make_header
from sal_ros.core.palette import UNLABELED_COLOR, class_colors, label_colors, track_color  # noqa: F401 - the one palette, re-exported for the node
from sal_ros.core.pointcloud2 import CloudEncoder, _keeps_data, pack_rgb
from sal_ros.core.types import InstanceSummary, Segmentation

if TYPE_CHECKING:
    from sal_ros.model.vocabulary import Vocabulary

# PointCloud2 layout of ~/labeled_points (name, dtype), in order.
LABELED_FIELDS = (
    ("x", np.float32), ("y", np.float32), ("z", np.float32), ("intensity", np.float32),
    ("label", np.uint16), ("vocabulary_version", np.uint16), ("instance", np.uint32), ("score", np.float32),
    ("rgb", np.float32),
)
VOCABULARY_NS = "vocabulary"  # marker namespace of the vocabulary legend; its id is the version


# ---------------------------------------------------------------------------------------------- point cloud


@lru_cache(maxsize=4)
def class_palette(num_classes: int) -> np.ndarray:
    """:func:`class_colors`, read-only, computed once per class count (0.19 ms for 20 classes, paid per frame
    otherwise)."""
    palette = class_colors(num_classes)
    palette.flags.writeable = False
    return palette


def labeled_cloud(
    xyz: np.ndarray,
    intensity: np.ndarray | None,
    seg: Segmentation,
    frame_id: str,
    stamp_ns: int,
    types: MessageTypes,
    palette: np.ndarray | None = None,
    encoder: CloudEncoder | None = None,
) -> Any:
    """PointCloud2 with x y z intensity label vocabulary_version instance score rgb: the input's points in the
    input's order. ``vocabulary_version`` is ``seg.vocabulary_version`` mod 65536 on every point.

    ``intensity`` None (a cloud without one) is written as zeros, so the layout never changes. ``encoder``: a
    publisher's :class:`CloudEncoder` (reused buffer: the message is valid until its next cloud); default a
    fresh buffer.
    """
    n = xyz.shape[0]
    if seg.label.shape[0] != n:
        raise ValueError(f"segmentation has {seg.label.shape[0]} points, cloud has {n}")
    if palette is None:
        palette = class_colors(len(seg.class_names))
    fields = {
        "xyz": xyz,
        # constants as read-only broadcasts: written into the cloud without an N-sized array first
        "intensity": np.broadcast_to(np.float32(0), (n,)) if intensity is None else np.asarray(intensity, np.float32),
        "label": np.asarray(seg.label, np.uint16),
        "vocabulary_version": np.broadcast_to(np.uint16(int(seg.vocabulary_version) & 0xFFFF), (n,)),
        "instance": np.asarray(seg.instance, np.uint32),
        "score": np.asarray(seg.score, np.float32),
        # one 4-byte gather per point from the packed palette (packing per point costs ~4x more); by intp labels,
        # since numpy converts a uint16 index array element by element (0.21 vs 0.08 ms for 120k points)
        "rgb": label_colors(np.asarray(seg.label, np.intp), pack_rgb(palette)),
    }
    return (encoder or CloudEncoder(types, reuse=False)).encode(fields, frame_id, stamp_ns)


def filtered_cloud(msg: Any, keep: np.ndarray, types: MessageTypes) -> Any:
    """The input cloud ``msg`` with only the points where ``keep`` (one bool per point, row-major): its fields,
    point_step and byte order as they are, the kept points in their order, header unchanged. One row (height 1):
    removing points breaks an organized cloud's grid; row padding is dropped."""
    step, width, height = int(msg.point_step), int(msg.width), int(msg.height)
    keep = np.asarray(keep, bool)
    if keep.shape != (width * height,):
        raise ValueError(f"keep has {keep.shape} entries, the cloud {width * height} points")
    raw = np.frombuffer(memoryview(msg.data).cast("B"), np.uint8)
    rows = raw[: height * int(msg.row_step)].reshape(height, int(msg.row_step))[:, : width * step]
    kept = rows.reshape(width * height, step)[keep]
    data, view = types.byte_buffer(kept.nbytes)
    view[:] = kept.reshape(-1)
    out = types.PointCloud2(header=msg.header, height=1, width=int(kept.shape[0]), fields=list(msg.fields),
                            is_bigendian=msg.is_bigendian, point_step=step, row_step=step * int(kept.shape[0]),
                            is_dense=msg.is_dense, **_keeps_data(types))
    out.data = data  # after construction, as CloudEncoder does: the setter keeps the array('B') as is
    return out


def labels_to_remove(class_names: Sequence[str], removed: Sequence[str]) -> np.ndarray:
    """The label ids (k = class_names[k-1]) of the classes named in ``removed``."""
    wanted = set(removed)
    return np.array([k for k, name in enumerate(class_names, start=1) if name in wanted], np.intp)


# ---------------------------------------------------------------------------------------------- debug times


def stamped_ms(value_ms: float, frame_id: str, stamp_ns: int, types: MessageTypes) -> Any:
    """One ``~/debug/*_ms`` figure. Autoware publishes these as autoware_internal_debug_msgs/Float64Stamped (ex
    tier4_debug_msgs: a stamp and a float64); ROS 2's common interfaces have no stamped float, so the closest
    standard type carries it: sensor_msgs/Temperature (header + one float64 + variance 0 = unknown). The header
    is the frame's cloud stamp and frame, so a figure lines up with that frame's outputs (docs/ros.md)."""
    from sensor_msgs.msg import Temperature

    return Temperature(header=make_header(frame_id, stamp_ns, types), temperature=float(value_ms), variance=0.0)


# -------------------------------------------------------------------------------------------------- markers


def box_corners(center: np.ndarray, size: np.ndarray, yaw: float) -> np.ndarray:
    """``(8, 3)`` corners of an oriented box: bottom face 0-3, top face 4-7, counter-clockwise."""
    return boxes_corners(np.reshape(center, (1, 3)), np.reshape(size, (1, 3)), np.reshape(yaw, (1,)))[0]


def boxes_corners(centers: np.ndarray, sizes: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """``(K, 8, 3)`` corners of K oriented boxes (see :func:`box_corners`), in one numpy pass for all of them."""
    sizes = np.asarray(sizes, np.float64)
    half_l, half_w, h = sizes[:, :1] * _CORNER_X / 2, sizes[:, 1:2] * _CORNER_Y / 2, sizes[:, 2:]
    c, s = np.cos(np.asarray(yaws, np.float64))[:, None], np.sin(np.asarray(yaws, np.float64))[:, None]
    bottom = np.stack([c * half_l - s * half_w, s * half_l + c * half_w, np.broadcast_to(-h / 2, half_l.shape)], 2)
    top = bottom + np.stack([np.zeros_like(h), np.zeros_like(h), h], 2)
    return np.concatenate([bottom, top], 1) + np.asarray(centers, np.float64)[:, None, :]


_CORNER_X, _CORNER_Y = np.array([1, -1, -1, 1]), np.array([1, 1, -1, -1])  # bottom face, counter-clockwise
# Edge list of box_corners: bottom ring, top ring, verticals.
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]])


class MarkerPool:
    """The box and text markers (with their points) of one publisher, kept from one :func:`instance_markers` call
    to the next, which only sets their values: a frame builds no Marker or Point. The array built with a pool is
    valid until the pool's next use; publish it first (rclpy copies a message inside ``publish``, as for
    :class:`~sal_ros.core.pointcloud2.CloudEncoder`)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Any, Any]] = []

    def take(self, count: int, templates: Any) -> list[tuple[Any, Any]]:
        """``count`` (box, text) pairs; new ones are copied from ``templates()``, called only when needed."""
        if len(self.pairs) < count:
            box, text = templates()
            self.pairs += [_marker_pair(box, text) for _ in range(count - len(self.pairs))]
        return self.pairs[:count]


def instance_markers(
    instances: Sequence[InstanceSummary],
    frame_id: str,
    stamp_ns: int,
    palette: np.ndarray,
    types: MessageTypes,
    min_points: int = 1,
    vocabulary_version: int | None = None,
    tracked: bool = False,
    pool: MarkerPool | None = None,
) -> Any:
    """MarkerArray: DELETEALL, the vocabulary legend (when ``vocabulary_version`` is given), then per instance
    an oriented box (LINE_LIST) and a facing text "class score". ``tracked``: instance ids are track ids, so each
    box takes its track's colour (the same in every frame) and the text ends in "#id". ``pool``: a publisher's
    :class:`MarkerPool` (markers reused); default new markers."""
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker, MarkerArray

    header = make_header(frame_id, stamp_ns, types)
    markers = [Marker(header=header, action=Marker.DELETEALL)]  # empty ns: RViz 2 clears every namespace
    if vocabulary_version is not None:
        markers.append(vocabulary_marker(header, vocabulary_version))
    shown = [inst for inst in instances if inst.num_points >= min_points]
    if not shown:
        return MarkerArray(markers=markers)
    corners = boxes_corners(np.array([i.box.center for i in shown], np.float64),
                            np.array([i.box.size for i in shown], np.float64), np.array([i.box.yaw for i in shown]))
    edges = corners[:, BOX_EDGES.reshape(-1)].tolist()  # python floats: no numpy scalars in the messages
    tops = corners[:, 4:].mean(axis=1)
    tops[:, 2] += 0.4
    pairs = (pool or MarkerPool()).take(len(shown), lambda: _marker_templates(header, Marker, ColorRGBA))
    for (box, text), inst, ends, top in zip(pairs, shown, edges, tops.tolist()):
        rgb = track_color(inst.instance_id) if tracked else palette[inst.label if inst.label < len(palette) else 0]
        box.header = text.header = header
        box.id = text.id = int(inst.instance_id)
        color = box.color
        color.r, color.g, color.b = (float(v) / 255.0 for v in rgb)
        for point, (x, y, z) in zip(box.points, ends):
            point.x, point.y, point.z = x, y, z
        text.text = f"{inst.class_name} {inst.score:.2f}" + (f" #{inst.instance_id}" if tracked else "")
        position = text.pose.position
        position.x, position.y, position.z = top
        markers += [box, text]
    return MarkerArray(markers=markers)


def _marker_templates(header: Any, Marker: Any, ColorRGBA: Any) -> tuple[Any, Any]:  # noqa: N803 - classes
    """The parts every instance's box (LINE_LIST) and text (TEXT_VIEW_FACING) marker have in common."""
    box = Marker(header=header, ns="boxes", type=Marker.LINE_LIST, action=Marker.ADD)
    box.pose.orientation.w = 1.0
    box.scale.x = 0.05
    text = Marker(header=header, ns="labels", type=Marker.TEXT_VIEW_FACING, action=Marker.ADD)
    text.pose.orientation.w = 1.0
    text.scale.z = 0.6
    text.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
    return box, text


def _marker_pair(box: Any, text: Any) -> tuple[Any, Any]:
    """A box and a text marker of their own, from the templates: shallow copies (a Marker's constructor builds ~20
    sub-messages) that share only the constant parts, with their own colour, points and text position."""
    from geometry_msgs.msg import Point
    from std_msgs.msg import ColorRGBA

    box, text = copy.copy(box), copy.copy(text)
    box.color = ColorRGBA(a=1.0)
    box.points = [Point() for _ in range(BOX_EDGES.size)]
    text.pose = copy.copy(text.pose)
    text.pose.position = Point()
    return box, text


def vocabulary_marker(header: Any, version: int) -> Any:
    """Facing text "vocabulary vN" 2 m above the sensor, ns ``vocabulary``, id N: a recording of the markers alone
    names the vocabulary of its labels, and RViz shows when a prompt change took effect."""
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker

    text = Marker(header=header, ns=VOCABULARY_NS, id=int(version), type=Marker.TEXT_VIEW_FACING,
                  action=Marker.ADD, text=f"vocabulary v{int(version)}")
    text.pose.position.z = 2.0
    text.pose.orientation.w = 1.0
    text.scale.z = 0.5
    text.color = ColorRGBA(r=0.8, g=0.8, b=0.8, a=1.0)
    return text


# -------------------------------------------------------------------------------------------------- overlays


def draw_points(
    image_rgb: np.ndarray, uv: np.ndarray, depth: np.ndarray, colors: np.ndarray, radius: int = 2
) -> np.ndarray:
    """Paint projected points (pixel ``uv`` (M, 2), camera ``depth`` (M,)) as discs on a copy of ``image_rgb``.

    Far points are painted first, so near ones stay on top where discs overlap.
    """
    out = np.array(image_rgb, np.uint8, copy=True)
    h, w = out.shape[:2]
    if uv.shape[0] == 0:
        return out
    order = np.argsort(-np.asarray(depth), kind="stable")
    px = np.rint(uv[order, 0]).astype(np.int64)
    py = np.rint(uv[order, 1]).astype(np.int64)
    cols = colors[order]
    r = int(radius)
    offsets = [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dx * dx + dy * dy <= r * r + r]
    # One pass per disc offset keeps it vectorized; within a pass later (nearer) points win.
    for dx, dy in offsets:
        x, y = px + dx, py + dy
        ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        out[y[ok], x[ok]] = cols[ok]
    return out


def project_view(view: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (lidar frame) into one camera view: pixel ``uv`` (M, 2), ``depth`` (M,), and the indices of the
    M points that land in the image in front of the camera."""
    from sal_ros.core.camera import project_points

    proj = project_points(points, view.T_cam_lidar, view.camera, min_depth=0.1)
    idx = proj.indices
    return proj.uv[idx], proj.depth[idx], idx


def overlay_message(view: Any, points: np.ndarray, label: np.ndarray, palette: np.ndarray, radius: int,
                    types: MessageTypes) -> Any:
    """rgb8 Image: the camera image with the labeled points drawn in their class colours (stamp/frame of the image)."""
    from sal_ros.core.image import encode_image, to_rgb

    uv, depth, idx = project_view(view, points)
    image = draw_points(to_rgb(view.image), uv, depth, label_colors(label[idx], palette), radius)
    return encode_image(image, "rgb8", view.frame_id, view.stamp_ns, types)


# --------------------------------------------------------------------------------------------- typed messages


def _quaternion_z(yaw: float) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation by ``yaw`` about z."""
    return 0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))


def detections_message(
    instances: Sequence[InstanceSummary],
    frame_id: str,
    stamp_ns: int,
    class_names: Sequence[str],
    types: MessageTypes,
    classes_by_id: dict[int, Sequence[tuple[int, float]]] | None = None,
) -> Any:
    """vision_msgs/Detection3DArray, one Detection3D per instance (cloud frame and stamp): ``bbox`` the oriented
    box the markers draw, ``id`` the instance (track) id, ``results`` the top classes, best first, as class_id
    = class name and score = the instance's score x the class's share in ``classes_by_id[id]`` ((label, share)
    pairs, e.g. the track's smoothed class votes; without it the instance's own class with its score)."""
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    header = make_header(frame_id, stamp_ns, types)
    detections = []
    for inst in instances:
        det = Detection3D(header=header, id=str(int(inst.instance_id)))
        pose = det.bbox.center
        pose.position.x, pose.position.y, pose.position.z = (float(v) for v in inst.box.center)
        q = pose.orientation
        q.x, q.y, q.z, q.w = _quaternion_z(inst.box.yaw)
        det.bbox.size.x, det.bbox.size.y, det.bbox.size.z = (float(v) for v in inst.box.size)
        ranked = (classes_by_id or {}).get(int(inst.instance_id)) or [(int(inst.label), 1.0)]
        for label, share in ranked:
            if not 0 < label <= len(class_names):
                continue
            hyp = ObjectHypothesisWithPose()
            hyp.hypothesis.class_id = str(class_names[label - 1])
            hyp.hypothesis.score = float(inst.score) * float(share)
            hyp.pose.pose = pose
            det.results.append(hyp)
        detections.append(det)
    return Detection3DArray(header=header, detections=detections)


def vocabulary_message(vocabulary: Vocabulary, palette: np.ndarray, text_encoder: str, stamp: Any) -> Any:
    """sal_ros_msgs/Vocabulary: version, source, combine, templates, text encoder and per class its name,
    descriptions, thing flag and colour (``palette`` row k+1 for class k)."""
    from sal_ros_msgs.msg import Vocabulary as VocabularyMsg
    from sal_ros_msgs.msg import VocabularyClass as VocabularyClassMsg
    from std_msgs.msg import ColorRGBA, Header

    classes = []
    for k, item in enumerate(vocabulary.classes):
        r, g, b = (float(v) / 255.0 for v in palette[k + 1])
        classes.append(VocabularyClassMsg(name=item.name, descriptions=list(item.descriptions), thing=item.thing,
                                          color=ColorRGBA(r=r, g=g, b=b, a=1.0)))
    return VocabularyMsg(header=Header(stamp=stamp), version=int(vocabulary.version), source=vocabulary.source,
                         combine=vocabulary.combine, templates=list(vocabulary.templates), text_encoder=text_encoder,
                         classes=classes)


def frame_summary_message(
    seg: Segmentation,
    frame_id: str,
    stamp_ns: int,
    num_points: int,
    types: MessageTypes,
    missing_cameras: Sequence[str] = (),
    timings_ms: dict[str, float] | None = None,
    tracking: Any = None,
    tracking_frame: str = "",
) -> Any:
    """sal_ros_msgs/FrameSummary of one processed cloud (header = the cloud's)."""
    from sal_ros_msgs.msg import FrameSummary

    timings = timings_ms if timings_ms is not None else seg.timings_ms
    return FrameSummary(
        header=make_header(frame_id, stamp_ns, types), vocabulary_version=int(seg.vocabulary_version),
        num_points=int(num_points), num_labeled=int(np.count_nonzero(seg.label)),
        num_instances=len(seg.instances),
        num_new_tracks=int(getattr(tracking, "new_tracks", 0)),
        num_active_tracks=int(getattr(tracking, "active_tracks", 0)),
        tracking_frame=tracking_frame, missing_cameras=[str(c) for c in missing_cameras],
        stage_names=list(timings), stage_ms=[float(v) for v in timings.values()])


# ----------------------------------------------------------------------------------------------- JSON records


def vocabulary_record(vocabulary: Vocabulary) -> str:
    """JSON for ``~/debug/vocabulary``: version, classes, descriptions, thing flags and source."""
    return json.dumps({"version": int(vocabulary.version), "classes": list(vocabulary.class_names),
                       "descriptions": vocabulary.descriptions, "things": vocabulary.things,
                       "source": vocabulary.source})


def frame_record(
    stamp_ns: int,
    frame_id: str,
    seg: Segmentation,
    num_points: int,
    missing_cameras: Sequence[str] = (),
    extra: dict | None = None,
) -> str:
    """JSON for ``~/info``: what a consumer needs to interpret the labeled cloud with the same stamp."""
    record = {
        "stamp_ns": int(stamp_ns),
        "frame_id": frame_id,
        "vocabulary_version": int(seg.vocabulary_version),
        "classes": list(seg.class_names),
        "num_points": int(num_points),
        "missing_cameras": list(missing_cameras),
        "instances": [
            {"id": int(i.instance_id), "label": int(i.label), "class": i.class_name, "score": round(float(i.score), 4),
             "num_points": int(i.num_points), "center": _jsonable(i.box.center), "size": _jsonable(i.box.size),
             "yaw": round(float(i.box.yaw), 4)}
            for i in seg.instances
        ],
        "timings_ms": {k: round(float(v), 3) for k, v in seg.timings_ms.items()},
    }
    if extra:
        record.update(extra)
    return json.dumps(record)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [round(v, 4) for v in value.reshape(-1).tolist()] if value.dtype.kind == "f" else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
