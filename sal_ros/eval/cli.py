"""``sal-ros eval``: evaluate a checkpoint (zero-shot, offline) or pseudo-labels against ground truth.

    sal-ros eval model --checkpoint C (--bag B | --dataset D) --vocabulary V --out DIR
    sal-ros eval pseudolabels ...        (sal_ros.pseudolabel.evaluate)

``eval model`` runs frames through the same synchronizer (sal_ros.data.bag) and the same Segmenter as the
segmenter node, with fixed seeds and deterministic kernels, and writes the report (metrics.json, report.md,
confusion.png, per_class.png) into DIR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_mode", required=True)
    m = sub.add_parser("model", help="zero-shot panoptic evaluation of a checkpoint on frames with ground truth")
    m.add_argument("--checkpoint", required=True, type=Path)
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", type=Path, help="rosbag2 with lidar (+ ground-truth) topics, read through the synchronizer")
    src.add_argument("--dataset", type=Path, help="SemanticKITTI sequence folder (velodyne/, labels/, calib.txt)")
    m.add_argument("--vocabulary", required=True, type=Path, help="vocabulary yaml (prompts per class)")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--label-set", default="semantickitti", choices=["semantickitti", "nuscenes"])
    m.add_argument("--label-config", type=Path, help="semantic-kitti.yaml (learning_map); built-in map otherwise")
    m.add_argument("--class-map", type=Path,
                   help="yaml {vocabulary class: dataset class}; unnamed classes match by name, null = not scored")
    m.add_argument("--min-points", type=int, help="min segment size (default: 50 SemanticKITTI, 15 nuScenes)")
    m.add_argument("--max-frames", type=int)
    m.add_argument("--device", default="cpu")
    m.add_argument("--config", type=Path, help="node / synchronizer yaml for --bag")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(_eval=main_model)
    try:
        from sal_ros.pseudolabel import evaluate as pl_eval  # imported only when `eval` is the command
    except ImportError as exc:
        p = sub.add_parser("pseudolabels", help=f"(unavailable: {exc})")
        p.set_defaults(_eval=lambda args, _e=exc: _unavailable("pseudolabels", _e))
    else:
        p = sub.add_parser("pseudolabels", help="pseudo-label quality against ground truth")
        pl_eval.add_arguments(p)
        p.set_defaults(_eval=pl_eval.main)
    o = sub.add_parser("online", help="latency / rate of a running segmenter (not implemented yet)")
    o.add_argument("--latency-topic", default="~/timings")
    o.set_defaults(_eval=lambda args: _unavailable("online", "not implemented yet; use `sal-ros bench model`"))


def _unavailable(mode: str, why) -> int:
    print(f"sal-ros eval {mode}: {why}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        return int(args._eval(args) or 0)
    except (SensorDataError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"sal-ros eval: {exc}", file=sys.stderr)
        return 1


def _load_class_map(path: Path | None) -> dict | None:
    if path is None:
        return None
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping vocabulary class -> dataset class")
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}


def iter_frames(args):
    """Frames with ground truth, from a dataset folder or a bag (through the node's synchronizer)."""
    if args.dataset is not None:
        from sal_ros.data.datasets import load_semantickitti

        return load_semantickitti(args.dataset)
    from sal_ros.data.bag import iter_bag_frames

    return iter_bag_frames(args.bag, config=args.config)


def build_segmenter(checkpoint: Path, vocabulary: Path, device: str):
    """The node's Segmenter on a checkpoint and a vocabulary file, deterministic."""
    import torch

    from sal_ros.model.segmenter import Segmenter

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return Segmenter.from_files(checkpoint, vocabulary, device=device)


def main_model(args) -> int:
    from sal_ros.eval.labels import get_label_set
    from sal_ros.eval.offline import evaluate_frames
    from sal_ros.eval.report import write_report

    kwargs = {"config_yaml": args.label_config} if args.label_set == "semantickitti" and args.label_config else {}
    if args.min_points is not None:
        kwargs["min_points"] = args.min_points
    label_set = get_label_set(args.label_set, **kwargs)
    segmenter = build_segmenter(args.checkpoint, args.vocabulary, args.device)
    evaluator, stats = evaluate_frames(lambda f: segmenter.segment(f.points, f.intensity), iter_frames(args),
                                       label_set, _load_class_map(args.class_map), progress=not args.no_progress,
                                       max_frames=args.max_frames)
    result = evaluator.compute()
    meta = {"checkpoint": str(args.checkpoint), "source": str(args.dataset or args.bag),
            "vocabulary": str(args.vocabulary), "label_set": label_set.name, "min_points": label_set.min_points,
            **{k: v for k, v in stats.items() if k != "vocabulary_to_dataset"}}
    paths = write_report(args.out, result, evaluator.confusion, title="Zero-shot panoptic evaluation",
                         meta={**meta, "vocabulary_to_dataset": stats["vocabulary_to_dataset"]})
    s = result.summary
    print(f"PQ {100 * s['pq']:.1f}  PQ† {100 * s['pq_dagger']:.1f}  mIoU {100 * s['miou']:.1f}  "
          f"class-agnostic PQ {100 * s['agnostic_pq']:.1f}  ({stats['frames']} frames) -> {paths['markdown']}")
    return 0
