"""Instances that keep their identity over time: an online multi-object tracker over per-frame instance boxes.

Per frame, the instances' oriented boxes are moved into the tracking frame (a fixed frame such as ``odom`` when
the caller gives the sensor pose, so ego motion cancels; else the sensor frame), each live track is predicted
forward with its constant velocity, and tracks and instances are associated by the Hungarian method
(``scipy.optimize.linear_sum_assignment``) on

    cost = (1 - IoU_3D) + distance / max_distance + class_mismatch_cost * [classes differ]

over the pairs whose predicted centres lie within ``max_distance`` (the others cannot match; a track seen once
has no velocity yet, so its gate grows by ``max_speed`` x the time since: a car on a highway moves more than
``max_distance`` between two scans, and would otherwise start a new track every frame). A track that finds
no instance survives ``max_misses`` frames (its id comes back when the object does) and then ends. Track ids
start at 1 and are never reused. The class of a track is smoothed: an exponential moving average of its
instances' class votes (weight ``class_memory`` on the past), so one frame's wrong class does not flip it; the
track's top classes with their shares are what ``~/detections`` reports.

Layer: numpy + scipy (imported with this module, so a node pays it at start, not on its first tracked frame:
484-969 ms there before), no torch, no ROS, so the node and
``sal-ros eval tracking`` run the same code. :func:`apply_tracks` rewrites a Segmentation with the track ids and
smoothed classes, so the labeled cloud, the markers and the detections agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from sal_ros.core.types import InstanceSummary, OrientedBox, Segmentation

_INFEASIBLE = 1e6


@dataclass(frozen=True)
class TrackerConfig:
    max_distance: float = 2.0  # m between a track's predicted centre and an instance's centre to be associated
    max_misses: int = 3  # frames a track may go unmatched before it ends
    max_speed: float = 30.0  # m/s an object may move before its track knows its velocity (widens a new track's gate)
    class_mismatch_cost: float = 0.5  # added to the cost of a pair whose classes differ (discourages, allows)
    class_memory: float = 0.7  # weight of a track's past class votes against the new frame's (0: no smoothing)
    velocity_memory: float = 0.5  # weight of the past velocity against the one measured from the last step
    top_classes: int = 3  # classes reported per track


@dataclass
class Track:
    track_id: int
    center: np.ndarray  # (3,) tracking frame, at ``stamp_ns``
    size: np.ndarray  # (3,)
    yaw: float  # tracking frame
    stamp_ns: int  # last time it was matched
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))  # m/s, tracking frame
    votes: dict[int, float] = field(default_factory=dict)  # label -> smoothed share
    hits: int = 1
    misses: int = 0

    def predicted(self, stamp_ns: int) -> np.ndarray:
        return self.center + self.velocity * max(0.0, (stamp_ns - self.stamp_ns) / 1e9)

    @property
    def label(self) -> int:
        return max(self.votes.items(), key=lambda kv: (kv[1], -kv[0]))[0] if self.votes else 0

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` largest (label, share) of the smoothed class votes, best first."""
        return sorted(self.votes.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@dataclass
class TrackedInstance:
    """What the tracker says about one instance of the frame."""

    track_id: int
    label: int  # smoothed class of the track (label convention of Segmentation: class index + 1)
    classes: list[tuple[int, float]]  # top (label, share) of the track, best first
    new: bool  # the track started in this frame


@dataclass
class TrackingResult:
    by_instance: dict[int, TrackedInstance]  # frame instance id -> its track
    new_tracks: int
    active_tracks: int  # tracks alive after the frame (matched or within max_misses)
    ended: list[int]  # track ids that ended in this frame


class Tracker:
    """Online tracker; one ``update`` per frame, in stamp order (a stamp going backwards resets it)."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks: list[Track] = []
        self._next_id = 1
        self._last_stamp: int | None = None
        self._vocabulary_version: int | None = None

    def reset(self) -> None:
        """Forget every track (ids keep counting up, so an id never names two objects)."""
        self.tracks = []
        self._last_stamp = None

    def update(self, instances: Sequence[InstanceSummary], stamp_ns: int, pose: np.ndarray | None = None,
               vocabulary_version: int | None = None) -> TrackingResult:
        """Associate this frame's ``instances`` (boxes in the sensor frame) with the live tracks.

        ``pose`` is the 4x4 sensor -> tracking-frame transform at ``stamp_ns`` (None: track in the sensor frame).
        A new ``vocabulary_version`` clears the class votes (labels then name other classes); ids and motion stay.
        """
        if self._last_stamp is not None and stamp_ns < self._last_stamp:
            self.reset()  # a bag loop or a clock reset: the old tracks belong to another time line
        self._last_stamp = stamp_ns
        if vocabulary_version is not None and vocabulary_version != self._vocabulary_version:
            if self._vocabulary_version is not None:
                for track in self.tracks:
                    track.votes = {}
            self._vocabulary_version = vocabulary_version
        centers, sizes, yaws = _boxes_in(instances, pose)
        pairs = self._associate(instances, centers, sizes, yaws, stamp_ns)
        result = TrackingResult({}, 0, 0, [])
        matched_tracks = set()
        for t, d in pairs:
            track = self.tracks[t]
            self._refresh(track, instances[d], centers[d], sizes[d], yaws[d], stamp_ns)
            matched_tracks.add(t)
            result.by_instance[instances[d].instance_id] = self._report(track, new=False)
        survivors = []
        for t, track in enumerate(self.tracks):
            if t not in matched_tracks:
                track.misses += 1
                if track.misses > self.config.max_misses:
                    result.ended.append(track.track_id)
                    continue
            survivors.append(track)
        self.tracks = survivors
        matched_dets = {d for _, d in pairs}
        for d, inst in enumerate(instances):
            if d in matched_dets:
                continue
            track = Track(self._next_id, centers[d], sizes[d], yaws[d], stamp_ns, votes=class_votes(inst))
            self._next_id += 1
            self.tracks.append(track)
            result.by_instance[inst.instance_id] = self._report(track, new=True)
            result.new_tracks += 1
        result.active_tracks = len(self.tracks)
        return result

    # ------------------------------------------------------------------------------------------ internals

    def _associate(self, instances: Sequence[InstanceSummary], centers: np.ndarray, sizes: np.ndarray,
                   yaws: np.ndarray, stamp_ns: int) -> list[tuple[int, int]]:
        """(track index, instance index) pairs of the minimum-cost assignment within the gate."""
        if not self.tracks or not len(instances):
            return []
        cfg = self.config
        predicted = np.stack([t.predicted(stamp_ns) for t in self.tracks])
        dist = np.linalg.norm(predicted[:, None, :] - centers[None, :, :], axis=2)
        gate = np.array([cfg.max_distance + (cfg.max_speed * max(0.0, (stamp_ns - t.stamp_ns) / 1e9)
                                             if t.hits == 1 else 0.0) for t in self.tracks])
        cost = np.full(dist.shape, _INFEASIBLE)
        for t, d in zip(*np.nonzero(dist <= gate[:, None])):
            track = self.tracks[t]
            iou = box_iou_3d(predicted[t], track.size, track.yaw, centers[d], sizes[d], yaws[d])
            differ = track.label > 0 and instances[d].label > 0 and track.label != instances[d].label
            cost[t, d] = (1.0 - iou) + dist[t, d] / cfg.max_distance + cfg.class_mismatch_cost * differ
        rows, cols = linear_sum_assignment(cost)
        return [(int(r), int(c)) for r, c in zip(rows, cols) if cost[r, c] < _INFEASIBLE]

    def _refresh(self, track: Track, inst: InstanceSummary, center: np.ndarray, size: np.ndarray, yaw: float,
                 stamp_ns: int) -> None:
        cfg = self.config
        dt = (stamp_ns - track.stamp_ns) / 1e9
        if dt > 0:
            measured = (center - track.center) / dt
            w = cfg.velocity_memory if track.hits > 1 else 0.0  # the first step has no velocity to keep
            track.velocity = w * track.velocity + (1 - w) * measured
        track.center, track.size, track.yaw, track.stamp_ns = center, size, yaw, stamp_ns
        track.hits += 1
        track.misses = 0
        keep = cfg.class_memory if track.votes else 0.0
        votes = {label: keep * share for label, share in track.votes.items()}
        for label, share in class_votes(inst).items():
            votes[label] = votes.get(label, 0.0) + (1 - keep) * share
        total = sum(votes.values())
        track.votes = {k: v / total for k, v in votes.items() if v / total > 1e-4} if total > 0 else {}

    def _report(self, track: Track, new: bool) -> TrackedInstance:
        return TrackedInstance(track.track_id, track.label, track.top(self.config.top_classes), new)


def class_votes(inst: InstanceSummary) -> dict[int, float]:
    """One frame's class vote of an instance: its top classes' probabilities (``class_scores``) normalized to
    sum 1, or all on its label when the segmentation gives none."""
    scores = {int(c): float(p) for c, p in inst.class_scores if c > 0 and p > 0}
    total = sum(scores.values())
    if total > 0:
        return {c: p / total for c, p in scores.items()}
    return {int(inst.label): 1.0} if inst.label > 0 else {}


# ------------------------------------------------------------------------------------------------- geometry


def _boxes_in(instances: Sequence[InstanceSummary], pose: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (N, 3), sizes (N, 3) and yaws (N,) of the instances' boxes, moved by ``pose`` (4x4) if given."""
    n = len(instances)
    centers = np.array([np.asarray(i.box.center, np.float64) for i in instances]).reshape(n, 3)
    sizes = np.array([np.asarray(i.box.size, np.float64) for i in instances]).reshape(n, 3)
    yaws = np.array([float(i.box.yaw) for i in instances], np.float64)
    if pose is not None and n:
        pose = np.asarray(pose, np.float64)
        centers = centers @ pose[:3, :3].T + pose[:3, 3]
        yaws = yaws + math.atan2(pose[1, 0], pose[0, 0])  # heading change about z; lidar mounts are near level
    return centers, sizes, yaws


# The footprint geometry below works on Python floats: with 4-8 vertices per polygon, numpy's per-call cost was
# most of the tracker's time (box IoU 60 -> 15 us, ~0.6 ms per frame of 14 tracked objects).
XY = tuple[float, float]


def _corners(x: float, y: float, length: float, width: float, yaw: float) -> list[XY]:
    c, s = math.cos(yaw), math.sin(yaw)
    hl, hw = length / 2, width / 2
    return [(x + u * c - v * s, y + u * s + v * c) for u, v in ((hl, hw), (-hl, hw), (-hl, -hw), (hl, -hw))]


def _polygon_area(poly: list[XY]) -> float:
    if len(poly) < 3:
        return 0.0
    twice = sum(p[0] * q[1] - p[1] * q[0] for p, q in zip(poly, poly[1:] + poly[:1]))
    return 0.5 * abs(twice)


def _clip(subject: list[XY], clipper: list[XY]) -> list[XY]:
    """Sutherland-Hodgman: the part of convex polygon ``subject`` inside convex, counter-clockwise ``clipper``."""
    out = subject
    for a, b in zip(clipper, clipper[1:] + clipper[:1]):
        ex, ey = b[0] - a[0], b[1] - a[1]
        points, out = out, []
        if not points:
            break
        side = [ex * (p[1] - a[1]) - ey * (p[0] - a[0]) >= -1e-12 for p in points]
        for j, q in enumerate(points):
            p, p_in, q_in = points[j - 1], side[j - 1], side[j]
            if q_in:
                if not p_in:
                    out.append(_intersection(p, q, a, ex, ey))
                out.append(q)
            elif p_in:
                out.append(_intersection(p, q, a, ex, ey))
    return out


def _intersection(p: XY, q: XY, a: XY, ex: float, ey: float) -> XY:
    dx, dy = q[0] - p[0], q[1] - p[1]
    denom = dx * ey - dy * ex
    if abs(denom) < 1e-12:
        return q
    t = ((a[0] - p[0]) * ey - (a[1] - p[1]) * ex) / denom
    return p[0] + t * dx, p[1] + t * dy


def box_iou_3d(c1: np.ndarray, s1: np.ndarray, yaw1: float, c2: np.ndarray, s2: np.ndarray, yaw2: float) -> float:
    """IoU of two yaw-oriented boxes: footprint intersection (convex clipping) times the z overlap."""
    l1, w1, h1 = (max(float(v), 1e-3) for v in s1[:3])
    l2, w2, h2 = (max(float(v), 1e-3) for v in s2[:3])
    x1, y1, z1 = (float(v) for v in c1[:3])
    x2, y2, z2 = (float(v) for v in c2[:3])
    inter_bev = _polygon_area(_clip(_corners(x1, y1, l1, w1, yaw1), _corners(x2, y2, l2, w2, yaw2)))
    z_overlap = max(0.0, min(z1 + h1 / 2, z2 + h2 / 2) - max(z1 - h1 / 2, z2 - h2 / 2))
    inter = inter_bev * z_overlap
    union = l1 * w1 * h1 + l2 * w2 * h2 - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------- segmentation


def apply_tracks(seg: Segmentation, result: TrackingResult) -> Segmentation:
    """``seg`` with track ids in ``instance`` (per point and in ``instances``) and each instance's points and
    summary carrying its track's smoothed class. Changed in place and returned."""
    if not seg.instances:
        return seg
    top_id = max(int(seg.instance.max(initial=0)), max(i.instance_id for i in seg.instances))
    new_id = np.zeros(top_id + 1, np.uint32)
    new_label = np.zeros(top_id + 1, np.int64)  # labels are positive: 0 = keep the point's own
    instances = []
    for inst in seg.instances:
        tracked = result.by_instance.get(inst.instance_id)
        if tracked is None:
            continue  # not given to the tracker: leaves the instance list, its points keep no instance
        label = tracked.label or inst.label
        new_id[inst.instance_id] = tracked.track_id
        new_label[inst.instance_id] = label
        name = seg.class_names[label - 1] if 0 < label <= len(seg.class_names) else inst.class_name
        instances.append(InstanceSummary(tracked.track_id, label, name, inst.score, inst.num_points,
                                         OrientedBox(inst.box.center, inst.box.size, inst.box.yaw),
                                         inst.class_scores))
    # every point through the two small tables (id 0 maps to 0): no masks, which cost 3x more once instance
    # points are most of the cloud
    relabel = np.take(new_label.astype(seg.label.dtype), seg.instance)
    np.copyto(seg.label, relabel, where=relabel > 0)
    seg.instance[:] = np.take(new_id, seg.instance)
    seg.instances = instances
    return seg


__all__ = ["TrackerConfig", "Track", "TrackedInstance", "TrackingResult", "Tracker", "box_iou_3d", "apply_tracks"]
