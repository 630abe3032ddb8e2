"""Distillation training (SAL): its config, the model seam and ``Trainer``, whose step trains the query decoder
and backbone on pseudo-labels. AdamW, warm-up + cosine decay, gradient clipping, AMP, checkpoints, exact resume,
the JSONL metrics log and DDP come from sal_ros.train.loop (``TrainingRun``), shared with the semantic student
and ``pretrain``; here: the config, the SAL step and its curves.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sal_ros.core.settings import known_settings
from sal_ros.eval.report import atomic_savefig
from sal_ros.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sal_ros.model.pretrained import backbone_config, check_compatible, load_backbone_into, read_backbone
from sal_ros.model.sal import ModelConfig, SALModel
from sal_ros.train.dataset import DataConfig, DistillDataset, Sample
from sal_ros.train.loop import (OptimConfig, TrainingRun, all_reduce_sum, apply_gradients, batch_indices,
                                fit_steps, read_metrics)
from sal_ros.train.losses import LossWeights, Target, sal_loss

@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    sources: list = field(default_factory=list)  # [{"frames": ..., "pseudolabels": ...}], read by the CLI
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 50
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    # CLIP text encoder whose space the tokens live in; recorded in checkpoints so evaluation and the node
    # embed prompts with the same encoder ({"model": open_clip name, "pretrained": tag or weights file}).
    text_encoder: dict = field(default_factory=lambda: {"model": "ViT-B-16", "pretrained": None})
    # "sal" (instances + CLIP tokens) or "semantic" (per-point classes, train/semantic_objective.py; settings in ``semantic``)
    objective: str = "sal"
    semantic: dict = field(default_factory=dict)
    # rounds of self-training after this run (train/selftrain.py SelfTrainConfig; empty = none)
    self_training: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = known_settings(cls, d, "training")
        d["data"] = DataConfig.from_dict(d.get("data"))
        d["loss"] = LossWeights.from_dict(d.get("loss"))
        optim = known_settings(OptimConfig, d.get("optim"), "optim")
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        d["optim"] = OptimConfig(**optim)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        from sal_ros.core.yamlfile import load_yaml

        cfg = cls.from_dict(load_yaml(path, "train config") or {})
        _resolve_pretrained(cfg.model, Path(path).parent)
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["self_training"]:  # absent as before it existed: saved runs stay resumable
            d.pop("self_training")
        return d


# ---------------------------------------------------------------------------------------------- model seam
def build_model(model_cfg: dict, token_dim: int | None = None):
    """SALModel from ``{"preset": name, **overrides}``; the token dimension follows the pseudo-labels."""
    cfg = dict(model_cfg or {})
    preset = cfg.pop("preset", None)
    pretrained = cfg.pop("pretrained_backbone", None)
    config = ModelConfig.preset(preset, **cfg)
    if token_dim is not None and config.decoder.token_dim != token_dim:
        raise ValueError(f"model token_dim {config.decoder.token_dim} but pseudo-label tokens have {token_dim} dims; "
                         f"set model.token_dim or use the text encoder the pseudo-labels were made with")
    model = SALModel(config)
    if pretrained:  # a `sal-ros pretrain` backbone (ScaLR / Seal); the decoder starts from scratch

        load_backbone_into(pretrained, model.backbone, config)
    return model


def _resolve_pretrained(model_cfg: dict, base: Path) -> None:
    """``model.pretrained_backbone`` relative to the config's folder, checked to be a backbone file that fits."""
    if not (model_cfg or {}).get("pretrained_backbone"):
        return

    path = base / model_cfg["pretrained_backbone"]
    model_cfg["pretrained_backbone"] = str(path)
    rest = {k: v for k, v in model_cfg.items() if k not in ("pretrained_backbone", "preset")}
    try:
        config = ModelConfig.preset(model_cfg.get("preset"), **rest)
        check_compatible(backbone_config(read_backbone(path)), config, path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc


def forward_layers(model, samples: list[Sample], device: torch.device) -> list[dict]:
    """Per decoder layer: {"masks": [(Q, N_b)], "objectness": [(Q, 2)], "tokens": [(Q, D)]}."""
    points = [torch.from_numpy(s.points).to(device) for s in samples]
    intensity = [torch.from_numpy(s.intensity).to(device) for s in samples]
    return model(points, intensity)


def targets_of(samples: list[Sample], device: torch.device) -> list[Target]:
    return [Target(torch.from_numpy(s.masks()).to(device), torch.from_numpy(s.tokens).to(device)) for s in samples]


def save_model(path: Path, model, extra: dict, text_encoder: dict | None = None) -> None:
    save_checkpoint(path, model, text_encoder_identity=text_encoder, extra=extra)


def load_model_weights(path: Path, model) -> dict:
    return load_checkpoint(path, model=model)[1]


# ---------------------------------------------------------------------------------------------- trainer
class Trainer(TrainingRun):
    """Owns model, optimizer, schedule and files of one run in ``cfg.out_dir``."""

    def __init__(self, cfg: TrainConfig, dataset: DistillDataset, progress: bool = True, model=None) -> None:
        super().__init__(cfg, progress)
        self.dataset = dataset
        token_dim = next((s.tokens.shape[1] for s in dataset.scans if len(s.tokens)), None)
        self.attach(model if model is not None else build_model(cfg.model, token_dim))

    # -- files
    def checkpoint_path(self, step: int) -> Path:
        return self.out / f"model_step{step:07d}.pt"

    def write_weights(self, path: Path) -> None:
        # plain JSON data only: checkpoints are read with torch.load(weights_only=True)
        extra = json.loads(json.dumps({"step": self.step, "train_config": self.cfg.to_dict()}))
        save_model(path, self.module, extra, self.cfg.text_encoder)

    def read_weights(self, path: Path) -> None:
        load_model_weights(path, self.module)

    # -- one step
    def train_step(self) -> dict:
        cfg, dist = self.cfg, self.dist
        samples = [self.dataset.sample(index, epoch)
                   for epoch, index in batch_indices(self.step, cfg.optim.batch_size, dist, len(self.dataset), cfg.seed)]
        targets = targets_of(samples, self.device)
        local = torch.tensor([float(sum(t.masks.shape[0] for t in targets))], device=self.device)
        num_masks = float(all_reduce_sum(local, dist)) / dist.world
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            layers = forward_layers(self.model, samples, self.device)
        loss, terms = sal_loss(layers, targets, cfg.loss, num_masks=num_masks, generator=gen)
        lr, grad_norm = apply_gradients(self.module, self.optimizer, self.scheduler, loss, cfg.optim.grad_clip)
        self.step += 1
        stats = torch.tensor([float(loss.detach()), *terms.values(), float(local)], device=self.device)
        stats = all_reduce_sum(stats, dist) / dist.world
        keys = ["loss", *(f"loss_{k}" for k in terms)]
        record = {"step": self.step, **{k: float(v) for k, v in zip(keys, stats[:-1])},
                  "lr": lr, "grad_norm": float(grad_norm), "instances": float(stats[-1]) * dist.world,
                  "points": int(sum(len(s.points) for s in samples))}
        return record

    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Train until step ``stop_at`` of the configured schedule (default: its end); checkpoints every N
        steps and where it stops. The schedule is not changed: resuming later continues it exactly."""
        return fit_steps(self, stop_at, "train", plot_curves)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Loss terms and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs = read_metrics(metrics_path)
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in recs[-1] if k.startswith("loss")]:
        ax.plot(steps, [r[key] for r in recs], label=key, lw=2 if key == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss (final decoder layer terms, total over layers)")
    ax.legend(fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in recs])
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    try:
        atomic_savefig(fig, png_path)
    finally:
        plt.close(fig)
