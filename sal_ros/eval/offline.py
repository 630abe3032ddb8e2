"""Offline evaluation of segmentations against dataset ground truth (zero-shot: vocabulary -> dataset classes)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from sal_ros.core.camera import in_camera_frustum
from sal_ros.core.errors import SensorDataError
from sal_ros.core.types import Frame, Segmentation
from sal_ros.data.labels import LabelSet, vocabulary_lut
from sal_ros.eval.panoptic import PanopticEvaluator


def to_dataset_classes(seg: Segmentation, label_set: LabelSet, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segmentation (vocabulary labels) -> (dataset class id, instance id) per point.

    Points of dataset stuff classes get instance 0: several vocabulary classes may map to one stuff class
    ("road", "street") and the benchmark wants one segment per stuff class.
    """
    label = np.asarray(seg.label, np.int64)
    if label.size and label.max() >= lut.size:
        raise SensorDataError(f"segmentation label {label.max()} outside the vocabulary ({lut.size - 1} classes)")
    sem = lut[label]
    inst = np.where(label_set.thing_mask[sem], np.asarray(seg.instance, np.int64), 0)
    return sem, inst


def add_frame(evaluator: PanopticEvaluator, seg: Segmentation, gt_labels: np.ndarray, label_set: LabelSet,
              lut: np.ndarray, keep: np.ndarray | None = None) -> None:
    """Score one frame; ``keep`` (N,) bool restricts it to some points (e.g. those a camera sees)."""
    if len(seg.label) != len(gt_labels):
        raise SensorDataError(f"segmentation has {len(seg.label)} points, ground truth {len(gt_labels)}")
    pred_sem, pred_inst = to_dataset_classes(seg, label_set, lut)
    gt_sem, gt_seg = label_set.split(gt_labels)
    if keep is not None:
        pred_sem, pred_inst, gt_sem, gt_seg = pred_sem[keep], pred_inst[keep], gt_sem[keep], gt_seg[keep]
    evaluator.add(pred_sem, pred_inst, gt_sem, gt_seg)


def evaluate_frames(segment: Callable[[Frame], Segmentation], frames: Iterable[Frame], label_set: LabelSet,
                    class_map: dict[str, str] | None = None, progress: bool = True,
                    max_frames: int | None = None, frustum_only: bool = False) -> tuple[PanopticEvaluator, dict]:
    """Run ``segment`` on every frame with ground truth and accumulate the metrics (on the points some camera
    sees when ``frustum_only``: where camera pseudo-labels, and so a student trained on them, can be right).

    Returns the evaluator and run statistics (frames, median / mean segmentation time in ms).
    """
    from tqdm import tqdm

    evaluator = PanopticEvaluator.for_label_set(label_set)
    lut, times, skipped = None, [], 0
    for i, frame in enumerate(tqdm(frames, desc="eval", unit="frame", disable=not progress)):
        if max_frames is not None and i >= max_frames:
            break
        if frame.gt_labels is None:
            skipped += 1
            continue
        t0 = time.perf_counter()
        seg = segment(frame)
        times.append(1000 * (time.perf_counter() - t0))
        if lut is None:
            lut = vocabulary_lut(seg.class_names, label_set, class_map)
        add_frame(evaluator, seg, frame.gt_labels, label_set, lut, in_camera_frustum(frame) if frustum_only else None)
    if not times:
        raise SensorDataError("no frame with ground-truth labels to evaluate"
                              + (f" ({skipped} frames without labels)" if skipped else ""))
    stats = {"frames": len(times), "frames_without_labels": skipped,
             "segment_ms_median": float(np.median(times)), "segment_ms_mean": float(np.mean(times)),
             "vocabulary_to_dataset": {name: (label_set.class_names[c - 1] if c else None)
                                       for name, c in zip(seg.class_names, lut[1:])}}
    return evaluator, stats
