"""Semantic segmentation metrics: a confusion matrix accumulated over scans, IoU per class and mIoU."""
from __future__ import annotations

import numpy as np

from sal_ros.core.errors import SensorDataError


def check_same_length(**arrays: np.ndarray) -> int:
    sizes = {name: np.asarray(a).shape for name, a in arrays.items()}
    n = {s[0] if len(s) == 1 else -1 for s in sizes.values()}
    if len(n) != 1 or -1 in n:
        raise SensorDataError(f"per-point arrays must be 1-D and equally long, got {sizes}")
    return n.pop()


class ConfusionMatrix:
    """``conf[pred, gt]`` over classes 0..C; ground-truth class ``ignore`` (0) is left out of every metric.

    A prediction of class 0 on a labelled point counts as a false negative of the true class, as in
    semantic-kitti-api.
    """

    def __init__(self, num_classes: int, ignore: int = 0) -> None:
        self.num_classes = num_classes
        self.ignore = ignore
        self.conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        check_same_length(pred=pred, gt=gt)
        pred = np.asarray(pred, np.int64)
        gt = np.asarray(gt, np.int64)
        size = self.num_classes + 1
        if pred.size and (pred.min() < 0 or pred.max() >= size or gt.min() < 0 or gt.max() >= size):
            raise SensorDataError(f"class ids must lie in 0..{self.num_classes}")
        self.conf += np.bincount(pred * size + gt, minlength=size * size).reshape(size, size)

    def iou(self) -> np.ndarray:
        """(C + 1,) IoU per class id (index 0 and classes never seen nor predicted are NaN)."""
        conf = self.conf.copy()
        conf[:, self.ignore] = 0
        tp = np.diag(conf).astype(np.float64)
        union = conf.sum(0) + conf.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        iou[self.ignore] = np.nan
        return iou

    def miou(self, present_only: bool = False) -> float:
        """Mean IoU over classes 1..C. semantic-kitti-api's convention by default: a class absent from ground
        truth and predictions scores 0; ``present_only`` leaves such classes out."""
        iou = np.delete(self.iou(), self.ignore)
        if present_only:
            return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
        return float(np.nan_to_num(iou, nan=0.0).mean()) if iou.size else float("nan")

    def iou_percent(self, class_names) -> dict[str, float | None]:
        """IoU per class name (classes 1..C) in percent, rounded to 0.01; None for a class never seen nor
        predicted (null in a report's JSON)."""
        return {n: None if not np.isfinite(v) else round(100 * float(v), 2)
                for n, v in zip(class_names, self.iou()[1:])}

    def accuracy(self) -> float:
        conf = self.conf.copy()
        conf[:, self.ignore] = 0
        total = conf.sum()
        return float(np.trace(conf) / total) if total else float("nan")
