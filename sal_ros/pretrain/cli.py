"""``sal-ros pretrain --config config/pretrain_scalr_oracle.yaml [--stop-at K] [--resume]``: distill a 2D teacher
into a lidar backbone without labels (ScaLR or Seal), writing ``backbone_last.pt`` for ``train`` / ``eval probe``.

Teacher features (and superpixels) are cached per frame first (resumable), then the backbone trains.
``--cache-only`` stops after the cache; ``--backend ray [--workers N] [--ray-address ADDR]`` computes it on Ray
actors, as ``sal-ros pseudolabel`` does (a private local instance, or a running cluster).
Multi-process: ``torchrun --nproc_per_node=N -m sal_ros.cli pretrain --config ...`` (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="pretraining yaml (see config/pretrain_*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/pretrain_state.pt")
    parser.add_argument("--out", type=Path, help="override out_dir")
    parser.add_argument("--steps", type=int, help="override optim.steps (the schedule; a resume must keep it)")
    parser.add_argument("--stop-at", type=int, metavar="K", help="stop after step K of the schedule; --resume "
                        "continues it exactly as if it had not stopped")
    parser.add_argument("--device", help="override device (auto | cpu | cuda)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cache-only", action="store_true", help="write the teacher cache, then stop")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="teacher cache: in this process, or on Ray actors")
    parser.add_argument("--workers", type=int, default=1, help="--backend ray: actors computing the cache")
    parser.add_argument("--ray-address", metavar="ADDR", help="--backend ray: join a running cluster, 'auto' or "
                        "HOST:PORT (default $RAY_ADDRESS, else a private local instance)")


def resolve(cfg, base: Path, out: Path | None) -> None:
    """Paths in the config are relative to its folder; --out to the working directory."""
    cfg.out_dir = str(out) if out else str(base / cfg.out_dir)
    cfg.sources = [{"frames": s} if isinstance(s, str) else dict(s) for s in cfg.sources]
    for s in cfg.sources:
        s["frames"] = str(base / s["frames"])
    if cfg.cache_dir:
        cfg.cache_dir = str(base / cfg.cache_dir)


def cache_spec(cfg) -> dict:
    """What the teacher cache is made of, as JSON (sal_ros.pretrain.cache.cache_tools builds it in every worker)."""
    spec = {"teacher": cfg.teacher, "superpixels": cfg.superpixels, "lift": cfg.lift, "label_set": cfg.label_set}
    if temporal_gap(cfg):
        spec["pose_frame"] = cfg.seal.pose_frame
    return spec


def temporal_gap(cfg) -> int:
    return cfg.seal.temporal_gap if cfg.objective == "seal" and cfg.seal.temporal_weight > 0 else 0


def prepare(cfg, dist_rank: int = 0, dist_world: int = 1, progress: bool = True, backend: str = "local",
            workers: int = 1, ray_address: str | None = None):
    """Frame sources, teacher, cache (this rank's share), data; returns ``(PretrainData, teacher)``."""
    from sal_ros.data.sources import FrameSource
    from sal_ros.pretrain.cache import build_cache, build_cache_ray, cache_tools, frame_poses
    from sal_ros.pretrain.data import PretrainData

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
    spec, gap = cache_spec(cfg), temporal_gap(cfg)
    cache_dir = Path(cfg.cache_dir or Path(cfg.out_dir) / "teacher_cache")
    teacher = None
    for source, keys in per_source:
        tools = cache_tools(spec, source.kind)
        teacher = tools.teacher
        poses, why = frame_poses(source, cfg.seal.pose_frame) if gap else ({}, None)
        if why and dist_rank == 0:  # said once per source, by the main process
            log.warning("Seal temporal term: %s: %s; those scans train without it (temporal_unpaired in "
                        "metrics.jsonl counts them per step)", source.path, why)
        mine = keys[dist_rank::dist_world]
        if backend == "ray":
            stats = build_cache_ray(source, mine, cache_dir, spec, tools.settings, poses, workers, ray_address,
                                    progress)
        else:
            stats = build_cache(source, mine, cache_dir, teacher, tools.settings, tools.superpixels, tools.lift,
                                poses, progress)
        on = f"; {stats['workers']} Ray workers" if "workers" in stats else ""
        print(f"teacher cache {source.path.name} (process {dist_rank}): {stats['computed']} computed, "
              f"{stats['reused']} reused{on}")
    data = PretrainData(items, cache_dir, gap, cfg.seal.match_radius, cfg.augment)
    return data, teacher


def main(args: argparse.Namespace) -> int:
    from sal_ros.pretrain.trainer import PretrainConfig, PretrainTrainer
    from sal_ros.train.loop import ResumeError

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
        if not args.resume and not args.cache_only and (out / "pretrain_state.pt").exists():
            raise ValueError(f"{out} already holds a run; pass --resume or choose another --out")
        if (args.ray_address or args.workers != 1) and args.backend != "ray":
            raise ValueError("--ray-address and --workers need --backend ray (the local cache runs in this process)")
        cache_opts = dict(backend=args.backend, workers=args.workers, ray_address=args.ray_address)
        data, teacher = _prepare_distributed(cfg, not args.no_progress, cache_opts)
        if args.cache_only:
            print(f"teacher cache ready: {len(data)} frames in {data.cache_dir}")
            return 0
        trainer = PretrainTrainer(cfg, data, teacher.dim, progress=not args.no_progress)
        if args.resume:
            step = trainer.resume()
            if trainer.dist.main:
                print(f"resumed at step {step}" if step else f"nothing to resume in {out}; starting at step 0")
    except (SensorDataError, FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:  # Ray: RuntimeError
        kind = "resume" if isinstance(exc, ResumeError) else "config"
        print(f"sal-ros pretrain ({kind}): {exc}", file=sys.stderr)
        return 1
    trainer.fit(args.stop_at)
    if trainer.dist.main:
        left = f" of {cfg.optim.steps} (--resume continues)" if trainer.step < cfg.optim.steps else ""
        print(f"done: {trainer.step} steps{left} -> {out / 'backbone_last.pt'}, metrics {out / 'metrics.jsonl'}, "
              f"curves {out / 'curves.png'}")
    return 0


def _prepare_distributed(cfg, progress: bool, cache_opts: dict):
    """Each torchrun process caches its share of the frames; all wait for the whole cache before training."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        data, teacher = prepare(cfg, 0, 1, progress, **cache_opts)
    else:
        import torch.distributed as tdist

        from sal_ros.train.loop import init_distributed, resolve_device

        dist = init_distributed(resolve_device(cfg.device))
        data, teacher = prepare(cfg, dist.rank, dist.world, progress and dist.main, **cache_opts)
        tdist.barrier()
    if temporal_gap(cfg) and int(os.environ.get("RANK", "0")) == 0:
        pairs = data.temporal_pairs()
        print(f"Seal temporal term: {pairs['paired']} of {pairs['scans']} scans pair with scan t+"
              f"{temporal_gap(cfg)} ({pairs['no_partner']} have no such scan, {pairs['no_pose']} no pose)")
    return data, teacher
