"""``sal-ros eval pseudolabels``: pseudo-label quality against SemanticKITTI ground truth.

Only points that project into a camera are scored (pseudo-labels exist nowhere else), ignore-class points are
removed, and segments follow semantic-kitti-api (the whole raw label is a ground-truth segment, IoU > 0.5
matches, unmatched segments count with >= ``min_points`` points). Reported, in percent:

- ``PQ/SQ/RQ all``: class-agnostic over every ground-truth segment (things and stuff), SAL's pseudo-label metric;
- ``PQ/SQ/RQ things``: ground-truth thing instances only; a pseudo-instance competes as a thing when most of its
  points are thing points (an oracle thing/stuff split: the labels carry no classes);
- ``coverage``: fraction of scored points with a pseudo-label, and of thing points.

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
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write, json_safe, write_json
from sal_ros.data.sources import FrameSource
from sal_ros.eval.panoptic import SegmentCounts, match_segments
from sal_ros.pseudolabel import augmentation, geometric
from sal_ros.pseudolabel.augmentation import AugmentConfig, augmented
from sal_ros.pseudolabel.engine import label_from_masks
from sal_ros.pseudolabel.geometric import GROUND_CLASSES, ground_scores
from sal_ros.pseudolabel.lifting import LiftConfig, project_view
from sal_ros.pseudolabel.mask_sources import build_mask_source
from sal_ros.pseudolabel.masks import Masks, flatten_masks
from sal_ros.pseudolabel.oracle import OracleMasks, oracle_masks  # noqa: F401 - oracle_masks: this module's API
from sal_ros.pseudolabel.refine import RefineConfig

log = logging.getLogger(__name__)

VARIANTS = {  # name: (occlusion test, DBSCAN replace)
    "naive": (False, False),
    "naive + DBSCAN replace": (False, True),
    "occlusion": (True, False),
    "occlusion + DBSCAN replace": (True, True),
}
LIDAR_ONLY = "lidar only"  # the geometric teacher's own point labels, no camera (a row only for such sources)
GEOMETRIC_ORACLE = "geometric_oracle"  # geometric clusters cut along the oracle masks: what ideal image masks add


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
    scores = {c: PseudoLabelScore() for c in configs}
    ground = np.zeros(3, np.int64)  # geometric ground vs the ground classes: TP, FP, FN points
    seconds: dict[str, float] = {}
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="eval pseudolabels", unit="frame")
    skipped: dict[str, str] = {}  # key -> why the frame was not scored (named and counted in the report)
    for key in it:
        frame, why = _load_complete(source, key)
        if frame is None:
            skipped[key] = why
            log.warning("frame %s not scored: %s", key, why)
            continue
        keep, gt_cls, gt_seg, thing = scored_points(frame, label_set, lift.min_depth, full_scan)
        if pseudolabels is not None:
            from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path

            pl = load_pseudolabels(pseudolabel_path(pseudolabels, key), frame.num_points)
            scores[configs[0]].add(pl.instance[keep], gt_cls, gt_seg, thing, label_set.min_points)
            continue
        for kind in masks:
            t0 = time.perf_counter()
            frame_masks = _frame_masks(frame, sources.get(kind), kind, label_set, flatten_overlap, lift.min_depth,
                                       splat)
            seconds[f"{kind} masks"] = seconds.get(f"{kind} masks", 0.0) + time.perf_counter() - t0
            if hasattr(sources.get(kind), "ground_of") and kind != GEOMETRIC_ORACLE:
                ground += ground_scores(sources[kind].ground_of(frame.points), frame.gt_labels, label_set)
            for variant in variants:
                if variant == LIDAR_ONLY:
                    if (kind, variant) in scores:
                        instance = sources[kind].label_points(frame.points)  # computed with the masks above
                        scores[(kind, variant)].add(instance[keep], gt_cls, gt_seg, thing, label_set.min_points)
                    continue
                occlusion, use_refine = VARIANTS[variant]
                t0 = time.perf_counter()
                pl = label_from_masks(frame, frame_masks, None, replace(lift, occlusion=occlusion), fusion_iou,
                                      refine if use_refine else None, engine_min_points)
                seconds[variant] = seconds.get(variant, 0.0) + time.perf_counter() - t0
                scores[(kind, variant)].add(pl.instance[keep], gt_cls, gt_seg, thing, label_set.min_points)
    rows = [{"masks": c[0], "lifting": c[1], **s.summary()} for c, s in scores.items()]
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


def _load_complete(source, key: str):
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
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "metrics.json", result)
        atomic_write(args.out / "table.md", table + "\n")
        plot(result, args.out / "pseudolabel_eval.png")
    return status
