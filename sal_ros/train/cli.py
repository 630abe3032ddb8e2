"""``sal-ros train --config config/train_tiny.yaml [--resume]``: distill the SAL model on pseudo-labels.

Multi-GPU / multi-process: ``torchrun --nproc_per_node=N -m sal_ros.cli train --config ...`` (gloo on CPU,
nccl on CUDA); ``optim.batch_size`` is per process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="training yaml (see config/train_tiny.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/train_state.pt")
    parser.add_argument("--out", type=Path, help="override out_dir")
    parser.add_argument("--steps", type=int, help="override optim.steps")
    parser.add_argument("--device", help="override device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from sal_ros.train.dataset import DistillDataset, load_scans
    from sal_ros.train.trainer import TrainConfig, Trainer

    try:
        cfg = TrainConfig.from_yaml(args.config)
        # paths in the config are relative to its folder; --out to the working directory
        cfg.out_dir = str(args.out) if args.out else str(args.config.parent / cfg.out_dir)
        if args.steps:
            cfg.optim.steps = args.steps
        if args.device:
            cfg.device = args.device
        scans = load_scans(cfg.sources, base=args.config.parent, text_encoder=cfg.text_encoder)
    except (SensorDataError, FileNotFoundError, ValueError) as exc:
        print(f"sal-ros train: {exc}", file=sys.stderr)
        return 1
    trainer = Trainer(cfg, DistillDataset(scans, cfg.data, seed=cfg.seed), progress=not args.no_progress)
    out = Path(cfg.out_dir)
    if args.resume:
        step = trainer.resume()
        print(f"resumed at step {step}" if step else f"nothing to resume in {out}; starting at step 0")
    elif (out / "train_state.pt").exists():
        print(f"sal-ros train: {out} already holds a run; pass --resume or choose another --out", file=sys.stderr)
        return 1
    trainer.fit()
    if trainer.dist.main:
        print(f"done: {trainer.step} steps -> {out / 'model_last.pt'}, metrics {out / 'metrics.jsonl'}, "
              f"curves {out / 'curves.png'}")
    return 0
