"""The ``sal-ros`` command. Each sub-command lives in its own module, imported only when used, so
``sal-ros convert`` never pays for torch and ``sal-ros bench codec`` never needs rclpy.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sal_ros.env import apply_ros_env_defaults

COMMANDS = {
    "demo": ("sal_ros.demo", "whole SAL loop in miniature on real frames"),
    "run": ("sal_ros.nodes.run", "run the segmenter (and recorder) nodes in one process"),
    "replay": ("sal_ros.nodes.replay", "publish a rosbag2 through rclpy with /clock"),
    "convert": ("sal_ros.data.convert", "convert a dataset in ../shared/data form into a rosbag2 (mcap)"),
    "pseudolabel": ("sal_ros.pseudolabel.cli", "lift 2D masks and CLIP tokens onto recorded lidar frames"),
    "train": ("sal_ros.train.cli", "distill the SAL model on pseudo-labels"),
    "eval": ("sal_ros.eval.cli", "evaluate a checkpoint or pseudo-labels"),
}

BENCHES = {
    "codec": ("sal_ros.bench.codec", "PointCloud2 decode/encode vs a per-point Python reference"),
    "dds": ("sal_ros.bench.dds", "120k-point clouds across two processes with the shipped Fast DDS profile"),
    "model": ("sal_ros.bench.model", "per-stage model timings and sparse vs dense conv"),
    "lift": ("sal_ros.bench.lift", "pseudo-label lifting and fusion on the 6-camera nuScenes frame"),
}


def _add_commands(sub, table: dict) -> None:
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sal-ros", description="SAL (Segment Anything in Lidar) for ROS 2")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="benchmarks (JSON on stdout)")
    _add_commands(bench.add_subparsers(dest="bench", required=True), BENCHES)
    # Only the chosen command's module is imported to add its own arguments.
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known._module)
    target = sub.choices[known.command]
    if known.command == "bench":
        target = target._subparsers._group_actions[0].choices[known.bench]
    module.add_arguments(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_ros_env_defaults()
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="sal-ros")
        sub = parser.add_subparsers(dest="command")
        for name, (_, help_text) in {**COMMANDS, "bench": (None, "benchmarks (JSON on stdout)")}.items():
            sub.add_parser(name, help=help_text)
        parser.print_help()
        return 0
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
