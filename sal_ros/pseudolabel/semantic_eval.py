"""``sal-ros eval pseudolabels --semantic``: semantic pseudo-labels against SemanticKITTI ground truth. The scores,
table, figure and report are sal_ros.eval.semantic_pseudolabels'; here: the command and the oracle study, which
labels frames itself.

Two uses:

- ``--pseudolabels DIR``: score the files a ``sal-ros pseudolabel --semantic`` run wrote (one row);
- otherwise the oracle study: ground-truth classes rendered into the image and degraded by Gaussian logit noise
  (``--noise``), lifted, then filtered by each of several settings (one row each, the same noisy maps); plus the
  occlusion study: the points the occlusion test hides, and how many of them naive lifting would have given the
  class of the object in front (the wrong object).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from sal_ros.data.labels import semantickitti
from sal_ros.data.pseudolabels import LOW_MARGIN, LOW_SCORE, SemanticLabels
from sal_ros.data.sources import FrameSource
from sal_ros.eval.semantic_pseudolabels import (SemanticScore, count_occlusion, evaluate_files, report,
                                                scored_classes)
from sal_ros.pseudolabel.lifting import LiftConfig
from sal_ros.pseudolabel.score_sources import OracleScores
from sal_ros.pseudolabel.semantic_labeler import FilterConfig, SemanticConfig, SemanticLabeler, label_from_scores

# Oracle study rows: name -> filter settings (frame agreement uses 1 neighbour each side)
STUDY_FILTERS = {
    "none": FilterConfig(),
    "score >= 0.3": FilterConfig(min_score=0.3),
    "margin >= 0.1": FilterConfig(min_margin=0.1),
    "margin >= 0.2": FilterConfig(min_margin=0.2),
    "frames (1 each side)": FilterConfig(frame_agreement=1),
    "margin >= 0.1 + frames": FilterConfig(min_margin=0.1, frame_agreement=1),
}


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
        gt = scored_classes(frame, label_set)
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
    """Naive vs occlusion lifting of noise-free rendered classes (``count_occlusion`` scores them)."""
    maps = {n: (img[None] == np.arange(1, num_classes + 1)[:, None, None]).astype(np.float32)
            for n, img in rendered.items()}
    names = [str(i) for i in range(num_classes)]
    naive = label_from_scores(frame, maps, names, replace(lift, occlusion=False))
    occl = label_from_scores(frame, maps, names, replace(lift, occlusion=True))
    count_occlusion(naive, occl, gt, acc)


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
    return report(result, args.out)
