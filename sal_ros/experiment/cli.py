"""``sal-ros experiment config/experiments/mini.yaml [--quick]``: per teacher, pseudo-label the training frames and
distill a student; supervised references on the same frames; score every model on the held-out test sets; the
data-scaling curve. Writes results.json, table.md and PNGs into the experiment's out_dir; a rerun resumes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment yaml (see config/experiments/mini.yaml)")
    parser.add_argument("--quick", action="store_true", help="apply the file's quick: overrides (few steps, frames)")
    parser.add_argument("--out", type=Path, help="override out_dir")
    parser.add_argument("--steps", type=int, help="override the training steps of every model")
    parser.add_argument("--backend", choices=["local", "ray"], help="pseudo-labeling backend (default: the file's)")
    parser.add_argument("--workers", type=int, help="pseudo-labeling workers")
    parser.add_argument("--ray-address", help="join a running Ray cluster (auto or HOST:PORT)")
    parser.add_argument("--threads", type=int, help="torch threads (e.g. 1 on a shared CPU)")
    parser.add_argument("--only", choices=["main", "scaling", "students"],
                        help="one part (two processes may run one each; scaling writes results_scaling.json); "
                             "students: the teachers' students without references (results_students.json)")
    parser.add_argument("--recipe-override", metavar="YAML",
                        help="a recipe change, e.g. '{data: {franken_frustum: 4}, optim: {lr: 0.01}}' (as the "
                             "file's recipe_overrides; each recipe trains into its own folder)")
    parser.add_argument("--presets", metavar="SPECS",
                        help="compare model presets: the students once per preset (comma-separated "
                             "preset[:field=value...], as bench model's), scored; presets.md, presets.json and "
                             "presets.png (CPU ms against held-out PQ, with --latency) in out_dir")
    parser.add_argument("--latency", metavar="MS",
                        help="with --presets: CPU ms per scan of each, 'tiny=154.8,realtime=108.4' (the last = "
                             "separates) or a `sal-ros bench model` JSON file (median total_cpu)")
    parser.add_argument("--seeds", metavar="LIST",
                        help="with --presets: train every preset once per seed, e.g. 0,1,2 (the tables give the "
                             "mean ± sd over the seeds; default: the recipe's seed, one run)")
    parser.add_argument("--reference", metavar="SPEC",
                        help="with --presets: the preset every PQ is given as a share of (one of --presets; "
                             "default minkunet34, issue 25's reference)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from sal_ros.experiment.config import load_experiment
    from sal_ros.experiment.run import run_experiment

    try:
        cfg = load_experiment(args.config, quick=args.quick)
    except (ValueError, OSError) as exc:
        print(f"sal-ros experiment: {exc}", file=sys.stderr)
        return 1
    if args.recipe_override:
        from sal_ros.experiment.config import override_recipe

        try:
            override_recipe(cfg, args.recipe_override)
        except ValueError as exc:
            print(f"sal-ros experiment: --recipe-override: {exc}", file=sys.stderr)
            return 1
    if args.out:
        cfg.out_dir = args.out.resolve()
    if args.steps:
        cfg.steps = args.steps
    for key in ("backend", "workers", "ray_address"):
        if getattr(args, key):
            cfg.pseudolabel[key] = getattr(args, key)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.presets:
        return compare(cfg, args)
    try:
        parts = (args.only,) if args.only else ("main", "scaling")
        results = run_experiment(cfg, progress=not args.no_progress, say=lambda s: print(s, flush=True), parts=parts)
    except (SensorDataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"sal-ros experiment: {exc}", file=sys.stderr)
        return 1
    suffix = "" if "main" in parts else f"_{parts[0]}"  # the files run_experiment wrote
    print(f"done: {len(results['models'])} models, {len(results['scaling'])} scaling stages -> "
          f"{cfg.out_dir / f'table{suffix}.md'}, {cfg.out_dir / f'results{suffix}.json'}")
    return 0


def compare(cfg, args: argparse.Namespace) -> int:
    """``--presets``: the students of every preset (train only students: no references, no scaling)."""
    from sal_ros.experiment.presets import REFERENCE, compare_presets, parse_latency, parse_seeds
    from sal_ros.model.config import split_specs

    if args.only not in (None, "students"):
        print(f"sal-ros experiment: --presets trains the students only, not --only {args.only}", file=sys.stderr)
        return 1
    try:
        specs = split_specs(args.presets)
        if args.reference and args.reference not in specs:
            raise ValueError(f"--reference {args.reference!r} is not one of --presets {args.presets!r}")
        out = compare_presets(cfg, specs, parse_latency(args.latency), progress=not args.no_progress,
                              say=lambda s: print(s, flush=True), seeds=parse_seeds(args.seeds),
                              reference=args.reference or REFERENCE)
    except (SensorDataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"sal-ros experiment: {exc}", file=sys.stderr)
        return 1
    print(f"done: {len(out['rows'])} students of {len(specs)} presets, {len(out['seeds'])} seeds -> "
          f"{cfg.out_dir / 'presets.md'}, "
          f"{cfg.out_dir / 'presets.png'}")
    return 0
