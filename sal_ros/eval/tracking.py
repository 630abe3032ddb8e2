"""Evaluation over time: LSTQ (4D panoptic segmentation, SemanticKITTI) and id switches of the tracker.

LSTQ = sqrt(S_assoc x S_cls) (Aygün et al., "4D Panoptic LiDAR Segmentation", CVPR 2021):

- S_cls: mean IoU over the classes present (semantic, all points of the sequence, ignore points removed; the
  same present-classes mean as ``eval.panoptic``);
- S_assoc = 1/|T| sum over ground-truth tubes t of 1/|t| sum over predicted tubes p overlapping t of
  TPA(p, t) x IoU(p, t), where a tube is one instance id over the whole sequence (its points in every frame),
  TPA(p, t) = |p n t| and IoU(p, t) = TPA / (|p| + |t| - TPA). Ground-truth tubes are the instance ids > 0 of
  thing classes; predicted tubes the instance ids > 0. So S_assoc is 1 only when every object keeps one id for
  the whole sequence and no id spans two objects, whatever its class.

Id switches (CLEAR-MOT style): per frame, a ground-truth instance is matched to the predicted instance with IoU
> 0.5 (unique); a switch is counted when a ground-truth tube matched in an earlier frame is matched to another
predicted id. Counted on the points kept for scoring.

``sal-ros eval tracking`` runs a sequence through the segmenter (a checkpoint) or takes its ground truth as the
segmentation (``--oracle``: the tracker alone is evaluated), tracks in the fixed frame of the sequence poses, and
writes tracking.json / tracking.md.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.eval.semantic import ConfusionMatrix, check_same_length

_SHIFT = np.int64(1) << np.int64(32)


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

    def to_dict(self) -> dict:
        return {"lstq": self.lstq, "s_assoc": self.s_assoc, "s_cls": self.s_cls, "id_switches": self.id_switches,
                "gt_tubes": self.gt_tubes, "pred_tubes": self.pred_tubes, "frames": self.frames,
                "iou_per_class": self.iou_per_class}


class LSTQEvaluator:
    """Accumulates tubes over a sequence, one ``add`` per frame in time order.

    Class ids 0..C (0 = ignore in the ground truth), instance ids any non-negative integers that name the same
    object across frames (0 = no instance). ``things`` are the ground-truth classes whose instances form tubes.
    """

    def __init__(self, num_classes: int, things=()) -> None:
        self.num_classes = num_classes
        self.thing_mask = np.zeros(num_classes + 1, bool)
        self.thing_mask[list(things)] = True
        self.confusion = ConfusionMatrix(num_classes)
        self._pairs: dict[int, int] = {}  # pred id << 32 | gt id -> points in both
        self._pred_size: dict[int, int] = {}
        self._gt_size: dict[int, int] = {}
        self._last_match: dict[int, int] = {}  # gt id -> pred id it was matched to last
        self.id_switches = 0
        self.frames = 0

    def add(self, pred_sem: np.ndarray, pred_inst: np.ndarray, gt_sem: np.ndarray, gt_inst: np.ndarray) -> None:
        check_same_length(pred_sem=pred_sem, pred_inst=pred_inst, gt_sem=gt_sem, gt_inst=gt_inst)
        pred_sem, gt_sem = np.asarray(pred_sem, np.int64), np.asarray(gt_sem, np.int64)
        self.confusion.add(pred_sem, gt_sem)
        keep = gt_sem != 0
        p = np.asarray(pred_inst, np.int64)[keep]
        g = np.where(self.thing_mask[gt_sem[keep]], np.asarray(gt_inst, np.int64)[keep], 0)
        _accumulate(self._pred_size, *np.unique(p[p > 0], return_counts=True))
        _accumulate(self._gt_size, *np.unique(g[g > 0], return_counts=True))
        both = (p > 0) & (g > 0)
        keys, inter = np.unique(p[both] * _SHIFT + g[both], return_counts=True)
        _accumulate(self._pairs, keys, inter)
        self._count_switches(p, g, keys, inter)
        self.frames += 1

    def _count_switches(self, p: np.ndarray, g: np.ndarray, keys: np.ndarray, inter: np.ndarray) -> None:
        pid, gid = keys // _SHIFT, keys % _SHIFT
        p_ids, p_counts = np.unique(p[p > 0], return_counts=True)
        g_ids, g_counts = np.unique(g[g > 0], return_counts=True)
        p_size = p_counts[np.searchsorted(p_ids, pid)] if pid.size else pid
        g_size = g_counts[np.searchsorted(g_ids, gid)] if gid.size else gid
        iou = inter / np.maximum(p_size + g_size - inter, 1)
        for pred, gt in zip(pid[iou > 0.5].tolist(), gid[iou > 0.5].tolist()):
            last = self._last_match.get(gt)
            if last is not None and last != pred:
                self.id_switches += 1
            self._last_match[gt] = pred

    def compute(self) -> LSTQResult:
        iou = self.confusion.iou()[1:]
        present = np.isfinite(iou)
        s_cls = float(iou[present].mean()) if present.any() else 0.0
        per_gt: dict[int, float] = {}
        for key, tpa in self._pairs.items():
            pred, gt = key >> 32, key & 0xFFFFFFFF
            pair_iou = tpa / (self._pred_size[pred] + self._gt_size[gt] - tpa)
            per_gt[gt] = per_gt.get(gt, 0.0) + tpa * pair_iou
        s_assoc = (sum(per_gt.get(gt, 0.0) / size for gt, size in self._gt_size.items()) / len(self._gt_size)
                   if self._gt_size else 0.0)
        return LSTQResult(lstq=math.sqrt(s_assoc * s_cls), s_assoc=s_assoc, s_cls=s_cls,
                          id_switches=self.id_switches, gt_tubes=len(self._gt_size), pred_tubes=len(self._pred_size),
                          frames=self.frames, iou_per_class=[None if not np.isfinite(v) else float(v) for v in iou])


def _accumulate(store: dict[int, int], keys: np.ndarray, counts: np.ndarray) -> None:
    for k, c in zip(keys.tolist(), counts.tolist()):
        store[k] = store.get(k, 0) + c


# ---------------------------------------------------------------------------------------------- sequences


def semantickitti_lidar_poses(seq_dir: str | Path) -> np.ndarray | None:
    """(F, 4, 4) velodyne -> world poses of a SemanticKITTI sequence (``inv(Tr) @ pose_cam0 @ Tr``), or None
    without poses.txt."""
    seq_dir = Path(seq_dir)
    poses_file, calib_file = seq_dir / "poses.txt", seq_dir / "calib.txt"
    if not poses_file.exists() or not calib_file.exists():
        return None
    tr = None
    for line in calib_file.read_text().splitlines():
        if line.startswith("Tr:"):
            tr = np.vstack([np.array(line.split()[1:], np.float64).reshape(3, 4), [0, 0, 0, 1]])
    if tr is None:
        raise ValueError(f"{calib_file}: no Tr line")
    rows = np.loadtxt(poses_file, dtype=np.float64, ndmin=2)
    cam = np.tile(np.eye(4), (len(rows), 1, 1))
    cam[:, :3, :] = rows.reshape(-1, 3, 4)
    return np.linalg.inv(tr) @ cam @ tr


def oracle_segmentation(frame, label_set):
    """The frame's ground truth as a Segmentation (dataset classes as the vocabulary, instances numbered 1..K
    in a per-frame order), for evaluating the tracker alone."""
    from sal_ros.core.types import Segmentation
    from sal_ros.core.panoptic import instance_summaries

    sem, _ = label_set.split(frame.gt_labels)
    raw_inst = np.asarray(frame.gt_labels, np.int64) >> 16
    thing = label_set.thing_mask[sem] & (raw_inst > 0)
    ids, per_frame = np.unique(raw_inst[thing], return_inverse=True)
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


def track_and_evaluate(frames, segment, label_set, poses=None, config=None, class_map=None,
                       progress: bool = False, trajectories: dict | None = None) -> LSTQResult:
    """Segment each frame (``segment(frame) -> Segmentation``), track (in the poses' fixed frame when given,
    one 4x4 per frame), and score LSTQ and id switches against the frames' ground truth. ``trajectories``
    (a dict) receives per track id its box centres in the tracking frame, frame by frame."""
    from tqdm import tqdm

    from sal_ros.core.tracking import Tracker, apply_tracks
    from sal_ros.eval.labels import vocabulary_lut
    from sal_ros.eval.offline import to_dataset_classes

    tracker = Tracker(config)
    evaluator = LSTQEvaluator(label_set.num_classes, label_set.things)
    lut = None
    for i, frame in enumerate(tqdm(frames, desc="track", unit="frame", disable=not progress)):
        if frame.gt_labels is None:
            raise ValueError(f"frame {frame.key or i} has no ground truth")
        seg = segment(frame)
        pose = None if poses is None else poses[i]
        apply_tracks(seg, tracker.update(seg.instances, frame.stamp_ns, pose, seg.vocabulary_version))
        if trajectories is not None:
            for inst in seg.instances:
                c = np.asarray(inst.box.center, np.float64)
                c = c if pose is None else pose[:3, :3] @ c + pose[:3, 3]
                trajectories.setdefault(inst.instance_id, []).append((i, float(c[0]), float(c[1])))
        if lut is None:
            lut = vocabulary_lut(seg.class_names, label_set, class_map)
        pred_sem, pred_inst = to_dataset_classes(seg, label_set, lut)
        gt_sem, _ = label_set.split(frame.gt_labels)
        gt_inst = np.asarray(frame.gt_labels, np.int64) >> 16
        evaluator.add(pred_sem, pred_inst, gt_sem, gt_inst)
    return evaluator.compute()


# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=Path, required=True, help="SemanticKITTI sequence folder (velodyne/, "
                        "labels/, poses.txt, calib.txt); instance ids of its labels are consistent over the sequence")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", type=Path, help="segment with this checkpoint (needs --vocabulary)")
    who.add_argument("--oracle", action="store_true", help="ground truth as the segmentation: the tracker alone")
    parser.add_argument("--vocabulary", type=Path, help="vocabulary yaml for --checkpoint")
    parser.add_argument("--class-map", type=Path, help="yaml {vocabulary class: dataset class}")
    parser.add_argument("--sensor-frame", action="store_true", help="track in the sensor frame (ignore poses.txt)")
    parser.add_argument("--max-distance", type=float, default=2.0, help="association gate (m), as tracking.max_distance")
    parser.add_argument("--max-misses", type=int, default=3, help="frames a track survives unmatched")
    parser.add_argument("--max-frames", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder for tracking.json and tracking.md")


def main(args: argparse.Namespace) -> int:
    from sal_ros.core.files import atomic_write, write_json
    from sal_ros.core.tracking import TrackerConfig
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.eval.model import _load_class_map, build_segmenter
    from sal_ros.eval.labels import get_label_set

    if args.checkpoint is not None and args.vocabulary is None:
        raise ValueError("--checkpoint needs --vocabulary")
    label_set = get_label_set("semantickitti")
    frames = load_semantickitti(args.dataset, images=False)[: args.max_frames]
    poses = None if args.sensor_frame else semantickitti_lidar_poses(args.dataset)
    if poses is not None:
        poses = poses[: len(frames)]
    if args.oracle:
        segment = lambda f: oracle_segmentation(f, label_set)  # noqa: E731
    else:
        segmenter = build_segmenter(args.checkpoint, args.vocabulary, args.device)
        segment = lambda f: segmenter.segment(f.points, f.intensity)  # noqa: E731
    config = TrackerConfig(max_distance=args.max_distance, max_misses=args.max_misses)
    trajectories: dict = {}
    result = track_and_evaluate(frames, segment, label_set, poses, config, _load_class_map(args.class_map),
                                progress=True, trajectories=trajectories)
    summary = {**result.to_dict(), "meta": {
        "dataset": str(args.dataset), "segmentation": "ground truth (oracle)" if args.oracle else str(args.checkpoint),
        "tracking_frame": "sensor" if poses is None else "world (poses.txt)", "max_distance": args.max_distance,
        "max_misses": args.max_misses}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tracking.json", summary)
    headline = (f"LSTQ {100 * result.lstq:.1f} (S_assoc {100 * result.s_assoc:.1f}, S_cls {100 * result.s_cls:.1f}), "
                f"{result.id_switches} id switches, {result.gt_tubes} ground-truth tubes, {result.pred_tubes} "
                f"predicted, {result.frames} frames")
    plot_tracks(trajectories, args.out / "tracks.png", headline)
    atomic_write(args.out / "tracking.md", "# Tracking evaluation\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in summary["meta"].items()) + f"\n\n{headline}\n\n![tracks](tracks.png)\n")
    print(f"{headline} -> {args.out / 'tracking.json'}")
    return 0



def plot_tracks(trajectories: dict, path: Path, title: str) -> Path:
    """Bird's-eye PNG of the tracks: each track's centres over the frames, one colour per track id, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.eval.report import atomic_savefig
    from sal_ros.core.palette import track_color

    fig, ax = plt.subplots(figsize=(7, 7))
    for track_id, steps in sorted(trajectories.items()):
        xy = np.array([(x, y) for _, x, y in steps])
        color = np.array(track_color(track_id)) / 255.0
        ax.plot(xy[:, 0], xy[:, 1], "-o", color=color, markersize=3, linewidth=1)
        ax.annotate(f"#{track_id}", xy[-1], fontsize=7, color=color)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title, fontsize=8)
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)
