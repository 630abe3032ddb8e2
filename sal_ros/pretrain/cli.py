"""``sal-ros pretrain --config config/pretrain_scalr_oracle.yaml [--stop-at K] [--resume]``: distill a 2D teacher
into a lidar backbone without labels (ScaLR or Seal), writing ``backbone_last.pt`` for ``train`` / ``eval probe``.

Teacher features (and superpixels) are cached per frame first (resumable), then the backbone trains.
Multi-process: ``torchrun --nproc_per_node=N -m sal_ros.cli pretrain --config ...`` (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="pretraining yaml (see config/pretrain_*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/pretrain_state.pt")
    parser.add_argument("--out", type=Path, help="override out_dir")
    parser.add_argument("--steps", type=int, help="override optim.steps (the schedule; a resume must keep it)")
    parser.add_argument("--stop-at", type=int, metavar="K", help="stop after step K of the schedule; --resume "
                        "continues it exactly as if it had not stopped")
    parser.add_argument("--device", help="override device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")


def resolve(cfg, base: Path, out: Path | None) -> None:
    """Paths in the config are relative to its folder; --out to the working directory."""
    cfg.out_dir = str(out) if out else str(base / cfg.out_dir)
    cfg.sources = [{"frames": s} if isinstance(s, str) else dict(s) for s in cfg.sources]
    for s in cfg.sources:
        s["frames"] = str(base / s["frames"])
    if cfg.cache_dir:
        cfg.cache_dir = str(base / cfg.cache_dir)


def prepare(cfg, dist_rank: int = 0, dist_world: int = 1, progress: bool = True):
    """Frame sources, teacher, cache (this rank's share), data; returns ``(PretrainData, teacher)``."""
    from dataclasses import fields

    from sal_ros.pretrain.cache import build_cache, semantickitti_poses
    from sal_ros.pretrain.data import PretrainData
    from sal_ros.pretrain.teachers import build_teacher
    from sal_ros.pseudolabel.engine import FrameSource
    from sal_ros.pseudolabel.lifting import LiftConfig, lidar_spacing_for
    from sal_ros.pseudolabel.mask_sources import build_mask_source, mask_source_identity

    if not cfg.sources:
        raise ValueError("the config names no sources (sources: [{frames: PATH}])")
    items, per_source = [], []
    for s in cfg.sources:
        source = FrameSource(s["frames"])
        keys = source.keys()
        if s.get("keys"):
            wanted = [str(k) for k in s["keys"]]
            missing = sorted(set(wanted) - set(keys))
            if missing:
                raise SensorDataError(f"{s['frames']}: no frames {missing}")
            keys = wanted
        per_source.append((source, keys))
        items += [(source, k) for k in keys]
    lift_opts = {k: v for k, v in cfg.lift.items() if k in {f.name for f in fields(LiftConfig)}}
    label_lut, num_classes = None, 0
    if (cfg.teacher or {}).get("kind") == "oracle":
        from sal_ros.eval.labels import get_label_set

        labels = get_label_set(cfg.label_set)
        label_lut, num_classes = labels.lut, labels.num_classes
    teacher = None
    cache_dir = Path(cfg.cache_dir or Path(cfg.out_dir) / "teacher_cache")
    for source, keys in per_source:
        lift = LiftConfig(**{**lift_opts, "lidar_spacing_deg": tuple(lift_opts.get(
            "lidar_spacing_deg", lidar_spacing_for(source.kind)))})
        teacher = build_teacher(cfg.teacher, label_lut, num_classes, lift)
        superpixels = None
        if cfg.superpixels:
            sp = dict(cfg.superpixels)
            superpixels = build_mask_source(sp.pop("kind"), **sp)
        settings = {"teacher": teacher.identity, "lift": vars(lift),
                    "superpixels": mask_source_identity(superpixels) if superpixels else None}
        poses = semantickitti_poses(source.path) if source.kind == "semantickitti" else {}
        build_cache(source, keys[dist_rank::dist_world], cache_dir, teacher, settings, superpixels, lift, poses,
                    progress)
    gap = cfg.seal.temporal_gap if cfg.objective == "seal" and cfg.seal.temporal_weight > 0 else 0
    data = PretrainData(items, cache_dir, gap, cfg.seal.match_radius, cfg.augment)
    return data, teacher


def main(args: argparse.Namespace) -> int:
    from sal_ros.pretrain.trainer import PretrainConfig, PretrainTrainer
    from sal_ros.train.trainer import ResumeError

    try:
        cfg = PretrainConfig.from_yaml(args.config)
        resolve(cfg, args.config.parent, args.out)
        if args.steps:
            cfg.optim.steps = args.steps
        if args.device:
            cfg.device = args.device
        if args.stop_at is not None and not 1 <= args.stop_at <= cfg.optim.steps:
            raise ValueError(f"--stop-at {args.stop_at} is outside the schedule's steps 1..{cfg.optim.steps}")
        out = Path(cfg.out_dir)
        if not args.resume and (out / "pretrain_state.pt").exists():
            raise ValueError(f"{out} already holds a run; pass --resume or choose another --out")
        data, teacher = _prepare_distributed(cfg, not args.no_progress)
        trainer = PretrainTrainer(cfg, data, teacher.dim, progress=not args.no_progress)
        if args.resume:
            step = trainer.resume()
            if trainer.dist.main:
                print(f"resumed at step {step}" if step else f"nothing to resume in {out}; starting at step 0")
    except (SensorDataError, FileNotFoundError, ValueError, KeyError) as exc:  # ResumeError is a ValueError
        kind = "resume" if isinstance(exc, ResumeError) else "config"
        print(f"sal-ros pretrain ({kind}): {exc}", file=sys.stderr)
        return 1
    trainer.fit(args.stop_at)
    if trainer.dist.main:
        left = f" of {cfg.optim.steps} (--resume continues)" if trainer.step < cfg.optim.steps else ""
        print(f"done: {trainer.step} steps{left} -> {out / 'backbone_last.pt'}, metrics {out / 'metrics.jsonl'}, "
              f"curves {out / 'curves.png'}")
    return 0


def _prepare_distributed(cfg, progress: bool):
    """Each torchrun process caches its share of the frames; all wait for the whole cache before training."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return prepare(cfg, 0, 1, progress)
    import torch.distributed as tdist

    from sal_ros.train.trainer import init_distributed, resolve_device

    dist = init_distributed(resolve_device(cfg.device))
    data, teacher = prepare(cfg, dist.rank, dist.world, progress and dist.main)
    tdist.barrier()
    return data, teacher
