"""``sal-ros demo``: options, and the run in order (steps.py does the work, metrics / report / render / ply show
it)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sal_ros.core.files import atomic_write, write_json
from sal_ros.model.runtime import apply_node_thread_policy
from sal_ros.demo.settings import (DemoConfig, DemoDataError, find_sequence, say, start_over_if_settings_changed,
                                   weights_statement)

DEFAULT_DOMAIN_ID = "42"


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.monotonic()
    os.environ.setdefault("ROS_DOMAIN_ID", DEFAULT_DOMAIN_ID)
    from sal_ros.env import apply_ros_env_defaults

    apply_ros_env_defaults()
    from sal_ros.demo import steps

    seq = find_sequence(cfg.data)
    out = cfg.out.resolve()
    bag, frames = out / "bag", out / "frames"
    say(f"sal_ros demo on {seq} -> {out}")
    say(f"weights: {weights_statement(cfg)}")
    out.mkdir(parents=True, exist_ok=True)
    start_over_if_settings_changed(out, seq, cfg)
    total = 2 + 3 * len(cfg.runs) + 1
    say(f"[1/{total}] convert the dataset to a rosbag2")
    steps.step_convert(seq, bag, cfg.progress)
    params = {run: steps.write_params(out / run / "params.yaml", bag, frames, out / run / "train" / "model_last.pt",
                                      cfg) for run in cfg.runs}
    say(f"[2/{total}] record synced frames with the recorder node (bag replay over DDS)")
    steps.step_record(bag, params[cfg.masks], frames, out / "logs" / "recorder.log", cfg.rate)
    n, finished = 2, {}
    for run in cfg.runs:
        labels, train_dir = out / run / "pseudolabels", out / run / "train"
        say(f"[{n + 1}/{total}] {run}: pseudo-label the recorded frames ({run} masks, CLIP tokens)")
        steps.step_pseudolabel(frames, labels, bag, run, cfg)
        say(f"[{n + 2}/{total}] {run}: distill the tiny student ({cfg.steps} steps)")
        checkpoint, train_s = steps.step_train(frames, labels, train_dir, cfg)
        say(f"[{n + 3}/{total}] {run}: segmenter node with this student on a replay of the bag")
        online = steps.step_segment(bag, params[run], out / "logs" / f"segmenter_{run}.log", cfg.rate)
        finished[run] = (labels, online, train_s, checkpoint)
        n += 3
    say(f"[{total}/{total}] report")
    return write_results(out, bag, frames, finished, cfg, t_start)


def write_results(out: Path, bag: Path, frames: Path, finished: dict, cfg: DemoConfig, t_start: float) -> dict:
    from sal_ros.demo.metrics import demo_metrics, gather, run_metrics
    from sal_ros.demo.oracle import load_ground_truth
    from sal_ros.demo.ply import write_ply
    from sal_ros.demo.render import render_bev, render_camera
    from sal_ros.demo.report import report_markdown

    results = gather(frames, load_ground_truth(bag),
                     {run: (labels, online.outputs) for run, (labels, online, _, _) in finished.items()})
    if not results:
        raise RuntimeError("no frame could be joined with its labeled clouds and ground truth; see logs/")
    for r in results:
        for run, f in r.runs.items():
            write_ply(out / run / "clouds" / f"{r.stamp_ns}.ply", r.points, r.intensity, f.label, f.instance,
                      f.score)
        render_bev(out / "png" / f"{r.stamp_ns}_bev.png", r)
        if r.camera is not None:
            render_camera(out / "png" / f"{r.stamp_ns}_camera.png", r)
    runs = {run: run_metrics(results, run, online.summary(), train_s, checkpoint, cfg)
            for run, (_, online, train_s, checkpoint) in finished.items()}
    m = demo_metrics(results, runs, time.monotonic() - t_start, cfg)
    write_json(out / "metrics.json", m)
    report = report_markdown(m)
    atomic_write(out / "report.md", report)
    say("\n" + report)
    say(f"outputs in {out}: report.md, metrics.json, png/, and per run ({', '.join(cfg.runs)}): clouds/, "
        "pseudolabels/, train/curves.png; logs/")
    return m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="SemanticKITTI sequence folder or a folder holding one "
                        "(default: $SAL_DATA, else ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps of each student")
    parser.add_argument("--max-points", type=int, default=DemoConfig.max_points,
                        help="points per training sample (0 = all points of the camera frustum)")
    parser.add_argument("--slic-segments", type=int, default=DemoConfig.slic_segments,
                        help="SLIC superpixels per image for --masks slic")
    parser.add_argument("--rate", type=float, default=DemoConfig.rate, help="bag replay speed factor")
    parser.add_argument("--masks", choices=["slic", "sam2"], default="slic",
                        help="2D mask generator (an oracle-mask run always runs beside it)")
    parser.add_argument("--sam2-checkpoint", help="SAM 2 weights (.pt) for --masks sam2")
    parser.add_argument("--sam2-config", help="SAM 2 hydra config matching the checkpoint")
    parser.add_argument("--clip-model", default=DemoConfig.clip_model, help="open_clip model of tokens and prompts")
    parser.add_argument("--clip-pretrained", help="open_clip pretrained tag or local weights file "
                        "(default: random weights; class names then mean nothing)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.masks == "sam2" and not args.sam2_checkpoint:
        print("sal-ros demo: --masks sam2 needs --sam2-checkpoint", file=sys.stderr)
        return 2
    cfg = DemoConfig(out=args.out, data=args.data, steps=args.steps, max_points=args.max_points, rate=args.rate,
                     slic_segments=args.slic_segments,
                     masks=args.masks, sam2_checkpoint=args.sam2_checkpoint, sam2_config=args.sam2_config,
                     clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, progress=not args.no_progress)
    # Training and pseudo-labelling on all cores but one, as the node runs: on a shared 2-core machine, torch's
    # default (every core) waited on the busy core at each parallel op (4 demo steps: 143 s, on 1 thread 2 s).
    apply_node_thread_policy()
    try:
        run_demo(cfg)
    except DemoDataError as exc:
        print(f"sal-ros demo: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"sal-ros demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
