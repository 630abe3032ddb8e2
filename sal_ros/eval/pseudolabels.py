"""Instance pseudo-label quality against SemanticKITTI ground truth (``sal-ros eval pseudolabels``): which points
are scored, the counts per configuration, the scan loop, the table, the figure and the report.

Only points that project into a camera are scored (pseudo-labels exist nowhere else), ignore-class points are
removed, and segments follow semantic-kitti-api (the whole raw label is a ground-truth segment, IoU > 0.5
matches, unmatched segments count with >= ``min_points`` points). Reported, in percent:

- ``PQ/SQ/RQ all``: class-agnostic over every ground-truth segment (things and stuff), SAL's pseudo-label metric;
- ``PQ/SQ/RQ things``: ground-truth thing instances only; a pseudo-instance competes as a thing when most of its
  points are thing points (an oracle thing/stuff split: the labels carry no classes);
- ``coverage``: fraction of scored points with a pseudo-label, and of thing points.

The labels come from the caller (``label_frame``): files a ``sal-ros pseudolabel`` run wrote, or the labelling
ablation of sal_ros.pseudolabel.evaluate, which runs the labeller.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.core.camera import project_view
from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write, json_safe, write_json
from sal_ros.eval.panoptic import SegmentCounts, match_segments

log = logging.getLogger(__name__)


@dataclass
class PseudoLabelScore:
    """Accumulates one configuration's counts over scans."""

    all: SegmentCounts = field(default_factory=lambda: SegmentCounts.zeros(1))
    things: SegmentCounts = field(default_factory=lambda: SegmentCounts.zeros(1))
    points: int = 0
    labelled: int = 0
    thing_points: int = 0
    thing_labelled: int = 0
    instances: int = 0
    scans: int = 0

    def add(self, instance: np.ndarray, gt_cls: np.ndarray, gt_seg: np.ndarray, thing: np.ndarray,
            min_points: int) -> None:
        """One scan, restricted to scored points: pseudo-instance ids, GT class ids, GT segment ids, thing mask."""
        inst = np.asarray(instance, np.int64)
        one = np.ones(inst.size, np.int64)
        self.all += match_segments(one, inst, one, gt_seg, 1, min_points, pred_valid=inst > 0)
        thing_frac = np.bincount(inst, weights=thing, minlength=1) / np.maximum(np.bincount(inst, minlength=1), 1)
        pred_thing = (thing_frac[inst] > 0.5).astype(np.int64)
        self.things += match_segments(pred_thing, inst, thing.astype(np.int64), gt_seg, 1, min_points,
                                      pred_valid=inst > 0)
        self.points += inst.size
        self.labelled += int((inst > 0).sum())
        self.thing_points += int(thing.sum())
        self.thing_labelled += int(((inst > 0) & thing).sum())
        self.instances += int(np.unique(inst[inst > 0]).size)
        self.scans += 1

    def summary(self) -> dict:
        out = {}
        for name, counts in (("all", self.all), ("things", self.things)):
            pq, sq, rq = (float(q[1]) for q in counts.quality())
            out.update({f"pq_{name}": 100 * pq, f"sq_{name}": 100 * sq, f"rq_{name}": 100 * rq,
                        f"tp_{name}": int(counts.tp[1]), f"fp_{name}": int(counts.fp[1]),
                        f"fn_{name}": int(counts.fn[1])})
        out["coverage"] = 100 * self.labelled / max(self.points, 1)
        out["thing_coverage"] = 100 * self.thing_labelled / max(self.thing_points, 1)
        out["instances_per_scan"] = self.instances / max(self.scans, 1)
        out["scans"] = self.scans
        return out


def scored_points(frame, label_set, min_depth: float,
                  full_scan: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask of scored points, GT class, GT segment, thing) for one frame; the last three over scored points.
    Scored: the labelled points the cameras see, or with ``full_scan`` every labelled point."""
    if frame.gt_labels is None:
        raise SensorDataError(f"frame {frame.key}: no ground-truth labels to evaluate against")
    in_cam = np.full(frame.num_points, full_scan)
    for view in frame.cameras.values():
        in_cam[project_view(frame.points, view, min_depth)[0]] = True
    cls, seg = label_set.split(frame.gt_labels)
    keep = in_cam & (cls > 0)
    return keep, cls[keep], seg[keep], label_set.thing_mask[cls[keep]]


def ground_scores(predicted: np.ndarray, raw_labels: np.ndarray, label_set, classes) -> np.ndarray:
    """(3,) int64 true positive, false positive, false negative ground points against SemanticKITTI-style raw
    labels (ignore-class points left out); ground = the label set's ``classes`` (the geometric teacher's
    ``GROUND_CLASSES``)."""
    cls, _ = label_set.split(raw_labels)
    gt = np.isin(cls, [label_set.class_id(c) for c in classes])
    valid, pred = cls > 0, np.asarray(predicted, bool)
    return np.array([(pred & gt).sum(), (pred & ~gt & valid).sum(), (~pred & gt).sum()], np.int64)


def load_complete(source, key: str):
    """(frame, "") or (None, why): a frame that cannot be read, or lacks a camera image (missing or unreadable
    file), is not scored, since its score would measure the broken file, not the pseudo-labels."""
    try:
        frame = source.load(key)
    except (SensorDataError, OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if frame.missing_cameras:
        return None, "; ".join(f"camera {c} left out: {frame.camera_problems.get(c, 'no image')}"
                               for c in frame.missing_cameras)
    return frame, ""


def score_frames(source, keys: list[str], configs: list[tuple[str, str]],
                 label_frame: Callable[[object], dict[tuple[str, str], np.ndarray]], label_set, min_depth: float,
                 full_scan: bool = False, progress: bool = True) -> tuple[list[dict], dict[str, str]]:
    """Score every configuration (``(masks, lifting)``) on the frames of ``keys``; ``label_frame(frame)`` gives
    each configuration's point instance ids (0 = none) for a frame. Returns one row per configuration and the
    frames not scored, with why (named and counted in the report)."""
    scores = {c: PseudoLabelScore() for c in configs}
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="eval pseudolabels", unit="frame")
    skipped: dict[str, str] = {}
    for key in it:
        frame, why = load_complete(source, key)
        if frame is None:
            skipped[key] = why
            log.warning("frame %s not scored: %s", key, why)
            continue
        keep, gt_cls, gt_seg, thing = scored_points(frame, label_set, min_depth, full_scan)
        for config, instance in label_frame(frame).items():
            scores[config].add(instance[keep], gt_cls, gt_seg, thing, label_set.min_points)
    return [{"masks": c[0], "lifting": c[1], **s.summary()} for c, s in scores.items()], skipped


def markdown_table(result: dict) -> str:
    head = ("| masks | lifting | PQ all | SQ all | RQ all | PQ things | SQ things | RQ things | coverage % "
            "| thing coverage % | instances/scan |")
    lines = [head, "|" + "---|" * 11]
    columns = ("pq_all", "sq_all", "rq_all", "pq_things", "sq_things", "rq_things", "coverage", "thing_coverage",
               "instances_per_scan")
    for r in result["rows"]:
        values = (_cell(r[c]) for c in columns)
        lines.append(f"| {r['masks']} | {r['lifting']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    """A score as the table shows it; n/a where there was nothing to score (NaN, or null in metrics.json)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['masks']}\n{r['lifting']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    for k, (key, name) in enumerate((("pq_all", "PQ all"), ("pq_things", "PQ things"), ("coverage", "coverage"))):
        ax.bar(x + (k - 1) * 0.27, [np.nan if r[key] is None else r[key] for r in rows], 0.27, label=name)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("%")
    ax.set_title(f"Pseudo-labels vs ground truth ({result['meta']['frames']} scans, camera-visible points)")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def report(result: dict, out: Path | None) -> int:
    """Print the table (and the geometric ground's precision / recall) and the JSON, name every frame not scored
    on stderr, write metrics.json, table.md and pseudolabel_eval.png into ``out``; returns the exit status (1: no
    frame scored, 3: some frames not scored)."""
    result = json_safe(result)  # a score over no segments is 0/0: null in JSON, n/a in the table
    table = markdown_table(result)
    print(table)
    if "ground" in result["meta"]:
        g = result["meta"]["ground"]
        print(f"geometric ground vs {', '.join(g['classes'])}: precision {g['precision']:.1f} %, "
              f"recall {g['recall']:.1f} %")
    print(json.dumps(result, indent=1, allow_nan=False))
    skipped = result["meta"]["frames_skipped"]
    status = 1 if not result["meta"]["frames"] else 3 if skipped else 0
    for key, why in skipped.items():
        print(f"sal-ros eval pseudolabels: frame {key} not scored: {why}", file=sys.stderr)
    if skipped:
        print(f"sal-ros eval pseudolabels: {len(skipped)} frame(s) not scored, {result['meta']['frames']} scored; "
              f"exit status {status}", file=sys.stderr)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", result)
        atomic_write(out / "table.md", table + "\n")
        plot(result, out / "pseudolabel_eval.png")
    return status
