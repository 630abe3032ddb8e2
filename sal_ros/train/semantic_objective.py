"""``objective: semantic``: train a semantic student (``model.semantic_model.SemanticModel``) on per-point classes, with
SAM2-AMML's mask-consistency loss as an option.

Loss = cross-entropy on labelled points (label 0 = ignore: unlabelled, or filtered pseudo-labels)
     + ``semantic.consistency`` x mask consistency: for every 2D mask lifted onto the points (a SAM / SAM 2 mask, or
       an oracle ground-truth segment), the predicted class distributions of its points are pulled towards their
       mean: mean over masked points of KL(mean || p_i), the mean held fixed (a consensus target, as a teacher
       would give). It needs no class labels, so it spreads the few labels over whole objects.

Sources (``sources`` of the training yaml, paths relative to it):

- ``{frames: F, semantic_pseudolabels: DIR}``: ``sal-ros pseudolabel --semantic`` output (kept labels);
- ``{frames: F, oracle: semantickitti, label_fraction: 0.05}``: ground-truth classes on a seeded random share of
  the frustum's points (the rest unlabelled): SAM2-AMML's "labels on a small fraction";
- either with ``masks: oracle`` (ground-truth segments: thing instances, stuff classes) or ``masks: DIR`` (instance
  pseudo-labels of ``sal-ros pseudolabel``: SAM / SAM 2 masks lifted) for the consistency loss.

Settings (``semantic:`` of the yaml): ``class_names`` (default: the label set's or the pseudo-labels'),
``consistency`` (weight, 0 = off), ``min_mask_points``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sal_ros.core.camera import in_camera_frustum
from sal_ros.core.errors import SensorDataError
from sal_ros.data.labels import get_label_set, vocabulary_lut
from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path
from sal_ros.data.pseudolabels import load_semantic
from sal_ros.data.sources import iter_source_frames
from sal_ros.model.config import ModelConfig
from sal_ros.model.semantic_model import SemanticModel
from sal_ros.train.augment import augment
from sal_ros.train.loop import all_reduce_sum, apply_gradients, batch_indices
from sal_ros.train.trainer import Trainer

SEMANTIC_DEFAULTS = {"class_names": None, "consistency": 0.0, "min_mask_points": 2}


@dataclass
class SemanticScan:
    key: str
    points: np.ndarray  # (N, 3) float32
    intensity: np.ndarray  # (N,) float32
    label: np.ndarray  # (N,) int64, 0 = ignore, k = class_names[k - 1]
    mask: np.ndarray  # (N,) int64, lifted 2D mask id, 0 = none
    in_frustum: np.ndarray  # (N,) bool
    gt: np.ndarray | None = None  # (N,) int64 ground-truth class (evaluation only), when known
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # Trainer's token-dim probe


def settings(cfg) -> dict:
    s = {**SEMANTIC_DEFAULTS, **(cfg.semantic or {})}
    unknown = set(s) - set(SEMANTIC_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown semantic settings {sorted(unknown)}; known: {sorted(SEMANTIC_DEFAULTS)}")
    return s


def _oracle_masks(frame, label_set) -> np.ndarray:
    sem, seg = label_set.split(frame.gt_labels)
    key = np.where(label_set.thing_mask[sem], sem * (1 << 32) + seg, sem * (1 << 32))
    ids = np.unique(key, return_inverse=True)[1].reshape(-1) + 1
    return np.where(sem > 0, ids, 0)


def load_semantic_scans(sources: list[dict], base: str | Path = ".", class_names=None,
                        seed: int = 0) -> tuple[list[SemanticScan], list[str]]:
    scans: list[SemanticScan] = []
    names = list(class_names) if class_names else None
    for src in sources:
        frames = list(iter_source_frames(Path(base) / src["frames"], src.get("bag_config")))
        label_set = get_label_set(src["oracle"]) if src.get("oracle") else None
        for frame in frames:
            gt = None
            if frame.gt_labels is not None:
                ls = label_set or get_label_set("semantickitti")
                gt = ls.split(frame.gt_labels)[0]
            if label_set is not None:
                names = names or list(label_set.class_names)
                lut = vocabulary_lut(names, label_set)  # our class k -> dataset class id
                inv = np.zeros(label_set.num_classes + 1, np.int64)
                inv[lut[1:]] = np.arange(1, len(names) + 1)
                inv[0] = 0
                inside = in_camera_frustum(frame)
                label = np.where(inside, inv[gt], 0)
                frac = float(src.get("label_fraction", 1.0))
                if frac < 1.0:
                    rng = np.random.default_rng([seed, zlib.crc32(frame.key.encode())])
                    label = np.where(rng.random(len(label)) < frac, label, 0)
            else:
                path = pseudolabel_path(Path(base) / src["semantic_pseudolabels"], frame.key)
                if not path.exists():
                    continue
                pl = load_semantic(path, frame.num_points)
                names = names or pl.class_names
                index = {n: k + 1 for k, n in enumerate(names)}
                lut = np.array([0] + [index.get(n, 0) for n in pl.class_names], np.int64)
                label, inside = lut[pl.label], pl.in_frustum
            mask = np.zeros(frame.num_points, np.int64)
            if src.get("masks") == "oracle":
                mask = np.where(inside, _oracle_masks(frame, label_set or get_label_set("semantickitti")), 0)
            elif src.get("masks"):
                mask = load_pseudolabels(pseudolabel_path(Path(base) / src["masks"], frame.key),
                                         frame.num_points).instance.astype(np.int64)
            intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
            scans.append(SemanticScan(frame.key, frame.points, np.asarray(intensity, np.float32), label, mask,
                                      np.asarray(inside, bool), gt))
    if not scans:
        raise SensorDataError(f"no semantic training scans in {[s.get('frames') for s in sources]}")
    return scans, names


class SemanticDataset:
    """Frustum crops (``data.crop``), augmented, subsampled to ``data.max_points``: pure functions of
    (seed, epoch, index) like the SAL dataset."""

    def __init__(self, scans: list[SemanticScan], data_cfg, seed: int = 0) -> None:
        self.scans, self.cfg, self.seed = scans, data_cfg, seed

    def __len__(self) -> int:
        return len(self.scans)

    def sample(self, index: int, epoch: int = 0) -> SemanticScan:
        rng = np.random.default_rng([self.seed, epoch, index])
        s = self.scans[index]
        keep = np.flatnonzero(s.in_frustum) if self.cfg.crop else np.arange(len(s.points))
        if self.cfg.max_points and keep.size > self.cfg.max_points:
            keep = np.sort(rng.choice(keep, self.cfg.max_points, replace=False))
        pts = augment(s.points[keep], self.cfg.augment, rng)
        return SemanticScan(s.key, pts, s.intensity[keep], s.label[keep], s.mask[keep], s.in_frustum[keep])


def consistency_loss(logits: torch.Tensor, mask: torch.Tensor, min_points: int = 2) -> torch.Tensor:
    """Mean over points in masks (of at least ``min_points``) of KL(mask mean distribution || point's)."""
    has = mask > 0
    if not has.any():
        return logits.sum() * 0.0
    ids, inv, counts = torch.unique(mask[has], return_inverse=True, return_counts=True)
    logp = F.log_softmax(logits[has].float(), -1)
    p = logp.exp()
    mean = torch.zeros(len(ids), p.shape[1], device=p.device).index_add_(0, inv, p) / counts[:, None]
    mean = mean.detach()[inv]
    big = counts[inv] >= min_points
    if not big.any():
        return logits.sum() * 0.0
    kl = (mean * (mean.clamp_min(1e-8).log() - logp)).sum(-1)
    return kl[big].mean()


def semantic_loss(logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, consistency: float,
                  min_mask_points: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    labelled = label > 0
    ce = F.cross_entropy(logits[labelled].float(), label[labelled] - 1) if labelled.any() else logits.sum() * 0.0
    cons = consistency_loss(logits, mask, min_mask_points) if consistency > 0 else logits.sum() * 0.0
    return ce + consistency * cons, {"ce": ce.detach(), "consistency": cons.detach()}


class SemanticTrainer(Trainer):
    """The Trainer's schedule, checkpoints, resume and DDP; the step trains the class head."""

    def train_step(self) -> dict:
        cfg, dist = self.cfg, self.dist
        s = settings(cfg)
        samples = [self.dataset.sample(i, e) for e, i in
                   batch_indices(self.step, cfg.optim.batch_size, dist, len(self.dataset), cfg.seed)]
        self.model.train()
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model([torch.from_numpy(x.points).to(dev) for x in samples],
                                [torch.from_numpy(x.intensity).to(dev) for x in samples])
        total, terms = 0.0, {"ce": 0.0, "consistency": 0.0}
        for lg, x in zip(logits, samples):
            loss, parts = semantic_loss(lg, torch.from_numpy(x.label).to(dev), torch.from_numpy(x.mask).to(dev),
                                        float(s["consistency"]), int(s["min_mask_points"]))
            total = total + loss / len(samples)
            terms = {k: terms[k] + float(v) / len(samples) for k, v in parts.items()}
        lr, grad_norm = apply_gradients(self.module, self.optimizer, self.scheduler, total, cfg.optim.grad_clip)
        self.step += 1
        stats = all_reduce_sum(torch.tensor([float(total.detach()), terms["ce"], terms["consistency"]]), dist) / dist.world
        return {"step": self.step, "loss": float(stats[0]), "loss_ce": float(stats[1]),
                "loss_consistency": float(stats[2]), "lr": lr, "grad_norm": float(grad_norm),
                "points": int(sum(len(x.points) for x in samples))}


def build_trainer(cfg, base: Path, progress: bool = True) -> SemanticTrainer:
    """Scans, class names (recorded in the config, so checkpoints carry them) and the trainer."""
    s = settings(cfg)
    scans, names = load_semantic_scans(cfg.sources, base, s["class_names"], cfg.seed)
    cfg.semantic = {**s, "class_names": list(names)}
    model_cfg = dict(cfg.model or {})
    preset = model_cfg.pop("preset", None)
    config = ModelConfig.preset(preset, **model_cfg)
    torch.manual_seed(cfg.seed)
    return SemanticTrainer(cfg, SemanticDataset(scans, cfg.data, cfg.seed), progress=progress,
                           model=SemanticModel(config, names))
