"""``sal-ros doctor``: what on this machine and in this configuration loses lidar clouds or stops the nodes, and
what to change.

Machine checks (no DDS traffic; files under ``--root``, default ``/``, so a test can give a fake one): the RMW, the
Fast DDS profile of the environment and its transports, ``/dev/shm`` (shared-memory segments), the kernel's
socket buffer limits (``net.core.rmem_max`` / ``wmem_max``), IP fragment reassembly (``ipfrag_high_thresh`` /
``ipfrag_time``, for clouds from other hosts), other DDS participants on this ROS domain, and the ROS tools. With
``--params FILE``: the checkpoint, vocabulary and calibration the file names. With ``--live``: the cloud and camera
topics (publishers, QoS, one message each) and the camera transforms, each waited for at most ``--wait`` seconds.

Each advice points at the measured figures behind it: docs/ros.md, "Losing clouds". Exit status: 0 nothing to
change, 1 warnings (clouds may be lost), 3 failures (something will not work), 2 bad usage. ``--json`` prints
the checks as JSON.

One module per kind of check: ``machine``, ``params_file``, ``live``; ``report`` holds the verdicts and the output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from sal_ros.tools.doctor.live import live_checks
from sal_ros.tools.doctor.machine import CLOUD_BYTES, machine_checks
from sal_ros.tools.doctor.params_file import params_checks
from sal_ros.tools.doctor.report import MIB, exit_code, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None,
                        help="params file of the nodes: check the checkpoint, vocabulary and calibration it names")
    parser.add_argument("--live", action="store_true",
                        help="also check the live cloud and camera topics and the camera transforms (joins the "
                             "ROS graph in this environment's DDS settings)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for each live topic or transform (default 10)")
    parser.add_argument("--cloud-mb", type=float, default=CLOUD_BYTES / MIB,
                        help="size of your lidar's clouds in MiB, for the buffer checks (default 4: 120k points)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # tests: a fake /proc, /dev


def main(args: argparse.Namespace) -> int:
    if args.params is not None and not args.params.is_file():
        print(f"sal-ros doctor: params file not found: {args.params}", file=sys.stderr)
        return 2
    if args.wait < 0 or args.cloud_mb <= 0:
        print("sal-ros doctor: --wait must be >= 0 and --cloud-mb > 0", file=sys.stderr)
        return 2
    env = dict(os.environ)
    cloud_bytes = int(args.cloud_mb * MIB)
    checks = machine_checks(args.root, env, cloud_bytes)
    values = None
    if args.params is not None:
        values, param_checks = params_checks(args.params)
        checks += param_checks
    if args.live:
        checks += live_checks(values or {}, args.wait)
    code = exit_code(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "exit_code": code}, indent=2))
    else:
        print(render(checks))
    return code

