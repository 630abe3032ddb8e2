"""``sal-ros train --config config/train_tiny.yaml [--stop-at K] [--resume]``: distill the SAL model on pseudo-labels.

With a ``self_training`` section (``rounds: N``, train/selftrain.py) the finished student is then fine-tuned N
times on its own confident predictions, round r in ``out_dir/round_<r>`` (each resumable).

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
    parser.add_argument("--steps", type=int, help="override optim.steps, the schedule's length (warm-up + cosine "
                        "decay to this step); a resumed run must keep it")
    parser.add_argument("--stop-at", type=int, metavar="K",
                        help="stop after step K of the configured schedule (checkpoint saved); --resume continues "
                        "it exactly as if it had not stopped")
    parser.add_argument("--device", help="override device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from sal_ros.train.dataset import DistillDataset, load_scans
    from sal_ros.train.loop import ResumeError
    from sal_ros.train.trainer import TrainConfig, Trainer

    try:
        cfg = TrainConfig.from_yaml(args.config)
        # paths in the config are relative to its folder; --out to the working directory
        cfg.out_dir = str(args.out) if args.out else str(args.config.parent / cfg.out_dir)
        if args.steps:
            cfg.optim.steps = args.steps
        if args.device:
            cfg.device = args.device
        _check_stop_at(args.stop_at, cfg.optim.steps)
        if cfg.objective == "semantic":  # per-point classes (+ mask consistency): train/semantic_objective.py
            from sal_ros.train.semantic_objective import build_trainer
            if cfg.self_training:
                raise ValueError("self_training is for objective sal (instances and tokens)")

            trainer = build_trainer(cfg, args.config.parent, progress=not args.no_progress)
        elif cfg.objective != "sal":
            raise ValueError(f"unknown objective {cfg.objective!r}; known: sal, semantic")
        else:
            from sal_ros.train.selftrain import SelfTrainConfig

            SelfTrainConfig.from_dict(cfg.self_training)  # a bad section fails now, not after the training
            scans = load_scans(cfg.sources, base=args.config.parent, text_encoder=cfg.text_encoder, seed=cfg.seed)
    except (SensorDataError, FileNotFoundError, ValueError) as exc:
        print(f"sal-ros train: {exc}", file=sys.stderr)
        return 1
    if cfg.objective == "sal":
        trainer = Trainer(cfg, DistillDataset(scans, cfg.data, seed=cfg.seed), progress=not args.no_progress)
    out = Path(cfg.out_dir)
    if args.resume:
        try:
            step = trainer.resume()
        except ResumeError as exc:
            print(f"sal-ros train: {exc}", file=sys.stderr)
            return 1
        print(f"resumed at step {step}" if step else f"nothing to resume in {out}; starting at step 0")
    elif (out / "train_state.pt").exists():
        print(f"sal-ros train: {out} already holds a run; pass --resume or choose another --out", file=sys.stderr)
        return 1
    trainer.fit(args.stop_at)
    if trainer.dist.main:
        left = f" of {cfg.optim.steps} (--resume continues)" if trainer.step < cfg.optim.steps else ""
        print(f"done: {trainer.step} steps{left} -> {out / 'model_last.pt'}, metrics {out / 'metrics.jsonl'}, "
              f"curves {out / 'curves.png'}")
    if cfg.self_training and trainer.step == cfg.optim.steps:  # every process: the rounds train as this run did
        from sal_ros.train.selftrain import self_train

        for info in self_train(cfg, scans, out / "model_last.pt", progress=not args.no_progress):
            if trainer.dist.main:
                print(f"self-training round {info['round']}: {info['labels']['points']} new labels "
                      f"({100 * info['labels']['share_of_open']:.1f} % of the open points) -> {info['checkpoint']}")
    return 0


def _check_stop_at(stop_at: int | None, steps: int) -> None:
    if stop_at is not None and not 1 <= stop_at <= steps:
        raise ValueError(f"--stop-at {stop_at} is outside the schedule's steps 1..{steps} (optim.steps)")
