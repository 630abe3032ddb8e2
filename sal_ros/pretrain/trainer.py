"""Label-free backbone pretraining by 2D-to-3D distillation: ``scalr`` or ``seal`` (see sal_ros.pretrain.losses).

The run is train's (sal_ros.train.loop ``TrainingRun``): AdamW, warm-up + cosine, gradient clipping, the
step-indexed batches (``batch_indices``), torchrun DDP, metrics.jsonl + curves.png, the training state with every
RNG (torch, CUDA, numpy, python) and the resume refusal on a changed config. Every random draw of a step
(augmentation, segment subsets) comes from a generator seeded by (seed, step); the state file holds only tensors
and plain data and loads with ``torch.load(weights_only=True)``. Stopping at step k and resuming gives the
uninterrupted run's weights bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sal_ros.core.settings import known_settings
from sal_ros.pretrain.losses import (info_nce, point_to_segment, rarity_weights, scalr_loss, segment_mean,
                                     subsample)
from sal_ros.eval.report import atomic_savefig
from sal_ros.model.backbone import build_backbone
from sal_ros.model.config import ModelConfig
from sal_ros.model.pretrained import read_backbone, save_backbone
from sal_ros.model.sal import SALModel
from sal_ros.train.loop import (OptimConfig, TrainingRun, all_reduce_sum, apply_gradients, batch_indices, fit_steps,
                                read_metrics)

STATE_FILE = "pretrain_state.pt"
OBJECTIVES = ("scalr", "seal")


@dataclass
class SealConfig:
    temperature: float = 0.07  # SLidR / Seal
    spatial_weight: float = 1.0  # superpixel-superpoint InfoNCE
    temporal_weight: float = 1.0  # superpoint at t vs its points' nearest neighbours at t+n (poses)
    temporal_gap: int = 1  # n
    match_radius: float = 0.3  # metres: farther neighbours at t+n are no match
    pose_frame: str = "odom"  # bags: the lidar pose at each cloud stamp in this frame of /tf (odom, map)
    segment_weight: float = 0.1  # point-to-segment regularisation
    max_segments: int = 1024  # per batch, for the contrast (random subset above)


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    objective: str = "scalr"  # scalr | seal
    model: dict = field(default_factory=lambda: {"preset": "waffleiron_tiny"})
    sources: list = field(default_factory=list)  # [{"frames": path, "keys": [...] (optional)}]
    teacher: dict = field(default_factory=lambda: {"kind": "random"})  # dinov2 | clip | random | oracle (+ options)
    superpixels: dict | None = None  # seal: {"kind": slic | sam | sam2, **mask source options}
    lift: dict = field(default_factory=dict)  # sal_ros.pseudolabel.lifting.LiftConfig fields (occlusion test)
    cache_dir: str | None = None  # default out_dir/teacher_cache
    label_set: str = "semantickitti"  # the oracle teacher's classes
    augment: bool = True
    max_pairs: int = 0  # scalr: point-pixel pairs per cloud (random subset; 0 = all)
    pair_balance: float = 0.0  # scalr: pair weight density**-power per scan (losses.rarity_weights); 0 = plain mean
    seal: SealConfig = field(default_factory=SealConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(amp=False))
    checkpoint_every: int = 50
    log_every: int = 1
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        d = known_settings(cls, d, "pretraining")
        for name, sub in (("seal", SealConfig), ("optim", OptimConfig)):
            values = known_settings(sub, d.get(name), name)
            if "betas" in values:
                values["betas"] = tuple(values["betas"])
            d[name] = sub(**values) if name == "seal" else sub(**{"amp": False, **values})
        cfg = cls(**d)
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(OBJECTIVES)}")
        if cfg.objective == "seal" and not cfg.superpixels:
            raise ValueError("objective seal needs superpixels: {kind: slic | sam | sam2, ...}")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PretrainConfig":
        from sal_ros.core.yamlfile import load_yaml

        return cls.from_dict(load_yaml(path, "pretrain config") or {})

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def model_config(self):
        cfg = dict(self.model or {})
        preset = cfg.pop("preset", None)
        return ModelConfig.preset(preset, **cfg)


# ---------------------------------------------------------------------------------------------- model
class PretrainModel(nn.Module):
    """Backbone + linear projection to the teacher's width; ``forward`` gives per-point unit features."""

    def __init__(self, config, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.head = nn.Linear(self.backbone.out_widths[1], out_dim)

    def point_backbone_features(self, points, intensity) -> list[torch.Tensor]:
        """Per cloud (N_b, C) stride-1 backbone features of each point (its voxel's)."""
        vin = SALModel.prepare(self, points, intensity)
        fine = self.backbone(vin.voxels)[1].feats
        offsets = np.cumsum([0] + vin.num_voxels[:-1])
        return [fine[int(off) + p2v] for off, p2v in zip(offsets, vin.point_to_voxel)]

    def point_features(self, points, intensity):  # SALModel.prepare calls this name for the input features

        return SALModel.point_features(self, points, intensity)

    def forward(self, points, intensity) -> list[torch.Tensor]:
        return [F.normalize(self.head(f), dim=1) for f in self.point_backbone_features(points, intensity)]


# ---------------------------------------------------------------------------------------------- trainer
class PretrainTrainer(TrainingRun):
    STATE_FILE = STATE_FILE
    LAST_FILE = "backbone_last.pt"

    def __init__(self, cfg: PretrainConfig, data, teacher_dim: int, progress: bool = True) -> None:
        super().__init__(cfg, progress)
        self.data = data
        self.model_config = cfg.model_config()
        self.attach(PretrainModel(self.model_config, teacher_dim))

    # -- files: backbone_stepNNNNNNN.pt (backbone and head), then the training state naming it
    def checkpoint_path(self, step: int) -> Path:
        return self.out / f"backbone_step{step:07d}.pt"

    def write_weights(self, path: Path) -> None:
        save_backbone(path, self.module.backbone, self.model_config, self.module.head,
                      extra={"step": self.step, "pretrain_config": self.cfg.to_dict()})

    def read_weights(self, path: Path) -> None:
        payload = read_backbone(path)
        self.module.backbone.load_state_dict(payload["backbone"])
        self.module.head.load_state_dict(payload["head"])

    # -- one step
    def train_step(self) -> dict:
        cfg, dist = self.cfg, self.dist
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        picks = batch_indices(self.step, cfg.optim.batch_size, dist, len(self.data), cfg.seed)
        samples = [self.data.sample(index, gen) for _, index in picks]
        frames = [s.frame for s in samples] + [s.partner for s in samples if s.partner is not None]
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = self.model([torch.from_numpy(f.points).to(self.device) for f in frames],
                               [torch.from_numpy(f.intensity).to(self.device) for f in frames])
        feats = [f.float() for f in feats]
        terms = self.losses(samples, frames, feats, gen)
        loss = sum(terms.values())
        lr, grad_norm = apply_gradients(self.module, self.optimizer, self.scheduler, loss, cfg.optim.grad_clip)
        self.step += 1
        stats = all_reduce_sum(torch.tensor([float(loss.detach()), *[float(v.detach()) for v in terms.values()]],
                                            device=self.device), dist) / dist.world
        rec = {"step": self.step, "loss": float(stats[0]),
               **{f"loss_{k}": float(v) for k, v in zip(terms, stats[1:])},
               "lr": lr, "grad_norm": float(grad_norm), "points": int(sum(len(f.points) for f in frames))}
        if cfg.objective == "seal" and cfg.seal.temporal_weight > 0:  # scans without frame t+n or poses: counted
            unpaired = torch.tensor([float(sum(s.partner is None for s in samples))], device=self.device)
            rec["temporal_unpaired"] = int(all_reduce_sum(unpaired, dist)[0])
        return rec

    def losses(self, samples, frames, feats, gen) -> dict:
        if self.cfg.objective == "scalr":
            return {"scalr": self._scalr(frames, feats, gen)}
        return self._seal(samples, frames, feats, gen)

    def _scalr(self, frames, feats, gen) -> torch.Tensor:
        point_rows, targets, weights = [], [], []
        for f, x in zip(frames, feats):
            scan_targets = []
            for cam in f.cameras:
                keep = subsample(len(cam["index"]), self.cfg.max_pairs, gen).numpy()
                point_rows.append(x[torch.from_numpy(cam["index"][keep].astype(np.int64)).to(x.device)])
                scan_targets.append(torch.from_numpy(cam["fmap"][cam["cell"][keep]].astype(np.float32)))
            if scan_targets and self.cfg.pair_balance > 0:  # densities per scan, over all its cameras
                weights.append(rarity_weights(torch.cat(scan_targets), self.cfg.pair_balance))
            targets += scan_targets
        if not point_rows:
            return feats[0].sum() * 0.0
        w = torch.cat(weights).to(self.device) if weights else None
        return scalr_loss(torch.cat(point_rows), torch.cat(targets).to(self.device), w)

    def _seal(self, samples, frames, feats, gen) -> dict:
        sc = self.cfg.seal
        device = self.device
        point_means, pixel_means, reg = [], [], []
        for f, x in zip(frames, feats):  # superpixel-superpoint contrast and point-to-segment, every cloud
            for cam in f.cameras:
                seg = cam["segment"]
                ok = seg >= 0
                if not ok.any():
                    continue
                ids, local = np.unique(seg[ok], return_inverse=True)
                rows = x[torch.from_numpy(cam["index"][ok].astype(np.int64)).to(device)]
                local_t = torch.from_numpy(local.astype(np.int64)).to(device)
                means = segment_mean(rows, local_t, len(ids))
                point_means.append(means)
                pixel_means.append(torch.from_numpy(cam["segfeats"][ids].astype(np.float32)))
                reg.append(point_to_segment(rows, local_t, means))
        zero = feats[0].sum() * 0.0
        terms = {"spatial": zero, "segment": zero, "temporal": zero}  # same keys every step (logs, all-reduce)
        if point_means:
            a, b = torch.cat(point_means), torch.cat(pixel_means).to(device)
            keep = subsample(len(a), sc.max_segments, gen).to(device)
            terms["spatial"] = sc.spatial_weight * info_nce(a[keep], b[keep], sc.temperature)
            terms["segment"] = sc.segment_weight * torch.stack(reg).mean()
        t_a, t_b = [], []
        n = len(samples)
        partner_rows = iter(range(n, len(frames)))
        for i, s in enumerate(samples):  # superpoint at t vs the same points' nearest neighbours at t+n
            if s.partner is None:
                continue
            j = next(partner_rows)
            for cam in s.frame.cameras:
                seg, idx = cam["segment"], cam["index"]
                match = s.matches[idx]
                ok = (seg >= 0) & (match >= 0)
                if not ok.any():
                    continue
                ids, local = np.unique(seg[ok], return_inverse=True)
                local_t = torch.from_numpy(local.astype(np.int64)).to(device)
                t_a.append(segment_mean(feats[i][torch.from_numpy(idx[ok].astype(np.int64)).to(device)], local_t,
                                        len(ids)))
                t_b.append(segment_mean(feats[j][torch.from_numpy(match[ok]).to(device)], local_t, len(ids)))
        if t_a and sc.temporal_weight > 0:
            a, b = torch.cat(t_a), torch.cat(t_b)
            keep = subsample(len(a), sc.max_segments, gen).to(device)
            terms["temporal"] = sc.temporal_weight * info_nce(a[keep], b[keep], sc.temperature)
        return terms

    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Pretrain until step ``stop_at`` of the schedule (default: its end), as ``train`` does."""
        return fit_steps(self, stop_at, f"pretrain {self.cfg.objective}", plot_curves)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Loss terms (a term is drawn only at the steps it ran: Seal's temporal term needs a frame t+n) and the
    learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs = read_metrics(metrics_path)
    if not recs:
        return
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in recs[-1] if k.startswith("loss")]:
        pts = [(r["step"], r[key]) for r in recs if r.get(key, 0) > 0]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=2 if key == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("pretraining loss terms")
    ax.legend(fontsize=8)
    ax_lr.plot([r["step"] for r in recs], [r["lr"] for r in recs])
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    try:
        atomic_savefig(fig, png_path)
    finally:
        plt.close(fig)


__all__ = ["PretrainConfig", "SealConfig", "PretrainModel", "PretrainTrainer", "OBJECTIVES", "STATE_FILE"]
