"""``sal-ros eval probe``: linear probing of a frozen backbone, beside the same probe on a random backbone.

The backbone (a ``sal-ros pretrain`` file, or the backbone of a ``sal-ros train`` checkpoint) runs once, frozen and
in eval mode, over labelled scans; a linear layer on its per-point features (standardised with the training
points' mean and spread, as a BatchNorm without affine) is trained with cross-entropy on the ``--train-scans`` and
scored on the ``--eval-scans``: per-class IoU and mIoU over the classes present (semantic-kitti-api convention,
ignore class left out; sal_ros.eval.semantic). By default only camera-visible points count (where a 2D teacher
could teach anything). The random baseline is a backbone of the same config, seeded, never trained.

Writes probe.json, probe.md and per_class.png into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, type=Path,
                        help="backbone_last.pt of sal-ros pretrain, or model_last.pt of sal-ros train")
    parser.add_argument("--dataset", required=True, type=Path, help="SemanticKITTI sequence folder with labels/")
    parser.add_argument("--train-scans", required=True, help="comma-separated scan numbers the probe trains on")
    parser.add_argument("--eval-scans", required=True, help="comma-separated scan numbers it is scored on")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=300, help="full-batch AdamW steps of the linear layer")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--all-points", action="store_true", help="score every labelled point, not only the "
                        "camera-visible ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline backbone and the probe")
    parser.add_argument("--label-config", type=Path, help="semantic-kitti.yaml (learning_map); built-in otherwise")


def _scans(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"scan numbers must be integers separated by commas, got {text!r}") from None


def load_backbone(path: Path):
    """(backbone module, ModelConfig, what) from a pretrain backbone file or a SAL checkpoint."""
    from sal_ros.model.backbone import build_backbone
    from sal_ros.model.checkpoint import CheckpointError, read_checkpoint
    from sal_ros.model.pretrained import backbone_config, load_backbone_into, read_backbone

    try:
        config = backbone_config(read_backbone(path))
        backbone = build_backbone(config)
        load_backbone_into(path, backbone, config)
        return backbone, config, "pretrained backbone"
    except CheckpointError as first:
        try:
            payload = read_checkpoint(path)
        except CheckpointError:
            raise first from None
        from sal_ros.model.sal import ModelConfig

        config = ModelConfig.from_dict(dict(payload["model_config"]))
        backbone = build_backbone(config)
        prefix = "backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)})
        return backbone, config, "SAL checkpoint backbone"


class _Features:
    """A frozen backbone's per-point features (SALModel's input features and voxelization)."""

    def __init__(self, backbone, config) -> None:
        self.backbone, self.config = backbone.eval(), config

    def point_features(self, points, intensity):
        from sal_ros.model.sal import SALModel

        return SALModel.point_features(self, points, intensity)

    def __call__(self, points: np.ndarray, intensity: np.ndarray) -> np.ndarray:
        import torch

        from sal_ros.model.sal import SALModel

        with torch.inference_mode():
            vin = SALModel.prepare(self, torch.from_numpy(points), torch.from_numpy(intensity))
            fine = self.backbone(vin.voxels)[1].feats
            return fine[vin.point_to_voxel[0]].float().numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, steps: int, lr: float, seed: int):
    """A trained ``predict(x) -> class 1..C``: standardise, one linear layer, full-batch AdamW."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mean) / std).float()
    y = torch.from_numpy(train_y.astype(np.int64))
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y, ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = head(torch.from_numpy((features - mean) / std).float())
            logits[:, 0] = -float("inf")  # class 0 is "ignore", never a prediction
            return logits.argmax(1).numpy()

    return predict, float(loss.detach())


def probe(features, frames_train, frames_eval, label_set, steps: int, lr: float, seed: int, visible_only: bool):
    from sal_ros.core.camera import in_camera_frustum
    from sal_ros.eval.semantic import ConfusionMatrix

    def points_of(frame):
        cls, _ = label_set.split(frame.gt_labels)
        keep = (cls > 0) & (in_camera_frustum(frame) if visible_only else True)
        intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
        return features(frame.points, intensity)[keep], cls[keep]

    train = [points_of(f) for f in frames_train]
    predict, final_loss = linear_probe(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                                       label_set.num_classes, steps, lr, seed)
    conf = ConfusionMatrix(label_set.num_classes)
    for frame in frames_eval:
        x, y = points_of(frame)
        conf.add(predict(x), y)
    iou = _iou(conf.conf)
    present = iou[~np.isnan(iou)]
    return {"miou": conf.miou(), "miou_present": float(present.mean()) if present.size else float("nan"),
            "accuracy": conf.accuracy(), "train_loss": final_loss,
            "iou": {name: (None if np.isnan(iou[k - 1]) else float(iou[k - 1]))
                    for k, name in enumerate(label_set.class_names, start=1)},
            "eval_points": int(conf.conf[:, 1:].sum()), "train_points": int(sum(len(y) for _, y in train))}


def _iou(conf: np.ndarray) -> np.ndarray:
    """(C,) IoU of classes 1..C from ``conf[pred, gt]`` (ignore-class points left out), NaN where a class is
    neither in the ground truth nor predicted."""
    c = conf[1:, 1:].astype(np.float64)
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp + conf[0, 1:]  # a point predicted as 0 misses its class
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def main(args: argparse.Namespace) -> int:
    import torch

    from sal_ros.core.files import atomic_write
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.eval.labels import get_label_set
    from sal_ros.model.backbone import build_backbone

    train_scans, eval_scans = _scans(args.train_scans), _scans(args.eval_scans)
    label_set = get_label_set("semantickitti", **({"config_yaml": args.label_config} if args.label_config else {}))
    frames = {int(f.key.rpartition("_")[2]): f for f in load_semantickitti(args.dataset, set(train_scans + eval_scans))}
    for f in frames.values():
        if f.gt_labels is None:
            raise FileNotFoundError(f"{args.dataset}: scan {f.key} has no labels/ file")
    torch.set_grad_enabled(True)
    from sal_ros.model.checkpoint import CheckpointError

    try:
        backbone, config, what = load_backbone(args.backbone)
    except CheckpointError as exc:
        print(f"sal-ros eval probe: {exc}", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    random_backbone = build_backbone(config)
    rows = {}
    for name, net in (("pretrained", backbone), ("random", random_backbone)):
        rows[name] = probe(_Features(net, config), [frames[s] for s in train_scans], [frames[s] for s in eval_scans],
                           label_set, args.steps, args.lr, args.seed, not args.all_points)
        print(f"{name}: mIoU {100 * rows[name]['miou']:.1f} (present classes {100 * rows[name]['miou_present']:.1f})",
              file=sys.stderr)
    result = {"backbone": str(args.backbone), "kind": what, "family": config.backbone, "dataset": str(args.dataset),
              "train_scans": train_scans, "eval_scans": eval_scans, "steps": args.steps, "lr": args.lr,
              "points": "all labelled" if args.all_points else "camera-visible", **rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "probe.json", json.dumps(result, indent=2) + "\n")
    atomic_write(args.out / "probe.md", markdown(result))
    plot(result, args.out / "per_class.png")
    print(f"linear probe mIoU ({result['points']} points of scans {eval_scans}): pretrained "
          f"{100 * rows['pretrained']['miou']:.1f}, random backbone {100 * rows['random']['miou']:.1f} (present classes: "
          f"{100 * rows['pretrained']['miou_present']:.1f} vs {100 * rows['random']['miou_present']:.1f}) -> "
          f"{args.out / 'probe.md'}")
    return 0


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(result: dict) -> str:
    p, r = result["pretrained"], result["random"]
    lines = ["# Linear probe", "", f"- backbone: {result['backbone']} ({result['kind']}, {result['family']})",
             f"- train scans {result['train_scans']} ({p['train_points']} points), eval scans {result['eval_scans']} "
             f"({p['eval_points']} points), {result['points']} points, {result['steps']} steps", "",
             "mIoU: mean over the 19 classes, an absent class scoring 0 (semantic-kitti-api); present: over the "
             "classes in the eval scans' ground truth or predictions.", "",
             "| backbone | mIoU | mIoU present | accuracy |", "|---|---|---|---|",
             f"| pretrained | {_pct(p['miou'])} | {_pct(p['miou_present'])} | {_pct(p['accuracy'])} |",
             f"| random init | {_pct(r['miou'])} | {_pct(r['miou_present'])} | {_pct(r['accuracy'])} |", "", "| class | pretrained IoU | random IoU |",
             "|---|---|---|"]
    lines += [f"| {c} | {_pct(p['iou'][c])} | {_pct(r['iou'][c])} |" for c in p["iou"]
              if p["iou"][c] is not None or r["iou"][c] is not None]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.eval.report import atomic_savefig

    names = [c for c in result["pretrained"]["iou"] if result["pretrained"]["iou"][c] is not None
             or result["random"]["iou"][c] is not None]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    for off, key, label in ((-0.2, "pretrained", "pretrained"), (0.2, "random", "random init")):
        vals = [100 * (result[key]["iou"][c] or 0.0) for c in names]
        ax.bar(x + off, vals, 0.4, label=f"{label} (mIoU {_pct(result[key]['miou'])})")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("IoU %")
    ax.set_title("linear probe per class")
    ax.legend()
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)


__all__ = ["linear_probe", "probe", "load_backbone", "main", "add_arguments"]
