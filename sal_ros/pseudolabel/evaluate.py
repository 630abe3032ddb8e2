"""``sal-ros eval pseudolabels``: pseudo-label quality against SemanticKITTI ground truth. The scoring, table,
figure and report are sal_ros.eval.pseudolabels'; here: the command, and the labels it scores.

Two uses:

- ``--pseudolabels DIR``: score the files a ``sal-ros pseudolabel`` run wrote (one row);
- otherwise an ablation on the fly: mask sources (``slic``, ``oracle`` = ground-truth segments rendered into the
  image with a z-buffer and splats, an upper bound for the masks; ``sam``/``sam2`` with ``--sam*-checkpoint``;
  ``geometric``, lidar ground removal + clusters, geometric.py; ``geometric_oracle``, its clusters cut along the
  oracle masks) x lifting (naive, occlusion test) x DBSCAN replace (off/on), and for ``geometric`` the row
  ``lidar only`` (its own point labels, no camera). CLIP tokens play no part and are skipped. ``--full-scan``
  scores every labelled point; with ``geometric`` the ground's precision and recall are reported too.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from sal_ros.data.sources import FrameSource
from sal_ros.eval.pseudolabels import ground_scores, report, score_frames
from sal_ros.pseudolabel import augmentation, geometric
from sal_ros.pseudolabel.augmentation import AugmentConfig, augmented
from sal_ros.pseudolabel.engine import label_from_masks
from sal_ros.pseudolabel.geometric import GROUND_CLASSES
from sal_ros.pseudolabel.lifting import LiftConfig
from sal_ros.pseudolabel.mask_sources import build_mask_source
from sal_ros.pseudolabel.masks import Masks, flatten_masks
from sal_ros.pseudolabel.oracle import OracleMasks, oracle_masks  # noqa: F401 - oracle_masks: this module's API
from sal_ros.pseudolabel.refine import RefineConfig

VARIANTS = {  # name: (occlusion test, DBSCAN replace)
    "naive": (False, False),
    "naive + DBSCAN replace": (False, True),
    "occlusion": (True, False),
    "occlusion + DBSCAN replace": (True, True),
}
LIDAR_ONLY = "lidar only"  # the geometric teacher's own point labels, no camera (a row only for such sources)
GEOMETRIC_ORACLE = "geometric_oracle"  # geometric clusters cut along the oracle masks: what ideal image masks add


def _frame_masks(frame, source, kind: str, label_set, flatten_overlap: float, min_depth: float,
                 splat: tuple[int, int]) -> dict[str, Masks]:
    if kind in ("oracle", GEOMETRIC_ORACLE):
        oracle = OracleMasks(splat, label_set.name, min_depth).frame_masks(frame, frame.gt_labels)
        if kind == "oracle":
            return oracle
        return {n: flatten_masks(geometric.split_by(source.generate_for_view(frame.points, v), oracle[n]),
                                 flatten_overlap) for n, v in frame.cameras.items()}
    gen = getattr(source, "generate_for_view", None)  # sources that need the points (geometric)
    return {n: flatten_masks(gen(frame.points, v) if gen is not None else source.generate(v.image), flatten_overlap)
            for n, v in frame.cameras.items()}


def evaluate_pseudolabels(dataset: str | Path, masks: tuple[str, ...] = ("slic", "oracle"),
                          variants: tuple[str, ...] = tuple(VARIANTS), pseudolabels: str | Path | None = None,
                          mask_options: dict | None = None, lift: LiftConfig = LiftConfig(),
                          refine: RefineConfig = RefineConfig(), fusion_iou: float = 0.3, flatten_overlap: float = 0.8,
                          engine_min_points: int = 5, min_points: int | None = None, label_config: str | None = None,
                          splat: tuple[int, int] = (2, 3), max_frames: int | None = None,
                          progress: bool = True, full_scan: bool = False, select: str | None = None,
                          augment: dict | None = None) -> dict:
    """Score pseudo-labels on a dataset with ground truth; returns {"rows": [...], "meta": {...}}.
    ``full_scan``: score every labelled point, not only those the cameras see (camera pseudo-labels then miss
    what lies outside the images; the geometric teacher's ``lidar only`` row labels the whole scan).
    ``select``: sequences and scans of a SemanticKITTI root (``00,05:0-4``), as in ``sal-ros pseudolabel``.
    ``augment``: an AugmentConfig dict: image sources voted over augmentations (a no-op for the others)."""
    from sal_ros.data.labels import semantickitti

    label_set = semantickitti(label_config, **({"min_points": min_points} if min_points is not None else {}))
    source = FrameSource(dataset, select)
    keys = source.keys()[:max_frames] if max_frames else source.keys()
    if pseudolabels is not None:
        configs = [("files", str(pseudolabels))]
    else:
        unknown = [v for v in variants if v not in VARIANTS and v != LIDAR_ONLY]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {', '.join([*VARIANTS, LIDAR_ONLY])}")
    built = {GEOMETRIC_ORACLE: "geometric"}  # a kind of its own here, the geometric source underneath
    sources = {m: augmented(build_mask_source(built.get(m, m), **(mask_options or {}).get(built.get(m, m), {})),
                            AugmentConfig.from_dict(augment), flatten_overlap)
               for m in masks if m != "oracle" and pseudolabels is None}
    if pseudolabels is None:  # "lidar only" exists for the sources that label points themselves
        configs = [(m, v) for m in masks for v in variants
                   if v != LIDAR_ONLY or (hasattr(sources.get(m), "label_points") and m != GEOMETRIC_ORACLE)]
    ground = np.zeros(3, np.int64)  # geometric ground vs the ground classes: TP, FP, FN points
    seconds: dict[str, float] = {}

    def label_frame(frame) -> dict:
        """Each configuration's point instance ids on ``frame``: read from the files, or labelled here."""
        if pseudolabels is not None:
            from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path

            return {configs[0]: load_pseudolabels(pseudolabel_path(pseudolabels, frame.key), frame.num_points).instance}
        out = {}
        for kind in masks:
            t0 = time.perf_counter()
            frame_masks = _frame_masks(frame, sources.get(kind), kind, label_set, flatten_overlap, lift.min_depth,
                                       splat)
            seconds[f"{kind} masks"] = seconds.get(f"{kind} masks", 0.0) + time.perf_counter() - t0
            if hasattr(sources.get(kind), "ground_of") and kind != GEOMETRIC_ORACLE:
                ground[:] += ground_scores(sources[kind].ground_of(frame.points), frame.gt_labels, label_set,
                                           GROUND_CLASSES)
            for variant in variants:
                if variant == LIDAR_ONLY:
                    if (kind, variant) in configs:
                        out[(kind, variant)] = sources[kind].label_points(frame.points)  # with the masks above
                    continue
                occlusion, use_refine = VARIANTS[variant]
                t0 = time.perf_counter()
                pl = label_from_masks(frame, frame_masks, None, replace(lift, occlusion=occlusion), fusion_iou,
                                      refine if use_refine else None, engine_min_points)
                seconds[variant] = seconds.get(variant, 0.0) + time.perf_counter() - t0
                out[(kind, variant)] = pl.instance
        return out

    rows, skipped = score_frames(source, keys, configs, label_frame, label_set, lift.min_depth, full_scan, progress)
    scored = len(keys) - len(skipped)
    meta = {"dataset": str(dataset), "select": select, "frames": scored, "frames_skipped": skipped,
            "min_points": label_set.min_points,
            "lift": vars(lift), "refine": vars(refine), "splat": list(splat), "engine_min_points": engine_min_points,
            "seconds_per_frame": {k: v / max(scored, 1) for k, v in seconds.items()}, "full_scan": full_scan,
            "augment": augment or {}}
    if "geometric" in sources:
        tp, fp, fn = (int(x) for x in ground)
        meta["ground"] = {"precision": 100 * tp / max(tp + fp, 1), "recall": 100 * tp / max(tp + fn, 1),
                          "tp": tp, "fp": fp, "fn": fn, "classes": list(GROUND_CLASSES)}
    return {"rows": rows, "meta": meta}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="SemanticKITTI sequence folder (velodyne/, labels/, image_0/, "
                                                   "calib.txt) or a FrameStore with ground truth")
    parser.add_argument("--pseudolabels", type=Path, help="score these files instead of running the ablation")
    parser.add_argument("--masks", nargs="+", default=["slic", "oracle"],
                        choices=["slic", "oracle", "sam", "sam2", "geometric", GEOMETRIC_ORACLE],
                        help=f"{GEOMETRIC_ORACLE}: the geometric clusters cut along the oracle masks")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, LIDAR_ONLY], choices=[*VARIANTS, LIDAR_ONLY],
                        metavar="VARIANT", help=f"lifting variants: {', '.join(VARIANTS)}; '{LIDAR_ONLY}': the "
                                                "geometric teacher's point labels without cameras")
    parser.add_argument("--select", help="sequences and scans of a dataset with sequences, e.g. 00,05:0-4")
    parser.add_argument("--full-scan", action="store_true",
                        help="score every labelled point, not only those the cameras see")
    parser.add_argument("--slic-segments", type=int, default=150)
    augmentation.add_arguments(parser)
    parser.add_argument("--sam-checkpoint")
    parser.add_argument("--sam-model-type", default="vit_b")
    parser.add_argument("--sam2-checkpoint")
    parser.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-points", type=int, help="min segment size for FP/FN (default 50, semantic-kitti-api)")
    parser.add_argument("--label-config", type=Path, help="semantic-kitti.yaml (learning_map)")
    parser.add_argument("--max-frames", type=int)
    parser.add_argument("--out", type=Path, help="folder for metrics.json, table.md, pseudolabel_eval.png")
    parser.add_argument("--no-progress", action="store_true")
    geometric.add_arguments(parser.add_argument_group("geometric teacher (--masks geometric)"))
    from sal_ros.pseudolabel import semantic_eval

    semantic_eval.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "semantic", False):
        from sal_ros.pseudolabel import semantic_eval

        return semantic_eval.main(args)
    opts = {"slic": {"n_segments": args.slic_segments},
            "sam": {"model_type": args.sam_model_type, "checkpoint": args.sam_checkpoint, "device": args.device},
            "sam2": {"config": args.sam2_config, "checkpoint": args.sam2_checkpoint, "device": args.device},
            "geometric": geometric.options_from_args(args)}
    for kind, ckpt in (("sam", args.sam_checkpoint), ("sam2", args.sam2_checkpoint)):
        if kind in args.masks and not ckpt and args.pseudolabels is None:
            raise ValueError(f"--masks {kind} needs --{kind}-checkpoint (random weights mean nothing here)")
    result = evaluate_pseudolabels(args.dataset, tuple(args.masks), tuple(args.variants), args.pseudolabels,
                                   mask_options=opts, min_points=args.min_points,
                                   label_config=str(args.label_config) if args.label_config else None,
                                   max_frames=args.max_frames, progress=not args.no_progress,
                                   full_scan=args.full_scan, select=args.select,
                                   augment=augmentation.options_from_args(args))
    return report(result, args.out)
