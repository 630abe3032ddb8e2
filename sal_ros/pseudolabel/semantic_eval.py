"""``sal-ros eval pseudolabels --semantic``: semantic pseudo-labels against SemanticKITTI ground truth.

Scored points: those a camera saw (a raw pseudo-label exists) with a ground-truth class. Reported per row:
per-class IoU and mIoU of the kept labels (filtered points count as misses of their true class, as ignore does
in semantic-kitti-api) and of the unfiltered labels, the share of points kept, and the accuracy of the kept and of
the filtered points (filtering helps when it removes mostly wrong labels).

Two uses:

- ``--pseudolabels DIR``: score the files a ``sal-ros pseudolabel --semantic`` run wrote (one row);
- otherwise the oracle study: ground-truth classes rendered into the image and degraded by Gaussian logit noise
  (``--noise``), lifted, then filtered by each of several settings (one row each, the same noisy maps); plus the
  occlusion study: the points the occlusion test hides, and how many of them naive lifting would have given the
  class of the object in front (the wrong object).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write
from sal_ros.data.labels import semantickitti, vocabulary_lut
from sal_ros.data.pseudolabels import pseudolabel_path
from sal_ros.data.pseudolabels import LOW_MARGIN, LOW_SCORE, SemanticLabels, load_semantic
from sal_ros.data.sources import FrameSource
from sal_ros.eval.report import atomic_savefig
from sal_ros.eval.semantic import ConfusionMatrix
from sal_ros.pseudolabel.lifting import LiftConfig
from sal_ros.pseudolabel.score_sources import OracleScores
from sal_ros.pseudolabel.semantic import (FilterConfig, SemanticConfig, SemanticLabeler, apply_frame_agreement,
                                          label_from_scores)

# Oracle study rows: name -> filter settings (frame agreement uses 1 neighbour each side)
STUDY_FILTERS = {
    "none": FilterConfig(),
    "score >= 0.3": FilterConfig(min_score=0.3),
    "margin >= 0.1": FilterConfig(min_margin=0.1),
    "margin >= 0.2": FilterConfig(min_margin=0.2),
    "frames (1 each side)": FilterConfig(frame_agreement=1),
    "margin >= 0.1 + frames": FilterConfig(min_margin=0.1, frame_agreement=1),
}


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
                "iou_kept": {n: _pct(v) for n, v in zip(class_names, self.kept.iou()[1:])},
                "iou_unfiltered": {n: _pct(v) for n, v in zip(class_names, self.raw.iou()[1:])}}


def _pct(v: float) -> float | None:
    return None if not np.isfinite(v) else round(100 * float(v), 2)


def _scored(frame, label_set):
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
        gt = _scored(frame, label_set)
        keep = pl.seen & (gt > 0)
        score.add(lut[pl.label[keep]], lut[pl.raw_label[keep]], gt[keep])
    row = {"name": f"files {pseudolabels}", **score.summary(label_set.class_names)}
    return {"rows": [row], "meta": {"dataset": str(dataset), "frames": len(keys), "pseudolabels": str(pseudolabels),
                                    "classes": names}}


def oracle_study(dataset, label_set_name: str = "semantickitti", noise: float = 1.0, strength: float = 2.0,
                 filters: dict | None = None, lift: LiftConfig = LiftConfig(), max_frames=None, seed: int = 0) -> dict:
    """Every filter row on the same noisy oracle maps, and the occlusion study (noise-free maps)."""
    filters = filters or STUDY_FILTERS
    source = FrameSource(dataset)
    keys = source.keys()[:max_frames] if max_frames else source.keys()
    oracle = OracleScores(label_set_name, noise=noise, strength=strength, seed=seed)
    label_set = oracle.label_set
    k = max(f.frame_agreement for f in filters.values())
    labeler = SemanticLabeler(SemanticConfig(scores="oracle", lift=lift, filter=FilterConfig(frame_agreement=k)),
                              source, score_source=oracle)
    scores = {name: SemanticScore(label_set.num_classes) for name in filters}
    occl = {"hidden": 0, "hidden_wrong_naive": 0, "visible": 0, "visible_wrong": 0}
    for key in keys:
        frame = source.load(key)
        gt = _scored(frame, label_set)
        raw = labeler.raw(frame)  # no filter: the rows filter the same maps below
        probs_maps = None
        for name, filt in filters.items():
            lab = _filtered(labeler, frame, raw, filt)
            keep = lab.seen & (gt > 0)
            score = scores[name]
            score.add(lab.label[keep].astype(np.int64), lab.raw_label[keep].astype(np.int64), gt[keep])
        probs_maps = {n: oracle.render(frame, v) for n, v in frame.cameras.items()}
        _occlusion(frame, probs_maps, gt, lift, occl, label_set.num_classes)
    rows = [{"name": name, "filter": vars(f), **scores[name].summary(label_set.class_names)}
            for name, f in filters.items()]
    occl["hidden_wrong_share"] = 100 * occl["hidden_wrong_naive"] / max(occl["hidden"], 1)
    occl["visible_wrong_share"] = 100 * occl["visible_wrong"] / max(occl["visible"], 1)
    return {"rows": rows, "occlusion": occl,
            "meta": {"dataset": str(dataset), "frames": len(keys), "noise": noise, "strength": strength,
                     "seed": seed, "lift": {**vars(lift), "lidar_spacing_deg": list(lift.lidar_spacing_deg)}}}


def _filtered(labeler, frame, raw, filt: FilterConfig):
    """``raw``'s labels under another filter (the per-frame filters recomputed from the stored scores)."""
    seen = raw.raw_label > 0
    filtered = np.zeros(raw.label.size, np.uint8)
    filtered[seen & (raw.confidence.astype(np.float32) < filt.min_score)] |= LOW_SCORE
    filtered[seen & (raw.margin.astype(np.float32) < filt.min_margin)] |= LOW_MARGIN
    lab = SemanticLabels(np.where(filtered == 0, raw.raw_label, 0), raw.raw_label, raw.confidence, raw.margin,
                         filtered, raw.in_frustum, raw.meta)
    if filt.frame_agreement:
        saved = labeler.config.filter
        labeler.config.filter = filt
        try:
            labeler._frame_agreement(frame, lab, filt.frame_agreement)
        finally:
            labeler.config.filter = saved
    return lab


def _occlusion(frame, rendered: dict, gt: np.ndarray, lift: LiftConfig, acc: dict, num_classes: int) -> None:
    """Naive vs occlusion lifting of noise-free rendered classes: the points the test hides and whether the
    class naive lifting gives them (the nearest object's at their pixel) is wrong."""
    maps = {n: (img[None] == np.arange(1, num_classes + 1)[:, None, None]).astype(np.float32)
            for n, img in rendered.items()}
    names = [str(i) for i in range(num_classes)]
    naive = label_from_scores(frame, maps, names, replace(lift, occlusion=False))
    occl = label_from_scores(frame, maps, names, replace(lift, occlusion=True))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``eval pseudolabels`` that only ``--semantic`` reads."""
    g = parser.add_argument_group("--semantic")
    g.add_argument("--semantic", action="store_true",
                   help="semantic pseudo-labels: per-class IoU, share kept, accuracy of kept vs filtered points")
    g.add_argument("--noise", type=float, default=1.0, help="oracle study: Gaussian logit noise (sigma)")
    g.add_argument("--strength", type=float, default=2.0, help="oracle study: logit of the true class")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--class-map", type=Path, help="yaml {pseudo-label class: dataset class} (else by name)")


def main(args: argparse.Namespace) -> int:
    label_set = semantickitti(str(args.label_config) if args.label_config else None)
    if args.pseudolabels is not None:
        class_map = None
        if args.class_map is not None:
            from sal_ros.core.yamlfile import load_yaml

            class_map = load_yaml(args.class_map, "class map") or {}
        result = evaluate_files(args.dataset, args.pseudolabels, label_set, class_map, args.max_frames)
    else:
        result = oracle_study(args.dataset, noise=args.noise, strength=args.strength, max_frames=args.max_frames,
                              seed=args.seed)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "metrics.json", json.dumps(result, indent=1, default=float))
        atomic_write(args.out / "table.md", table + "\n")
        plot(result, args.out / "semantic_pseudolabels.png")
    return 0
