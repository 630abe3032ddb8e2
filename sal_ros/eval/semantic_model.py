"""A semantic model (``objective: semantic``) against real labels, against the labels it was trained on and on
the points that had no training label (``sal-ros eval semantic``, whose command is sal_ros.train.evaluate: it
rebuilds the training scans): mIoU per split, the summary line, per_class.png and the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sal_ros.data.labels import vocabulary_lut
from sal_ros.eval.report import atomic_savefig, write_result
from sal_ros.eval.confusion import ConfusionMatrix


def evaluate_semantic_model(model, scans, label_set, frustum_only: bool = True) -> dict:
    """mIoU of a semantic model against the real labels and against its training labels (pseudo-labels, or the
    labelled fraction), and on the points that had no training label (SAM2-AMML's split). A scan has ``points``,
    ``intensity``, ``in_frustum``, ``label`` (training label, 0 = none, k = the model's class k - 1) and ``gt``
    (dataset class ids, or None), as the training scans of sal_ros.train.semantic_objective do."""
    lut = vocabulary_lut(model.class_names, label_set)
    c = label_set.num_classes
    real, pseudo, unlabelled = ConfusionMatrix(c), ConfusionMatrix(c), ConfusionMatrix(c)
    model.eval()
    with torch.inference_mode():
        for s in scans:
            keep = s.in_frustum if frustum_only else np.ones(len(s.points), bool)
            pred = model(torch.from_numpy(s.points[keep]), torch.from_numpy(s.intensity[keep]))[0].argmax(-1).numpy()
            pred = lut[pred + 1]
            if s.gt is not None:
                real.add(pred, s.gt[keep])
                none = s.label[keep] == 0
                unlabelled.add(pred[none], s.gt[keep][none])
            pseudo.add(pred, lut[s.label[keep]])
    names = label_set.class_names
    # semantic-kitti-api's mean (a class absent from ground truth and predictions scores 0); *_present: the mean
    # over the classes present, the readable one on a few scans
    return {"miou_real": 100 * real.miou(), "miou_pseudo": 100 * pseudo.miou(),
            "miou_unlabelled": 100 * unlabelled.miou(), "acc_real": 100 * real.accuracy(),
            "miou_real_present": 100 * real.miou(present_only=True),
            "miou_pseudo_present": 100 * pseudo.miou(present_only=True),
            "miou_unlabelled_present": 100 * unlabelled.miou(present_only=True),
            "iou_real": real.iou_percent(names), "iou_pseudo": pseudo.iou_percent(names)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["iou_real"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    for k, key in enumerate(("iou_real", "iou_pseudo")):
        ax.bar(x + (k - 0.5) * 0.4, [result[key][n] or 0 for n in names], 0.4, label=key.replace("iou_", "vs "))
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    ax.set_ylabel("IoU %")
    ax.set_title(f"semantic student, mIoU of classes present: real {result['miou_real_present']:.1f}, training "
                 f"labels {result['miou_pseudo_present']:.1f}, unlabelled points {result['miou_unlabelled_present']:.1f}")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def summary_line(result: dict) -> str:
    return (f"mIoU (classes present) vs real labels {result['miou_real_present']:.1f}, vs training labels "
            f"{result['miou_pseudo_present']:.1f}, on unlabelled points {result['miou_unlabelled_present']:.1f}; "
            f"over all {len(result['iou_real'])} classes (absent = 0): {result['miou_real']:.1f} / "
            f"{result['miou_pseudo']:.1f} / {result['miou_unlabelled']:.1f}; accuracy {result['acc_real']:.1f}")


def report(result: dict, out: Path | None) -> int:
    """Print the summary line; write metrics.json, report.md and per_class.png into ``out``."""
    line = summary_line(result)
    print(line)
    if out is not None:
        write_result(out, result, "report.md", f"# Semantic evaluation\n\n{line}\n", "per_class.png", plot)
    return 0
