"""``sal-ros eval model``: zero-shot panoptic evaluation of a checkpoint on frames with ground truth.

Frames go through the same synchronizer (sal_ros.data.bag) or frame-source registry and the same Segmenter as the
segmenter node, with fixed seeds and deterministic kernels; the report (metrics.json, report.md, confusion.png,
per_class.png) goes into --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sal_ros.core.cloud_input import SCORE_THRESHOLD, SegmenterConfig


def add_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--checkpoint", required=True, type=Path)
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", type=Path, help="rosbag2 with lidar (+ ground-truth) topics, read through the synchronizer")
    src.add_argument("--dataset", type=Path, help="frames with ground truth, any kind sal_ros.data.sources knows "
                     "(e.g. a SemanticKITTI sequence: velodyne/, labels/, calib.txt)")
    m.add_argument("--select", help="sequences and scans of a dataset with sequences, e.g. 00,05:0-4 (scans 0-4 of "
                   "00 and 05); ';' separates groups: 00;05:0-4")
    m.add_argument("--vocabulary", required=True, type=Path, help="vocabulary yaml (prompts per class)")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--label-set", default="semantickitti", choices=["semantickitti", "nuscenes"])
    m.add_argument("--label-config", type=Path, help="semantic-kitti.yaml (learning_map); built-in map otherwise")
    m.add_argument("--class-map", type=Path,
                   help="yaml {vocabulary class: dataset class}; unnamed classes match by name, null = not scored")
    m.add_argument("--min-points", type=int, help="min segment size (default: 50 SemanticKITTI, 15 nuScenes)")
    m.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD,
                   help="points scoring below get no class, as in the node (default: the node's score_threshold, "
                        "%(default)s)")
    m.add_argument("--intensity-scale", type=float, default=0.0,
                   help="the lidar's full-scale intensity (e.g. 255), rescaled to the checkpoint's as the node's "
                        "model.intensity_scale does (default 0: the checkpoint's own scale)")
    m.add_argument("--max-frames", type=int)
    m.add_argument("--device", default="cpu")
    m.add_argument("--frustum-only", action="store_true",
                   help="score only the points some camera sees (where camera pseudo-labels exist)")
    m.add_argument("--config", type=Path, help="node / synchronizer yaml for --bag")
    m.add_argument("--no-progress", action="store_true")


def _load_class_map(path: Path | None) -> dict | None:
    if path is None:
        return None
    from sal_ros.core.yamlfile import load_yaml

    data = load_yaml(path, "class map") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping vocabulary class -> dataset class")
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}


def iter_frames(args):
    """Frames with ground truth, from any registered frame source or a bag (through the node's synchronizer)."""
    from sal_ros.data.sources import iter_source_frames

    if args.dataset is not None:
        return iter_source_frames(args.dataset, select=getattr(args, "select", None))
    return iter_source_frames(args.bag, bag_config=args.config, kind="bag")


def build_segmenter(checkpoint: Path, vocabulary: Path, device: str, config: SegmenterConfig | None = None):
    """The node's Segmenter on a checkpoint and a vocabulary file, deterministic, with the node's defaults."""
    import torch

    from sal_ros.model.segmenter import Segmenter

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return Segmenter.from_files(checkpoint, vocabulary, device=device, config=config)


def main(args: argparse.Namespace) -> int:
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.offline import evaluate_frames
    from sal_ros.eval.panoptic import found_by_class
    from sal_ros.eval.report import write_report

    kwargs = {"config_yaml": args.label_config} if args.label_set == "semantickitti" and args.label_config else {}
    if args.min_points is not None:
        kwargs["min_points"] = args.min_points
    label_set = get_label_set(args.label_set, **kwargs)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    config = SegmenterConfig(score_threshold=args.score_threshold, intensity_scale=args.intensity_scale)
    segmenter = build_segmenter(args.checkpoint, args.vocabulary, args.device, config)
    evaluator, stats = evaluate_frames(lambda f: segmenter.segment(f.points, f.intensity), iter_frames(args),
                                       label_set, _load_class_map(args.class_map), progress=not args.no_progress,
                                       max_frames=args.max_frames, frustum_only=args.frustum_only)
    result = evaluator.compute()
    encoder = segmenter.text_embeddings.encoder
    if "random-seed" in encoder:
        encoder += " (RANDOM weights: class names carry no meaning, only the class-agnostic figures do)"
        print(f"sal-ros eval model: the checkpoint's text encoder is {encoder}", file=sys.stderr)
    meta = {"checkpoint": str(args.checkpoint), "text_encoder": encoder, "source": str(args.dataset or args.bag),
            "vocabulary": str(args.vocabulary), "label_set": label_set.name, "min_points": label_set.min_points,
            "score_threshold": config.score_threshold, "intensity_scale": config.intensity_scale,
            "points": "camera frustum" if args.frustum_only else "whole scan",
            **{k: v for k, v in stats.items() if k != "vocabulary_to_dataset"}}
    paths = write_report(args.out, result, evaluator.confusion, title="Zero-shot panoptic evaluation",
                         meta={**meta, "vocabulary_to_dataset": stats["vocabulary_to_dataset"]})
    s = result.summary
    print(f"PQ {100 * s['pq']:.1f}  PQ† {100 * s['pq_dagger']:.1f}  mIoU {100 * s['miou']:.1f}  "
          f"class-agnostic PQ {100 * s['agnostic_pq']:.1f}  ({stats['frames']} frames; absent classes score 0; "
          f"over the {int(s['classes_present'])} classes present: PQ {100 * s['pq_present']:.1f}, "
          f"mIoU {100 * s['miou_present']:.1f}) -> {paths['markdown']}")
    print(f"class-agnostic segments found by ground-truth class: {found_by_class(result.agnostic_per_class())}")
    return 0
