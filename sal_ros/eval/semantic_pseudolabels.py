"""Semantic pseudo-label quality against SemanticKITTI ground truth (``sal-ros eval pseudolabels --semantic``):
the counts, the files' score, the occlusion count, the table, the figure and the report.

Scored points: those a camera saw (a raw pseudo-label exists) with a ground-truth class. Reported per row:
per-class IoU and mIoU of the kept labels (filtered points count as misses of their true class, as ignore does
in semantic-kitti-api) and of the unfiltered labels, the share of points kept, and the accuracy of the kept and of
the filtered points (filtering helps when it removes mostly wrong labels). The oracle study that labels frames
itself is sal_ros.pseudolabel.semantic_eval's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.data.labels import vocabulary_lut
from sal_ros.data.pseudolabels import load_semantic, pseudolabel_path
from sal_ros.data.sources import FrameSource
from sal_ros.eval.report import atomic_savefig, write_result
from sal_ros.eval.confusion import ConfusionMatrix


@dataclass
class SemanticScore:
    num_classes: int
    kept: ConfusionMatrix = field(init=False)
    raw: ConfusionMatrix = field(init=False)
    seen: int = 0
    n_kept: int = 0
    correct_kept: int = 0
    correct_filtered: int = 0

    def __post_init__(self) -> None:
        self.kept, self.raw = ConfusionMatrix(self.num_classes), ConfusionMatrix(self.num_classes)

    def add(self, label: np.ndarray, raw: np.ndarray, gt: np.ndarray) -> None:
        """Scored points only: kept label, unfiltered label (dataset class ids, 0 = none) and ground truth."""
        self.kept.add(label, gt)
        self.raw.add(raw, gt)
        kept = label > 0
        self.seen += int(gt.size)
        self.n_kept += int(kept.sum())
        self.correct_kept += int((raw == gt)[kept].sum())
        self.correct_filtered += int((raw == gt)[~kept].sum())

    def summary(self, class_names) -> dict:
        filtered = self.seen - self.n_kept
        return {"points": self.seen, "kept_share": 100 * self.n_kept / max(self.seen, 1),
                "acc_all": 100 * (self.correct_kept + self.correct_filtered) / max(self.seen, 1),
                "acc_kept": 100 * self.correct_kept / max(self.n_kept, 1) if self.n_kept else float("nan"),
                "acc_filtered": 100 * self.correct_filtered / filtered if filtered else float("nan"),
                "miou_kept": 100 * self.kept.miou(), "miou_unfiltered": 100 * self.raw.miou(),
                "miou_kept_present": 100 * self.kept.miou(present_only=True),
                "miou_unfiltered_present": 100 * self.raw.miou(present_only=True),
                "iou_kept": self.kept.iou_percent(class_names), "iou_unfiltered": self.raw.iou_percent(class_names)}


def scored_classes(frame, label_set):
    cls, _ = label_set.split(frame.gt_labels)
    return cls


def evaluate_files(dataset, pseudolabels, label_set, class_map: dict | None = None, max_frames=None) -> dict:
    source = FrameSource(dataset)
    keys = source.keys()[:max_frames] if max_frames else source.keys()
    score, names = SemanticScore(label_set.num_classes), None
    for key in keys:
        frame = source.load(key)
        pl = load_semantic(pseudolabel_path(pseudolabels, key), frame.num_points)
        if names is None:
            names = pl.class_names
            lut = vocabulary_lut(names, label_set, class_map)
        gt = scored_classes(frame, label_set)
        keep = pl.seen & (gt > 0)
        score.add(lut[pl.label[keep]], lut[pl.raw_label[keep]], gt[keep])
    row = {"name": f"files {pseudolabels}", **score.summary(label_set.class_names)}
    return {"rows": [row], "meta": {"dataset": str(dataset), "frames": len(keys), "pseudolabels": str(pseudolabels),
                                    "classes": names}}


def count_occlusion(naive, occl, gt: np.ndarray, acc: dict) -> None:
    """Add to ``acc`` the scored points the occlusion test hides and whether the class naive lifting gives them
    (the nearest object's at their pixel) is wrong; ``naive`` and ``occl``: the same noise-free rendered classes
    lifted without and with the test (``raw_label``, ``confidence`` per point)."""
    scored = gt > 0
    # a pixel nothing rendered (all-zero map) lifts as class 1 with probability 0: count it as no label
    naive_lbl = np.where(naive.confidence > 0, naive.raw_label, 0)
    occl_lbl = np.where(occl.confidence > 0, occl.raw_label, 0)
    hidden = scored & (naive_lbl > 0) & (occl.raw_label == 0)  # hidden, and naive lifting would label them
    visible = scored & (occl_lbl > 0)
    acc["hidden"] += int(hidden.sum())
    acc["hidden_wrong_naive"] += int((hidden & (naive_lbl != gt)).sum())
    acc["visible"] += int(visible.sum())
    acc["visible_wrong"] += int((visible & (occl_lbl != gt)).sum())


def markdown(result: dict) -> str:
    lines = ["| filter | kept % | acc all % | acc kept % | acc filtered % | mIoU kept | mIoU unfiltered "
             "| mIoU kept, present classes |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['kept_share']:.1f} | {r['acc_all']:.1f} | {r['acc_kept']:.1f} | "
                     f"{r['acc_filtered']:.1f} | {r['miou_kept']:.1f} | {r['miou_unfiltered']:.1f} | "
                     f"{r['miou_kept_present']:.1f} |")
    lines += ["", "mIoU: a class absent from ground truth and labels scores 0 (semantic-kitti-api); "
                  "'present classes' leaves such classes out."]
    o = result.get("occlusion")
    if o:
        lines += ["", f"Occlusion test (noise-free maps): hides {o['hidden']} scored points, of which naive lifting "
                      f"gives {o['hidden_wrong_naive']} ({o['hidden_wrong_share']:.1f} %) the wrong class (the object "
                      f"in front); of the {o['visible']} points it keeps, {o['visible_wrong_share']:.1f} % are wrong."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["kept_share"], r["acc_kept"], s=40)
        ax.annotate(r["name"], (r["kept_share"], r["acc_kept"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("points kept (%)")
    ax.set_ylabel("accuracy of kept points (%)")
    ax.set_title(f"Semantic pseudo-labels vs ground truth ({result['meta']['frames']} scans)")
    ax.grid(alpha=0.3)
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def report(result: dict, out: Path | None) -> int:
    """Print the table; write metrics.json, table.md and semantic_pseudolabels.png into ``out``."""
    table = markdown(result)
    print(table)
    if out is not None:
        write_result(out, result, "table.md", table + "\n", "semantic_pseudolabels.png", plot)
    return 0
