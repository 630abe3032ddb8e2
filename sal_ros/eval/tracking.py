"""Evaluation over time: LSTQ (4D panoptic segmentation, SemanticKITTI) and id switches of the tracker.

LSTQ = sqrt(S_assoc x S_cls) (Aygün et al., "4D Panoptic LiDAR Segmentation", CVPR 2021), computed as the
benchmark's evaluator computes it (4D-PLS ``Panoptic4DEval``, ``evaluate_4dpanoptic.py`` defaults):

- Points whose ground-truth class is 0 (ignore) are left out of everything.
- Ground-truth tubes are keyed by (class, instance id) within a sequence: SemanticKITTI reuses instance ids
  across classes, so a car and a person that both carry id 1 are two tubes. Every labelled class with instance
  ids > 0 forms tubes (in SemanticKITTI only things carry ids). A tube counts in a frame only with more than
  ``min_points`` (50) points there; its points in a frame where it has fewer are removed from the association
  score, predicted ids included.
- Predicted tubes are the predicted instance ids > 0 of a sequence, whatever their class.
- S_assoc = 1/|T| sum over gt tubes t of 1/|t| sum over predicted tubes p overlapping t of TPA(p, t) x IoU(p, t),
  with TPA = |p n t| and IoU = TPA / (|p| + |t| - TPA); T pools the tubes of every sequence evaluated.
- S_cls = mean IoU over the classes present (in the ground truth or the predictions, on labelled points), from
  one confusion matrix over all points. A labelled point predicted as class 0 makes class 0 present with IoU 0, as
  in the reference (its README warns of it); ``class0_in_s_cls=False`` leaves class 0 out instead.
- The reference skips predicted instance id 1 (a leftover of an earlier +1 shift of ids; its own self-test
  expects id 1 to count): we count it; ``skip_prediction_id_1=True`` reproduces the reference's behaviour.
- No ground-truth tube: the reference divides by zero; S_assoc is 0 here.

Id switches (CLEAR-MOT style): per frame, a ground-truth tube is matched to the predicted instance with IoU
> 0.5 (unique); a switch is counted when a tube matched in an earlier frame is matched to another predicted id.
Counted on the points kept for the association score.

``sal-ros eval tracking`` runs each sequence through the segmenter (a checkpoint) or takes its ground truth as
the segmentation (``--oracle``: the tracker alone is evaluated), tracks in the fixed frame of the sequence poses
(matched to scans by scan number), and writes tracking.json / tracking.md with the pooled and per-sequence scores.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.eval.confusion import ConfusionMatrix, check_same_length

_SHIFT = np.int64(1) << np.int64(32)
MIN_POINTS = 50  # evaluate_4dpanoptic.py --min_inst_points default


@dataclass
class LSTQResult:
    lstq: float
    s_assoc: float
    s_cls: float
    id_switches: int
    gt_tubes: int
    pred_tubes: int
    frames: int
    iou_per_class: list[float | None] = field(default_factory=list)
    sequences: int = 1

    def to_dict(self) -> dict:
        return {"lstq": self.lstq, "s_assoc": self.s_assoc, "s_cls": self.s_cls, "id_switches": self.id_switches,
                "gt_tubes": self.gt_tubes, "pred_tubes": self.pred_tubes, "frames": self.frames,
                "sequences": self.sequences, "iou_per_class": self.iou_per_class}


@dataclass
class _Tubes:
    """One sequence's tube sizes and overlaps (points, summed over its frames)."""
    pairs: dict[int, int] = field(default_factory=dict)  # pred id << 32 | gt tube key -> points in both
    pred_size: dict[int, int] = field(default_factory=dict)
    gt_size: dict[int, int] = field(default_factory=dict)
    last_match: dict[int, int] = field(default_factory=dict)  # gt tube key -> pred id it was matched to last


def tube_keys(gt_sem: np.ndarray, gt_inst: np.ndarray) -> np.ndarray:
    """Ground-truth tube key per point: class << 16 | instance id, 0 where the instance id is 0."""
    gt_sem, gt_inst = np.asarray(gt_sem, np.int64), np.asarray(gt_inst, np.int64)
    return np.where(gt_inst > 0, (gt_sem << 16) | gt_inst, 0)


class LSTQEvaluator:
    """Accumulates tubes per sequence, one ``add`` per frame in time order.

    Class ids 0..C (0 = ignore in the ground truth), instance ids any non-negative integers that name the same
    object across the frames of a sequence (0 = no instance).
    """

    def __init__(self, num_classes: int, min_points: int = MIN_POINTS, class0_in_s_cls: bool = True,
                 skip_prediction_id_1: bool = False) -> None:
        self.num_classes = num_classes
        self.min_points = min_points
        self.class0_in_s_cls = class0_in_s_cls
        self.skip_prediction_id_1 = skip_prediction_id_1
        self.confusion = ConfusionMatrix(num_classes)
        self._sequences: dict[str, _Tubes] = {}
        self.id_switches = 0
        self.frames = 0

    def add(self, pred_sem: np.ndarray, pred_inst: np.ndarray, gt_sem: np.ndarray, gt_inst: np.ndarray,
            sequence: str = "") -> None:
        check_same_length(pred_sem=pred_sem, pred_inst=pred_inst, gt_sem=gt_sem, gt_inst=gt_inst)
        pred_sem, gt_sem = np.asarray(pred_sem, np.int64), np.asarray(gt_sem, np.int64)
        self.confusion.add(pred_sem, gt_sem)
        labelled = gt_sem != 0
        p = np.asarray(pred_inst, np.int64)[labelled]
        g = tube_keys(gt_sem[labelled], np.asarray(gt_inst, np.int64)[labelled])
        p, g = self._without_small_tubes(p, g)
        if self.skip_prediction_id_1:
            p = np.where(p == 1, 0, p)
        tubes = self._sequences.setdefault(sequence, _Tubes())
        g_ids, g_counts = np.unique(g[g > 0], return_counts=True)
        p_ids, p_counts = np.unique(p[p > 0], return_counts=True)
        _accumulate(tubes.gt_size, g_ids, g_counts)
        _accumulate(tubes.pred_size, p_ids, p_counts)
        both = (p > 0) & (g > 0)
        keys, inter = np.unique(p[both] * _SHIFT + g[both], return_counts=True)
        _accumulate(tubes.pairs, keys, inter)
        self._count_switches(tubes, (p_ids, p_counts), (g_ids, g_counts), keys, inter)
        self.frames += 1

    def _without_small_tubes(self, p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drops the points of tubes with at most ``min_points`` points in this frame, from both sides."""
        ids, counts = np.unique(g[g > 0], return_counts=True)
        small = ids[counts <= self.min_points]
        if not small.size:
            return p, g
        keep = ~np.isin(g, small)
        return p[keep], g[keep]

    def _count_switches(self, tubes: _Tubes, pred, gt, keys: np.ndarray, inter: np.ndarray) -> None:
        pid, gid = keys // _SHIFT, keys % _SHIFT
        p_size = pred[1][np.searchsorted(pred[0], pid)] if pid.size else pid
        g_size = gt[1][np.searchsorted(gt[0], gid)] if gid.size else gid
        iou = inter / np.maximum(p_size + g_size - inter, 1)
        for p_id, g_id in zip(pid[iou > 0.5].tolist(), gid[iou > 0.5].tolist()):
            last = tubes.last_match.get(g_id)
            if last is not None and last != p_id:
                self.id_switches += 1
            tubes.last_match[g_id] = p_id

    def s_cls(self) -> tuple[float, np.ndarray]:
        """(S_cls, IoU per class 0..C, NaN where absent)."""
        iou = self.confusion.iou()
        conf = self.confusion.conf
        present = list(iou[1:][np.isfinite(iou[1:])])
        if self.class0_in_s_cls and conf[0, 1:].sum() > 0:  # class 0 predicted on labelled points
            iou[0] = 0.0
            present.append(0.0)
        return (float(sum(present) / len(present)) if present else 0.0), iou

    def s_assoc(self) -> float:
        total, tubes_n = 0.0, 0
        for tubes in self._sequences.values():
            per_gt: dict[int, float] = {}
            for key, tpa in tubes.pairs.items():
                pred, gt = key >> 32, key & 0xFFFFFFFF
                per_gt[gt] = per_gt.get(gt, 0.0) + tpa * tpa / (tubes.pred_size[pred] + tubes.gt_size[gt] - tpa)
            total += sum(per_gt.get(gt, 0.0) / size for gt, size in tubes.gt_size.items())
            tubes_n += len(tubes.gt_size)
        return total / tubes_n if tubes_n else 0.0

    def compute(self) -> LSTQResult:
        s_cls, iou = self.s_cls()
        s_assoc = self.s_assoc()
        return LSTQResult(lstq=math.sqrt(s_assoc * s_cls), s_assoc=s_assoc, s_cls=s_cls,
                          id_switches=self.id_switches,
                          gt_tubes=sum(len(t.gt_size) for t in self._sequences.values()),
                          pred_tubes=sum(len(t.pred_size) for t in self._sequences.values()),
                          frames=self.frames, sequences=len(self._sequences),
                          iou_per_class=[None if not np.isfinite(v) else float(v) for v in iou[1:]])


def _accumulate(store: dict[int, int], keys: np.ndarray, counts: np.ndarray) -> None:
    for k, c in zip(keys.tolist(), counts.tolist()):
        store[k] = store.get(k, 0) + c


# ---------------------------------------------------------------------------------------------- sequences


def sequence_of(key: str | None) -> str:
    """The sequence of a frame key: the key up to the scan number (``00_000003`` -> ``00``)."""
    return key.rsplit("_", 1)[0] if key and "_" in key else ""


def oracle_segmentation(frame, label_set):
    """The frame's ground truth as a Segmentation (dataset classes as the vocabulary, instances numbered 1..K
    in a per-frame order), for evaluating the tracker alone. Instances are (class, id) pairs, as ground-truth
    tubes are: a car and a person sharing an id are two instances."""
    from sal_ros.core.panoptic import instance_summaries
    from sal_ros.core.types import Segmentation

    sem, _ = label_set.split(frame.gt_labels)
    keys = tube_keys(sem, np.asarray(frame.gt_labels, np.int64) >> 16)
    thing = label_set.thing_mask[sem] & (keys > 0)
    ids, per_frame = np.unique(keys[thing], return_inverse=True)
    # ids afresh each frame in an order of the frame's own, as a model gives them: only a tracker links them
    order = np.random.default_rng(int(frame.stamp_ns) % 2**32).permutation(len(ids))
    instance = np.zeros(len(sem), np.uint32)
    instance[thing] = order[per_frame.reshape(-1)] + 1
    label = sem.astype(np.uint16)
    score = np.ones(len(sem), np.float32)
    seg = Segmentation(label=label, instance=instance, score=score, class_names=tuple(label_set.class_names),
                       vocabulary_version=1)
    seg.instances = instance_summaries(frame.points, instance, label, score, seg.class_names)
    return seg


def track_and_evaluate(frames, segment, label_set, poses: dict | None = None, config=None, class_map=None,
                       progress: bool = False, trajectories: dict | None = None,
                       evaluator: LSTQEvaluator | None = None, track: bool = True) -> dict[str, LSTQResult]:
    """Segment each frame (``segment(frame) -> Segmentation``), track each sequence with a tracker of its own
    (in the poses' fixed frame where ``poses`` holds the frame's key: ``data.datasets.semantickitti_poses``),
    and score LSTQ and id switches against the frames' ground truth. Returns the result per sequence and under
    ``"all"`` the pooled one (the benchmark's: tubes of every sequence, one confusion matrix).
    ``trajectories`` (a dict) receives per (sequence, track id) its box centres in the tracking frame as
    (frame key, x, y). ``track=False`` scores the segmenter's own ids (the untracked control)."""
    from tqdm import tqdm

    from sal_ros.core.tracking import Tracker, apply_tracks
    from sal_ros.data.labels import vocabulary_lut
    from sal_ros.eval.offline import to_dataset_classes

    poses = poses or {}
    pooled = evaluator or LSTQEvaluator(label_set.num_classes)
    per_sequence: dict[str, LSTQEvaluator] = {}
    trackers: dict[str, Tracker] = {}
    lut = None
    for i, frame in enumerate(tqdm(frames, desc="track", unit="frame", disable=not progress)):
        if frame.gt_labels is None:
            raise ValueError(f"frame {frame.key or i} has no ground truth")
        seq = sequence_of(frame.key)
        pose = frame_pose(frame, poses)
        seg = segment(frame)
        tracker = trackers.setdefault(seq, Tracker(config))
        if track:
            apply_tracks(seg, tracker.update(seg.instances, frame.stamp_ns, pose, seg.vocabulary_version))
        if trajectories is not None:
            for inst in seg.instances:
                c = np.asarray(inst.box.center, np.float64)
                c = c if pose is None else pose[:3, :3] @ c + pose[:3, 3]
                trajectories.setdefault((seq, inst.instance_id), []).append((frame.key, float(c[0]), float(c[1])))
        if lut is None:
            lut = vocabulary_lut(seg.class_names, label_set, class_map)
        pred_sem, pred_inst = to_dataset_classes(seg, label_set, lut)
        gt_sem, _ = label_set.split(frame.gt_labels)
        gt_inst = np.asarray(frame.gt_labels, np.int64) >> 16
        ev = per_sequence.setdefault(seq, LSTQEvaluator(pooled.num_classes, pooled.min_points,
                                                        pooled.class0_in_s_cls, pooled.skip_prediction_id_1))
        for e in (ev, pooled):
            e.add(pred_sem, pred_inst, gt_sem, gt_inst, sequence=seq)
    return {**{seq: ev.compute() for seq, ev in per_sequence.items()}, "all": pooled.compute()}


def frame_pose(frame, poses: dict) -> np.ndarray | None:
    """The frame's pose by its key (scan number), None for a sequence without poses; a sequence with poses
    that lacks this scan's is an error (mixing the sensor and the world frame would break its tracks)."""
    from sal_ros.core.errors import SensorDataError

    pose = poses.get(frame.key)
    if pose is None and any(sequence_of(k) == sequence_of(frame.key) for k in poses):
        raise SensorDataError(f"no pose for scan {frame.key} (poses.txt shorter than the scans?)")
    return pose



# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=Path, required=True, help="SemanticKITTI sequence folder (velodyne/, "
                        "labels/, poses.txt, calib.txt) or a root with sequences/NN (each one tracked on its own, "
                        "LSTQ pooled as the benchmark pools sequences); instance ids are consistent per sequence")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", type=Path, help="segment with this checkpoint (needs --vocabulary)")
    who.add_argument("--oracle", action="store_true", help="ground truth as the segmentation: the tracker alone")
    parser.add_argument("--vocabulary", type=Path, help="vocabulary yaml for --checkpoint")
    parser.add_argument("--class-map", type=Path, help="yaml {vocabulary class: dataset class}")
    parser.add_argument("--sensor-frame", action="store_true", help="track in the sensor frame (ignore poses.txt)")
    parser.add_argument("--no-tracker", action="store_true", help="score the segmentation's own instance ids "
                        "(the untracked control: ids of one frame unrelated to the next)")
    parser.add_argument("--max-distance", type=float, default=2.0, help="association gate (m), as tracking.max_distance")
    parser.add_argument("--max-misses", type=int, default=3, help="frames a track survives unmatched")
    parser.add_argument("--max-speed", type=float, default=30.0, help="m/s by which a track seen once widens its "
                        "gate per second (its velocity is not known yet); 0: the gate alone")
    parser.add_argument("--max-frames", type=int, help="the first N scans of each sequence")
    parser.add_argument("--min-points", type=int, default=MIN_POINTS,
                        help="a tube counts in a frame with more points than this (the benchmark's 50)")
    parser.add_argument("--s-cls-without-class-0", action="store_true", help="a labelled point predicted as class "
                        "0 does not make class 0 a present class of IoU 0 in S_cls (the benchmark's evaluator does)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for tracking.json, tracking.md, tracks.png")


def main(args: argparse.Namespace) -> int:
    from sal_ros.core.files import atomic_write, write_json
    from sal_ros.core.tracking import TrackerConfig
    from sal_ros.data.datasets import iter_semantickitti, semantickitti_poses
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.model import _load_class_map, build_segmenter

    if args.checkpoint is not None and args.vocabulary is None:
        raise ValueError("--checkpoint needs --vocabulary")
    label_set = get_label_set("semantickitti")
    frames = _first_frames(iter_semantickitti(args.dataset, images=False), args.max_frames)
    poses = {} if args.sensor_frame else semantickitti_poses(args.dataset)
    if args.oracle:
        segment = lambda f: oracle_segmentation(f, label_set)  # noqa: E731
    else:
        segmenter = build_segmenter(args.checkpoint, args.vocabulary, args.device)
        segment = lambda f: segmenter.segment(f.points, f.intensity)  # noqa: E731
    config = TrackerConfig(max_distance=args.max_distance, max_misses=args.max_misses, max_speed=args.max_speed)
    evaluator = LSTQEvaluator(label_set.num_classes, args.min_points, not args.s_cls_without_class_0)
    trajectories: dict = {}
    results = track_and_evaluate(frames, segment, label_set, poses, config, _load_class_map(args.class_map),
                                 progress=True, trajectories=trajectories, evaluator=evaluator,
                                 track=not args.no_tracker)
    pooled = results.pop("all")
    posed = {sequence_of(k) for k in poses}
    frame_of = {seq: "world (poses.txt)" if seq in posed else "sensor" for seq in results}
    summary = {**pooled.to_dict(), "per_sequence": {seq: r.to_dict() for seq, r in results.items()}, "meta": {
        "dataset": str(args.dataset), "segmentation": "ground truth (oracle)" if args.oracle else str(args.checkpoint),
        "tracker": "none (segmentation ids)" if args.no_tracker else "sal_ros Tracker",
        "tracking_frame": " / ".join(sorted(set(frame_of.values()))), "max_distance": args.max_distance,
        "max_misses": args.max_misses, "max_speed": args.max_speed, "min_points": args.min_points,
        "class0_in_s_cls": not args.s_cls_without_class_0}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tracking.json", summary)
    headline = _headline(pooled)
    plot_tracks(trajectories, args.out / "tracks.png", headline)
    rows = "\n".join(f"| {seq} | {100 * r.lstq:.1f} | {100 * r.s_assoc:.1f} | {100 * r.s_cls:.1f} | {r.id_switches} "
                     f"| {r.gt_tubes} | {r.pred_tubes} | {r.frames} | {frame_of[seq]} |" for seq, r in results.items())
    atomic_write(args.out / "tracking.md", "# Tracking evaluation\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in summary["meta"].items()) + f"\n\n{headline}\n\n"
        "| sequence | LSTQ | S_assoc | S_cls | id switches | gt tubes | predicted | frames | tracking frame |\n"
        f"|---|---|---|---|---|---|---|---|---|\n{rows}\n\n![tracks](tracks.png)\n")
    print(f"{headline} -> {args.out / 'tracking.json'}")
    return 0


def _first_frames(frames, limit: int | None):
    """The first ``limit`` frames of each sequence (frames arrive sequence by sequence, in scan order)."""
    seen: dict[str, int] = {}
    for frame in frames:
        seq = sequence_of(frame.key)
        seen[seq] = seen.get(seq, 0) + 1
        if limit is None or seen[seq] <= limit:
            yield frame


def _headline(r: LSTQResult) -> str:
    return (f"LSTQ {100 * r.lstq:.1f} (S_assoc {100 * r.s_assoc:.1f}, S_cls {100 * r.s_cls:.1f}), "
            f"{r.id_switches} id switches, {r.gt_tubes} ground-truth tubes, {r.pred_tubes} predicted, "
            f"{r.frames} frames, {r.sequences} sequence{'s' if r.sequences != 1 else ''}")


def plot_tracks(trajectories: dict, path: Path, title: str) -> Path:
    """Bird's-eye PNG of the tracks, one panel per sequence: each track's centres over the frames, one colour
    per track id, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.core.palette import track_color
    from sal_ros.eval.report import atomic_savefig

    sequences = sorted({seq for seq, _ in trajectories}) or [""]
    cols = min(len(sequences), 4)
    rows = math.ceil(len(sequences) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
    for ax, seq in zip(axes.flat, sequences):
        for (s, track_id), steps in sorted(trajectories.items()):
            if s != seq:
                continue
            xy = np.array([(x, y) for _, x, y in steps])
            color = np.array(track_color(track_id)) / 255.0
            ax.plot(xy[:, 0], xy[:, 1], "-o", color=color, markersize=3, linewidth=1)
            ax.annotate(f"#{track_id}", xy[-1], fontsize=7, color=color)
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_title(f"sequence {seq}" if seq else "tracks", fontsize=9)
    for ax in list(axes.flat)[len(sequences):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)
