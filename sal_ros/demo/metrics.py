"""The demo's numbers: per run, class-agnostic PQ of pseudo-labels and student against ground truth, and of the
student against its own pseudo-labels (the distillation itself)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sal_ros.demo.settings import LABEL_MIN_POINTS, DemoConfig, mask_statement, weights_statement


@dataclass
class RunFrame:
    """One run's view of a scan: its pseudo-labels and what its student answered through the node."""

    pseudo: np.ndarray  # pseudo-instance per point (0 = none)
    in_frustum: np.ndarray  # points a camera sees (where pseudo-labels can exist)
    label: np.ndarray  # student label per point (0 = none)
    instance: np.ndarray
    score: np.ndarray


@dataclass
class FrameResult:
    stamp_ns: int
    points: np.ndarray
    intensity: np.ndarray | None
    gt_cls: np.ndarray  # SemanticKITTI 19-class id per point (0 = ignore)
    gt_seg: np.ndarray  # raw panoptic label (segment id)
    camera: Any  # the recorded CameraView (image, model, T) or None
    runs: dict[str, RunFrame] = field(default_factory=dict)  # run name -> its labels, for runs that answered


def gather(frames: Path, gt: dict[int, np.ndarray], runs: dict[str, tuple[Path, dict]]) -> list[FrameResult]:
    """Join, per cloud stamp, the recorded frame, the ground truth and per run (``name -> (pseudo-label folder,
    node outputs by stamp)``) its pseudo-labels and labeled cloud. Frames no run answered are left out."""
    from sal_ros.data.framestore import FrameStore
    from sal_ros.data.labels import get_label_set
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path

    label_set = get_label_set("semantickitti")
    store = FrameStore(frames)
    results = []
    for key in store.keys():
        frame = store.load(key)
        if frame.stamp_ns not in gt:
            continue
        gt_cls, gt_seg = label_set.split(gt[frame.stamp_ns])
        result = FrameResult(frame.stamp_ns, frame.points, frame.intensity, gt_cls, gt_seg,
                             next(iter(frame.cameras.values()), None))
        for name, (labels, outputs) in runs.items():
            out = outputs.get(frame.stamp_ns)
            if out is None:
                continue
            xyz = np.stack([out["x"], out["y"], out["z"]], 1)
            if not np.array_equal(xyz, frame.points, equal_nan=True):
                raise RuntimeError(f"{name}: labeled cloud at {frame.stamp_ns} does not hold the recorded points "
                                   "in order")
            pl = load_pseudolabels(pseudolabel_path(labels, key), frame.num_points)
            result.runs[name] = RunFrame(pl.instance.astype(np.int64), pl.in_frustum, out["label"].astype(np.int64),
                                         out["instance"].astype(np.int64), out["score"])
        if result.runs:
            results.append(result)
    return results


def agnostic_pq(results: list[FrameResult], run: str, which: str, region: str) -> dict:
    """Class-agnostic PQ vs ground truth over the frames ``run`` answered: ``which`` is "pseudo" or "student",
    ``region`` is "frustum" (points the camera sees) or "scan" (all points)."""
    from sal_ros.eval.panoptic import PanopticEvaluator

    ev = PanopticEvaluator(1, min_points=LABEL_MIN_POINTS)
    for r in results:
        if run not in r.runs:
            continue
        f = r.runs[run]
        keep = f.in_frustum if region == "frustum" else np.ones(len(r.points), bool)
        pred_sem = np.zeros_like(f.pseudo) if which == "pseudo" else f.label
        pred_inst = f.pseudo if which == "pseudo" else f.instance
        ev.add_agnostic(pred_sem[keep], pred_inst[keep], r.gt_cls[keep], r.gt_seg[keep])
    return ev.compute().agnostic


def student_vs_pseudo(results: list[FrameResult], run: str) -> dict:
    """How well the student reproduces its teacher: class-agnostic PQ vs the pseudo-labels where they exist."""
    from sal_ros.eval.panoptic import PanopticEvaluator

    ev = PanopticEvaluator(1, min_points=LABEL_MIN_POINTS)
    for r in results:
        if run not in r.runs:
            continue
        f = r.runs[run]
        keep = f.in_frustum
        ev.add_agnostic(f.label[keep], f.instance[keep], (f.pseudo[keep] != 0).astype(np.int64), f.pseudo[keep])
    return ev.compute().agnostic


def pq_row(d: dict) -> dict:
    """Percent, one decimal, and the integer counts."""
    return {k: round(100 * d[k], 1) for k in ("pq", "sq", "rq")} | {k: int(d[k]) for k in ("tp", "fp", "fn")}


GROUND_TRUTH_ROWS = {  # row name -> (which, region)
    "pseudo-labels (camera frustum)": ("pseudo", "frustum"),
    "student (camera frustum)": ("student", "frustum"),
    "student (full 360-degree scan)": ("student", "scan"),
}


def run_metrics(results: list[FrameResult], run: str, online: dict, train_s: float, checkpoint: Path,
                cfg: DemoConfig) -> dict:
    return {
        "masks": mask_statement(cfg, run),
        "frames": sum(run in r.runs for r in results),
        "class_agnostic_pq_vs_ground_truth": {
            name: pq_row(agnostic_pq(results, run, which, region))
            for name, (which, region) in GROUND_TRUTH_ROWS.items()},
        "student_vs_pseudo_labels": pq_row(student_vs_pseudo(results, run)),
        "online": online,
        "train_wall_s": round(train_s, 1),
        "checkpoint": str(checkpoint),
    }


def demo_metrics(results: list[FrameResult], runs: dict[str, dict], wall_s: float, cfg: DemoConfig) -> dict:
    """metrics.json: ``runs`` maps run name -> its run_metrics, in the order the report shows them."""
    return {
        "weights": weights_statement(cfg),
        "frames": len(results),
        "runs": runs,
        "wall_s": round(wall_s, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
