"""The ``sal-ros`` command. Each sub-command lives in its own module, imported only when used, so
``sal-ros convert`` never pays for torch and ``sal-ros bench codec`` never needs rclpy.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int``.

Exit status: 0 done; 1 failed, the reason on one line of stderr; 2 a usage error; 3 done, but some items (frames,
cameras) were left out, each named. Bad input a command does not catch itself (a refused file, an unreadable
checkpoint, a full disk) still ends in one line naming it and status 1, not a traceback; ``SAL_ROS_TRACEBACK=1``
shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": ("sal_ros.demo", "whole SAL loop in miniature on real frames"),
    "run": ("sal_ros.tools.run", "run the segmenter (and recorder) nodes in one process"),
    "replay": ("sal_ros.tools.replay", "publish a rosbag2 through rclpy with /clock"),
    "convert": ("sal_ros.data.convert", "convert a dataset in ../shared/data form into a rosbag2 (mcap)"),
    "pseudolabel": ("sal_ros.pseudolabel.cli", "lift 2D masks and CLIP tokens onto recorded lidar frames"),
    "train": ("sal_ros.train.cli", "distill the SAL model on pseudo-labels"),
    "pretrain": ("sal_ros.pretrain.cli", "label-free backbone pretraining from a 2D teacher (ScaLR, Seal)"),
    "eval": ("sal_ros.tools.eval_cli", "evaluate a checkpoint or pseudo-labels"),
    "experiment": ("sal_ros.experiment.cli", "pseudo-label, distill, train supervised references, score held-out "
                   "sequences: one YAML"),
    "doctor": ("sal_ros.tools.doctor", "check this machine and a params file for what loses clouds or stops the nodes"),
}

BENCHES = {
    "codec": ("sal_ros.bench.codec", "PointCloud2 decode/encode vs a per-point Python reference"),
    "dds": ("sal_ros.bench.dds", "full-size clouds across two processes under the DDS configurations doctor advises"),
    "model": ("sal_ros.bench.model", "per-stage model timings and sparse vs dense conv"),
    "lift": ("sal_ros.bench.lift", "pseudo-label lifting and fusion on the 6-camera nuScenes frame"),
    "geometric": ("sal_ros.bench.geometric", "the geometric teacher (ground removal, clustering) per real scan"),
    "node": ("sal_ros.bench.node", "segmenter node overhead besides the model (sync, decode, publish)"),
    "gpu": ("sal_ros.bench.gpu", "GPU run: CUDA vs CPU parity, latency p50/p99, node at 10 Hz, one AMP step"),
    "vocabulary": ("sal_ros.bench.vocabulary", "prompt changes: 4, 32, 256 prompts embedded cold and warm"),
}


def _add_commands(sub, table: dict) -> None:
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)


def chosen_module(argv: list[str]) -> tuple[str, str | None, str | None]:
    """``(command, bench, module)`` named by the leading words of ``argv``, without parsing options, so that
    ``--help`` anywhere after them still sees the command's own arguments. Unknown names give module None
    (argparse reports them)."""
    command = argv[0] if argv else ""
    if command in COMMANDS:
        return command, None, COMMANDS[command][0]
    if command == "bench" and len(argv) > 1 and argv[1] in BENCHES:
        return command, argv[1], BENCHES[argv[1]][0]
    return command, None, None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser for ``argv``: every command listed, and the chosen one's options added by its module
    (the only sal_ros command module imported)."""
    parser = argparse.ArgumentParser(prog="sal-ros", description="SAL (Segment Anything in Lidar) for ROS 2")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="benchmarks (JSON on stdout)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_commands(bench_sub, BENCHES)
    command, bench_name, module = chosen_module(argv)
    if module is not None:
        target = bench_sub.choices[bench_name] if bench_name else sub.choices[command]
        importlib.import_module(module).add_arguments(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # No DDS settings here: `sal-ros run` keeps the robot's (or --localhost); demo, benches and eval online
    # keep their own runs on this machine.
    parser = build_parser(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except (OSError, ValueError, *_refusals()) as exc:
        if os.environ.get("SAL_ROS_TRACEBACK"):
            raise
        name = " ".join(w for w in (args.command, getattr(args, "bench", None)) if w)
        print(f"sal-ros {name}: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1


def _refusals() -> tuple[type, ...]:
    """Errors that mean bad input besides OSError and ValueError: the model layer's (checkpoint, text encoder)."""
    from sal_ros.model.errors import ModelError

    return (ModelError,)


if __name__ == "__main__":
    sys.exit(main())
