"""``sal-ros eval probe``: linear probing of a frozen backbone, beside the same probe on a random backbone.

The backbone (a ``sal-ros pretrain`` file, or the backbone of a ``sal-ros train`` checkpoint) runs once, frozen and
in eval mode, over labelled scans; a linear layer on its per-point features (standardised with the training
points' mean and spread, as a BatchNorm without affine) is fitted on the ``--train-scans`` (cross-entropy + L2,
solved to convergence by L-BFGS; the L2 strength picked per backbone on held-out training points) and scored on
the ``--eval-scans``: per-class IoU and mIoU over the classes present (semantic-kitti-api convention,
ignore class left out; sal_ros.eval.confusion). By default only camera-visible points count (where a 2D teacher
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
    parser.add_argument("--steps", type=int, default=1000, help="most L-BFGS iterations of the linear layer "
                        "(it stops earlier when converged)")
    parser.add_argument("--l2", type=float, help="L2 strength of the probe; default: the best of "
                        f"{', '.join(map(str, L2_GRID))} on a held-out 20%% of the training points, per backbone")
    parser.add_argument("--all-points", action="store_true", help="score every labelled point, not only the "
                        "camera-visible ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline backbone and the probe")
    parser.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): the probe and the random baseline once "
                        "per seed, reported as mean, min and max; the per-class rows are the first seed's")
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
        from sal_ros.model.config import ModelConfig

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


L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3)  # candidate L2 strengths of the probe (per unit of mean cross-entropy)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, max_iter: int = 1000,
                 l2: float = 1e-5, seed: int = 0):
    """A trained ``predict(x) -> class 1..C`` and its final loss: standardise, one linear layer, mean
    cross-entropy + l2/2 |W|^2 minimised by full-batch L-BFGS to convergence.

    The problem is convex, so solving it (not stopping a first-order optimiser at a step count) gives the one
    optimum of the stated objective: a few-step probe mostly measures how fast rare classes are fitted (300 AdamW
    steps left a 88-point class at IoU 0 whose converged probe reaches 0.5-0.7).
    """
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mean) / std).float()
    y = torch.from_numpy(train_y.astype(np.int64))
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes + 1)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def objective():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y, ignore_index=0) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    final = float(objective().detach())

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = head(torch.from_numpy((features - mean) / std).float())
            logits[:, 0] = -float("inf")  # class 0 is "ignore", never a prediction
            return logits.argmax(1).numpy()

    return predict, final


def select_l2(x: np.ndarray, y: np.ndarray, num_classes: int, max_iter: int, seed: int,
              holdout: float = 0.2) -> tuple[float, dict]:
    """The L2 strength of ``L2_GRID`` with the best mIoU (classes present) on a random ``holdout`` share of the
    training points, fitted on the rest (CLIP's linear-probe protocol: chosen per backbone, never on the eval
    scans); ties go to the stronger one. Returns (l2, {l2: held-out mIoU})."""
    from sal_ros.eval.confusion import ConfusionMatrix

    held = np.random.default_rng(seed).random(len(y)) < holdout
    scores = {}
    for l2 in L2_GRID:
        predict, _ = linear_probe(x[~held], y[~held], num_classes, max_iter, l2, seed)
        conf = ConfusionMatrix(num_classes)
        conf.add(predict(x[held]), y[held])
        iou = _iou(conf.conf)
        scores[l2] = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    best = max(scores.values())
    return max(l2 for l2, v in scores.items() if v >= best - 1e-9), scores


def labelled_features(features, frames, label_set, visible_only: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame (features, class) of its labelled points (camera-visible ones when ``visible_only``)."""
    from sal_ros.core.camera import in_camera_frustum

    out = []
    for frame in frames:
        cls, _ = label_set.split(frame.gt_labels)
        keep = (cls > 0) & (in_camera_frustum(frame) if visible_only else True)
        intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
        out.append((features(frame.points, intensity)[keep], cls[keep]))
    return out


def probe(features, frames_train, frames_eval, label_set, steps: int, seed: int, visible_only: bool,
          l2: float | None = None):
    return score_probe(labelled_features(features, frames_train, label_set, visible_only),
                       labelled_features(features, frames_eval, label_set, visible_only), label_set, steps, seed, l2)


def score_probe(train, evals, label_set, steps: int, seed: int, l2: float | None = None) -> dict:
    """Train the linear probe on ``train`` [(x, y)] (L2 strength ``l2``, or ``select_l2``'s) and score it on
    ``evals``."""
    from sal_ros.eval.confusion import ConfusionMatrix

    x, y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    held_out = None
    if l2 is None:
        l2, held_out = select_l2(x, y, label_set.num_classes, steps, seed)
    predict, final_loss = linear_probe(x, y, label_set.num_classes, steps, l2, seed)
    conf = ConfusionMatrix(label_set.num_classes)
    for x, y in evals:
        conf.add(predict(x), y)
    iou = _iou(conf.conf)
    present = iou[~np.isnan(iou)]
    return {"miou": conf.miou(), "miou_present": float(present.mean()) if present.size else float("nan"),
            "accuracy": conf.accuracy(), "train_loss": final_loss, "l2": l2,
            "l2_held_out_miou": None if held_out is None else {str(k): v for k, v in held_out.items()},
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
    from sal_ros.data.labels import get_label_set
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
    seeds = _scans(args.seeds) if args.seeds else [args.seed]

    def data(net):  # the frozen backbone runs once; every seed's probe reuses its features
        feats = _Features(net, config)
        return tuple(labelled_features(feats, [frames[s] for s in scans], label_set, not args.all_points)
                     for scans in (train_scans, eval_scans))

    pretrained = data(backbone)
    per_seed = {}
    for seed in seeds:
        torch.manual_seed(seed)  # the random baseline backbone of this seed
        random = data(build_backbone(config))
        per_seed[seed] = {name: score_probe(*d, label_set, args.steps, seed, args.l2)
                          for name, d in (("pretrained", pretrained), ("random", random))}
        for name, row in per_seed[seed].items():
            print(f"seed {seed} {name}: mIoU {100 * row['miou']:.1f} (present classes {100 * row['miou_present']:.1f})",
                  file=sys.stderr)
    rows = per_seed[seeds[0]]
    result = {"backbone": str(args.backbone), "kind": what, "family": config.backbone, "dataset": str(args.dataset),
              "train_scans": train_scans, "eval_scans": eval_scans, "max_iter": args.steps,
              "points": "all labelled" if args.all_points else "camera-visible", "seeds": seeds,
              "spread": spread(per_seed), **rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "probe.json", json.dumps(result, indent=2) + "\n")
    atomic_write(args.out / "probe.md", markdown(result))
    plot(result, args.out / "per_class.png")
    print(f"linear probe mIoU ({result['points']} points of scans {eval_scans}): pretrained "
          f"{100 * rows['pretrained']['miou']:.1f}, random backbone {100 * rows['random']['miou']:.1f} (present classes: "
          f"{100 * rows['pretrained']['miou_present']:.1f} vs {100 * rows['random']['miou_present']:.1f}) -> "
          f"{args.out / 'probe.md'}")
    if len(seeds) > 1:
        sp = result["spread"]
        print("over seeds " + ",".join(map(str, seeds)) + ": present-class mIoU " + ", ".join(
            f"{name} {100 * m['mean']:.1f} ({100 * m['min']:.1f}-{100 * m['max']:.1f})"
            for name, m in ((n, sp[n]["miou_present"]) for n in ("pretrained", "random"))))
    return 0


SUMMARY = ("miou", "miou_present", "accuracy")


def spread(per_seed: dict) -> dict:
    """{backbone: {metric: {"mean", "min", "max", "values"}}} over the seeds."""
    out = {}
    for name in ("pretrained", "random"):
        out[name] = {}
        for key in SUMMARY:
            values = [float(rows[name][key]) for rows in per_seed.values()]
            out[name][key] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "values": values}
    return out


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(result: dict) -> str:
    p, r = result["pretrained"], result["random"]
    lines = ["# Linear probe", "", f"- backbone: {result['backbone']} ({result['kind']}, {result['family']})",
             f"- train scans {result['train_scans']} ({p['train_points']} points), eval scans {result['eval_scans']} "
             f"({p['eval_points']} points), {result['points']} points, linear probe by L-BFGS (at most {result['max_iter']} iterations), "
             f"L2 {p['l2']:g} (pretrained) / {r['l2']:g} (random)", "",
             "mIoU: mean over the 19 classes, an absent class scoring 0 (semantic-kitti-api); present: over the "
             "classes in the eval scans' ground truth or predictions.", "",
             "| backbone | mIoU | mIoU present | accuracy |", "|---|---|---|---|",
             f"| pretrained | {_pct(p['miou'])} | {_pct(p['miou_present'])} | {_pct(p['accuracy'])} |",
             f"| random init | {_pct(r['miou'])} | {_pct(r['miou_present'])} | {_pct(r['accuracy'])} |", "", "| class | pretrained IoU | random IoU |",
             "|---|---|---|"]
    lines += [f"| {c} | {_pct(p['iou'][c])} | {_pct(r['iou'][c])} |" for c in p["iou"]
              if p["iou"][c] is not None or r["iou"][c] is not None]
    if len(result.get("seeds", [])) > 1:
        lines += ["", f"Over seeds {result['seeds']} (probe head and random backbone): mean (min-max)", "",
                  "| backbone | mIoU | mIoU present | accuracy |", "|---|---|---|---|"]
        for name in ("pretrained", "random"):
            cells = [f"{_pct(m['mean'])} ({_pct(m['min'])}-{_pct(m['max'])})"
                     for m in (result["spread"][name][k] for k in SUMMARY)]
            lines.append(f"| {name} | {' | '.join(cells)} |")
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


__all__ = ["linear_probe", "probe", "labelled_features", "score_probe", "select_l2", "spread", "L2_GRID", "load_backbone", "main", "add_arguments"]
