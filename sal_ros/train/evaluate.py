"""``sal-ros eval semantic``: a semantic checkpoint (``objective: semantic``) against real labels and against the
labels it was trained on (pseudo-labels, or the labelled fraction), and on the points that had no training label.

    sal-ros eval semantic --checkpoint runs/amml/model_last.pt --config config/train_semantic_amml.yaml --out DIR

The training yaml's ``sources`` (and seed) rebuild exactly the training labels, so "unlabelled" means the points
that had no label in that run. Writes metrics.json, report.md and per_class.png into DIR.
"""
from __future__ import annotations

import argparse
import json
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
    from sal_ros.model.semantic import load_semantic_checkpoint
    from sal_ros.train.semantic import evaluate, load_semantic_scans
    from sal_ros.train.trainer import TrainConfig

    torch.manual_seed(0)
    model, meta = load_semantic_checkpoint(checkpoint)
    cfg = TrainConfig.from_yaml(config)
    scans, _ = load_semantic_scans(cfg.sources, config.parent, meta["class_names"], cfg.seed)
    result = evaluate(model, scans, get_label_set(label_set), frustum_only)
    train_cfg = meta["extra"].get("train_config", {})
    result["meta"] = {"checkpoint": str(checkpoint), "config": str(config), "scans": len(scans),
                      "points": "camera frustum" if frustum_only else "whole scan",
                      "step": meta["extra"].get("step"), "consistency": (train_cfg.get("semantic") or {}).get("consistency")}
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sal_ros.eval.report import atomic_savefig

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


def main(args: argparse.Namespace) -> int:
    from sal_ros.core.files import atomic_write

    result = evaluate_checkpoint(args.checkpoint, args.config, args.label_set, not args.whole_scan)
    line = (f"mIoU (classes present) vs real labels {result['miou_real_present']:.1f}, vs training labels "
            f"{result['miou_pseudo_present']:.1f}, on unlabelled points {result['miou_unlabelled_present']:.1f}; "
            f"over all {len(result['iou_real'])} classes (absent = 0): {result['miou_real']:.1f} / "
            f"{result['miou_pseudo']:.1f} / {result['miou_unlabelled']:.1f}; accuracy {result['acc_real']:.1f}")
    print(line)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "metrics.json", json.dumps(result, indent=1, default=float))
        atomic_write(args.out / "report.md", f"# Semantic evaluation\n\n{line}\n")
        plot(result, args.out / "per_class.png")
    return 0
