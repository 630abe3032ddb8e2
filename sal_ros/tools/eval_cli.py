"""``sal-ros eval``: one command over the evaluations: a checkpoint (sal_ros.eval.model), pseudo-labels
(sal_ros.pseudolabel.evaluate: it labels, sal_ros.eval.pseudolabels scores), a linear probe (sal_ros.eval.probe), a
semantic student (sal_ros.train.evaluate: it rebuilds the training scans, sal_ros.eval.semantic_model scores), a
running segmenter node (sal_ros.tools.online) and tracking (sal_ros.eval.tracking).
It is a tool: it sits above every room it dispatches to, so none of them imports upwards.

    sal-ros eval model --checkpoint C (--bag B | --dataset D) --vocabulary V --out DIR
    sal-ros eval online BAG --params P --out DIR [--rate R] [--set NAME=VALUE ...] [--domain ID|auto]
    sal-ros eval tracking --dataset SEQ (--oracle | --checkpoint C --vocabulary V) --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_mode", required=True)
    _add_lazy(sub, "model", "zero-shot panoptic evaluation of a checkpoint on frames with ground truth",
              "sal_ros.eval.model", lambda module: module.main)
    # Imported only when `eval` is the command (online needs rclpy only when it runs).
    _add_lazy(sub, "pseudolabels", "pseudo-label quality against ground truth", "sal_ros.pseudolabel.evaluate",
              lambda module: module.main)
    _add_lazy(sub, "probe", "linear probe of a frozen (pretrained) backbone vs a random one: mIoU",
              "sal_ros.eval.probe", lambda module: module.main)
    _add_lazy(sub, "semantic", "a semantic checkpoint vs real labels, its training labels and unlabelled points",
              "sal_ros.train.evaluate", lambda module: module.main)
    _add_lazy(sub, "online", "replay a bag into `sal-ros run`: answered clouds, drop rate, latency",
              "sal_ros.tools.online", lambda module: module.main)
    _add_lazy(sub, "tracking", "instances over time: LSTQ and id switches of the tracker on a sequence",
              "sal_ros.eval.tracking", lambda module: module.main)


def _add_lazy(sub, mode: str, help_text: str, module_name: str, entry) -> None:
    """A sub-mode whose module may not import here: listed with the reason, and failing with it when run."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        parser = sub.add_parser(mode, help=f"(unavailable: {exc})")
        parser.set_defaults(_eval=lambda args, _e=exc: _unavailable(mode, _e))
        return
    parser = sub.add_parser(mode, help=help_text)
    module.add_arguments(parser)
    parser.set_defaults(_eval=entry(module))


def _unavailable(mode: str, why) -> int:
    print(f"sal-ros eval {mode}: {why}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        return int(args._eval(args) or 0)
    except (SensorDataError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"sal-ros eval: {exc}", file=sys.stderr)
        return 1

