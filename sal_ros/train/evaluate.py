"""``sal-ros eval semantic``: a semantic checkpoint (``objective: semantic``) against real labels and against the
labels it was trained on (pseudo-labels, or the labelled fraction), and on the points that had no training label.

    sal-ros eval semantic --checkpoint runs/amml/model_last.pt --config config/train_semantic_amml.yaml --out DIR

The training yaml's ``sources`` (and seed) rebuild exactly the training labels, so "unlabelled" means the points
that had no label in that run. Writes metrics.json, report.md and per_class.png into DIR. The scoring and the
report are sal_ros.eval.semantic_model's; here: the command and the training scans it rebuilds.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path, help="the training yaml (its sources and seed)")
    parser.add_argument("--label-set", default="semantickitti", choices=["semantickitti", "nuscenes"])
    parser.add_argument("--whole-scan", action="store_true", help="score every point, not only the camera frustum")
    parser.add_argument("--out", type=Path)


def evaluate_checkpoint(checkpoint: Path, config: Path, label_set: str = "semantickitti",
                        frustum_only: bool = True) -> dict:
    import torch

    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.semantic_model import evaluate_semantic_model
    from sal_ros.model.semantic_model import load_semantic_checkpoint
    from sal_ros.train.semantic_objective import load_semantic_scans
    from sal_ros.train.trainer import TrainConfig

    torch.manual_seed(0)
    model, meta = load_semantic_checkpoint(checkpoint)
    cfg = TrainConfig.from_yaml(config)
    scans, _ = load_semantic_scans(cfg.sources, config.parent, meta["class_names"], cfg.seed)
    result = evaluate_semantic_model(model, scans, get_label_set(label_set), frustum_only)
    train_cfg = meta["extra"].get("train_config", {})
    result["meta"] = {"checkpoint": str(checkpoint), "config": str(config), "scans": len(scans),
                      "points": "camera frustum" if frustum_only else "whole scan",
                      "step": meta["extra"].get("step"), "consistency": (train_cfg.get("semantic") or {}).get("consistency")}
    return result


def main(args: argparse.Namespace) -> int:
    from sal_ros.eval.semantic_model import report

    return report(evaluate_checkpoint(args.checkpoint, args.config, args.label_set, not args.whole_scan), args.out)
