"""``sal-ros demo`` (``make demo``): the whole SAL loop in miniature on real SemanticKITTI frames.

1. convert the dataset folder into a rosbag2 that looks like a robot recording (``sal-ros convert``);
2. record synced frames from a replay of it with the recorder node (``sal-ros run --no-segmenter --record``);
3. pseudo-label the recorded frames (``sal-ros pseudolabel``: SLIC masks unless SAM 2 weights are given);
4. distill a tiny student on them (``sal-ros train``);
5. run the segmenter node with the student on a replay of the bag and collect its topics (``sal-ros eval online``);
6. write ``demo_out/``: labeled clouds (PLY), bird's-eye-view and camera-overlay PNGs (input, pseudo-labels, student,
   ground truth), ``metrics.json`` and ``report.md`` (class-agnostic PQ vs ground truth, latency, drops).

Every step leaves its result in the output folder and is skipped when that result is complete, so an interrupted
demo resumes where it stopped (training resumes from its last checkpoint). A run with other settings (masks,
weights, data, steps: ``settings.json``) starts over instead of taking the old results for done.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sal_ros.core.files import atomic_write, write_json

REPO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABEL_MIN_POINTS = 50  # SemanticKITTI's minimum segment size for PQ
DEFAULT_DOMAIN_ID = "42"


class DemoDataError(RuntimeError):
    """No SemanticKITTI data where the demo looked."""


@dataclass
class DemoConfig:
    out: Path
    data: Path | None = None
    steps: int = 600
    max_points: int = 0  # all points of the camera frustums (~19k per SemanticKITTI scan)
    slic_segments: int = 40  # coarse superpixels: ~22 segments of >= 50 points per scan, learnable in CPU minutes
    rate: float = 0.1  # 1 s between the 10 Hz scans: the tiny student answers each on 2 CPU cores (~0.3 s)
    masks: str = "slic"
    sam2_checkpoint: str | None = None
    sam2_config: str | None = None
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = None
    progress: bool = True

    @property
    def random_clip(self) -> bool:
        return not self.clip_pretrained


# ------------------------------------------------------------------------------------------------------ data


def find_sequence(data: Path | None) -> Path:
    """The SemanticKITTI sequence folder to run on: ``--data``, else ``$SAL_DATA``, else ../shared/data."""
    tried = [Path(data)] if data else [Path(p) for p in (os.environ.get("SAL_DATA"),) if p]
    if not tried:
        tried = [Path.cwd().parent / "shared" / "data", REPO_DATA]
    for root in tried:
        for candidate in (root, root / "sequences" / "00", root / "semantickitti" / "sequences" / "00"):
            if (candidate / "velodyne").is_dir() and (candidate / "calib.txt").is_file():
                return candidate.resolve()
    where = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise DemoDataError(
        f"no SemanticKITTI data found (looked in {where}). The demo needs a SemanticKITTI sequence folder with "
        "velodyne/*.bin, image_0/*.png, labels/*.label, calib.txt and times.txt (e.g. the sample in "
        "../shared/data/semantickitti/sequences/00). Point at it with `sal-ros demo --data PATH` or "
        "`SAL_DATA=PATH make demo`.")


# ----------------------------------------------------------------------------------------------------- steps


def say(text: str) -> None:
    print(text, flush=True)


def weights_statement(cfg: DemoConfig) -> str:
    masks = (f"SAM 2 ({cfg.sam2_checkpoint})" if cfg.masks == "sam2" else
             "SLIC superpixels (no SAM weights; object masks are only approximate)")
    clip = (f"{cfg.clip_model} / {cfg.clip_pretrained}" if cfg.clip_pretrained else
            f"{cfg.clip_model} with RANDOM weights (seeded): class names carry NO meaning, so only class-agnostic "
            "segmentation is scored")
    return f"2D masks: {masks}. CLIP: {clip}. Student: tiny preset, {cfg.steps} steps on CPU."


def step_convert(seq: Path, bag: Path, progress: bool) -> None:
    from sal_ros.data.convert import convert

    if (bag / "metadata.yaml").is_file():
        say(f"    {bag} exists, kept")
        return
    summary = convert(seq, bag, progress=progress)
    say(f"    {summary.frames} frames, cameras {sorted(summary.cameras)}, labelled {summary.labelled}")


def node_params(bag: Path, frames: Path, checkpoint: Path, cfg: DemoConfig) -> dict:
    """The ROS 2 params YAML of both nodes: the bag's topics, its static extrinsics, the student checkpoint."""
    from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, image_topic, info_topic
    from sal_ros.env import config_file
    from sal_ros.eval.labels import get_label_set
    from sal_ros.eval.online import bag_topics

    cameras = sorted(t.split("/")[1] for t in bag_topics(bag) if t.endswith("/image_raw"))
    # Random CLIP weights make class names meaningless, and stuff classes would merge the student's segments at
    # random: then every SemanticKITTI class name is a plain (thing) prompt, so each query stays its own segment.
    vocabulary = "" if cfg.random_clip else str(config_file("vocabulary_semantickitti.yaml"))
    prompts = [n.replace("-", " ") for n in get_label_set("semantickitti").class_names]
    return {
        "/**": {"ros__parameters": {
            "cloud_topic": CLOUD_TOPIC, "cameras": cameras,
            "camera": {c: {"image_topic": image_topic(c), "info_topic": info_topic(c)} for c in cameras},
            "calibration": {"source": "static", "file": str(bag / EXTRINSICS_FILE)},
            "sync": {"match_threshold": 0.03, "timeout": 0.5},  # a loaded CPU delays images; be patient
            "stats_period": 1.0,
        }},
        "sal_segmenter": {"ros__parameters": {
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            "text_encoder": {"model": cfg.clip_model, "pretrained": cfg.clip_pretrained or ""},
            "vocabulary_file": vocabulary,
            "prompts": prompts,
            "score_threshold": 0.0,
            "qos": {"outputs": {"reliability": "reliable", "depth": 5}},
        }},
        "sal_recorder": {"ros__parameters": {"output_dir": str(frames)}},
    }


def step_record(bag: Path, params: Path, frames: Path, out: Path, rate: float) -> None:
    from sal_ros.data.convert import CLOUD_TOPIC
    from sal_ros.data.framestore import FrameStore
    from sal_ros.eval.online import bag_topics, replay

    wanted = bag_topics(bag)[CLOUD_TOPIC]
    if len(FrameStore(frames).keys()) >= wanted:
        say(f"    {frames} holds all {wanted} frames, kept")
        return
    replay(bag, ["--params", str(params), "--no-segmenter", "--record", str(frames)], out / "logs" / "recorder.log",
           cloud_topic=CLOUD_TOPIC, rate=rate, segmenter=False,
           done=lambda: len(FrameStore(frames).keys()) >= wanted)
    say(f"    recorded {len(FrameStore(frames).keys())} synced frames into {frames}")


def step_pseudolabel(frames: Path, labels: Path, cfg: DemoConfig) -> None:
    from sal_ros.cli import main as cli

    argv = ["pseudolabel", str(frames), "--out", str(labels), "--masks", cfg.masks, "--clip-model", cfg.clip_model,
            "--slic-segments", str(cfg.slic_segments)]
    if cfg.masks == "sam2":
        argv += ["--sam2-checkpoint", cfg.sam2_checkpoint] + (["--sam2-config", cfg.sam2_config]
                                                             if cfg.sam2_config else [])
    argv += ["--clip-pretrained", cfg.clip_pretrained] if cfg.clip_pretrained else ["--random-weights"]
    if not cfg.progress:
        argv.append("--no-progress")
    if cli(argv) != 0:
        raise RuntimeError("pseudo-labeling failed (see above)")


def step_train(frames: Path, labels: Path, train_dir: Path, cfg: DemoConfig) -> Path:
    from sal_ros.cli import main as cli
    from sal_ros.env import config_file

    base = yaml.safe_load(config_file("train_tiny.yaml").read_text())
    base.update(out_dir=str(train_dir), device="cpu", checkpoint_every=max(10, cfg.steps // 4),
                text_encoder={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained},
                sources=[{"frames": str(frames), "pseudolabels": str(labels)}])
    # Two scans: fit their frustums as they are (no FrankenFrustum) and only segments PQ counts (>= 50 points).
    base["data"].update(max_points=cfg.max_points, franken_frustum=1, min_instance_points=LABEL_MIN_POINTS)
    base["optim"].update(steps=cfg.steps, lr=3e-3, warmup_steps=min(10, max(1, cfg.steps // 5)))
    config = atomic_write(train_dir / "train.yaml", yaml.safe_dump(base, sort_keys=False))
    argv = ["train", "--config", str(config), "--resume"] + ([] if cfg.progress else ["--no-progress"])
    if cli(argv) != 0:
        raise RuntimeError("training failed (see above)")
    return train_dir / "model_last.pt"


def step_segment(bag: Path, params: Path, out: Path, rate: float):
    from sal_ros.data.convert import CLOUD_TOPIC
    from sal_ros.eval.online import replay

    result = replay(bag, ["--params", str(params)], out / "logs" / "segmenter.log", cloud_topic=CLOUD_TOPIC,
                    rate=rate)
    summary = result.summary()
    say(f"    {summary['clouds_answered']}/{summary['clouds_sent']} clouds answered, end-to-end latency median "
        f"{summary['end_to_end_ms']['median']} ms")
    return result


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class FrameResult:
    stamp_ns: int
    points: np.ndarray
    intensity: np.ndarray | None
    gt_cls: np.ndarray  # SemanticKITTI 19-class id per point (0 = ignore)
    gt_seg: np.ndarray  # raw panoptic label (segment id)
    pseudo: np.ndarray  # pseudo-instance per point (0 = none)
    in_frustum: np.ndarray
    label: np.ndarray  # student label per point (0 = none)
    instance: np.ndarray
    score: np.ndarray
    camera: Any  # the recorded CameraView (image, model, T) or None


def gather(bag: Path, frames: Path, labels: Path, outputs: dict[int, dict[str, np.ndarray]]) -> list[FrameResult]:
    """Join, per cloud stamp, the recorded frame, its pseudo-labels, the node's labeled cloud and the ground truth."""
    from sal_ros.data.convert import LABELS_FILE
    from sal_ros.data.framestore import FrameStore
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path
    from sal_ros.eval.labels import get_label_set

    label_set = get_label_set("semantickitti")
    with np.load(bag / LABELS_FILE) as gt_file:
        gt = {int(k): gt_file[k] for k in gt_file.files}
    store = FrameStore(frames)
    results = []
    for key in store.keys():
        frame = store.load(key)
        out = outputs.get(frame.stamp_ns)
        if out is None or frame.stamp_ns not in gt:
            continue
        xyz = np.stack([out["x"], out["y"], out["z"]], 1)
        if not np.array_equal(xyz, frame.points, equal_nan=True):
            raise RuntimeError(f"labeled cloud at {frame.stamp_ns} does not hold the recorded points in order")
        pl = load_pseudolabels(pseudolabel_path(labels, key), frame.num_points)
        gt_cls, gt_seg = label_set.split(gt[frame.stamp_ns])
        results.append(FrameResult(
            stamp_ns=frame.stamp_ns, points=frame.points, intensity=frame.intensity, gt_cls=gt_cls, gt_seg=gt_seg,
            pseudo=pl.instance.astype(np.int64), in_frustum=pl.in_frustum, label=out["label"].astype(np.int64),
            instance=out["instance"].astype(np.int64), score=out["score"],
            camera=next(iter(frame.cameras.values()), None)))
    return results


def agnostic_pq(results: list[FrameResult], which: str, region: str) -> dict:
    """Class-agnostic PQ vs ground truth over all frames: ``which`` is "pseudo" or "student", ``region`` is
    "frustum" (points the camera sees) or "scan" (all points)."""
    from sal_ros.eval.panoptic import PanopticEvaluator

    ev = PanopticEvaluator(1, min_points=LABEL_MIN_POINTS)
    for r in results:
        keep = r.in_frustum if region == "frustum" else np.ones(len(r.points), bool)
        pred_sem = np.zeros_like(r.pseudo) if which == "pseudo" else r.label
        pred_inst = r.pseudo if which == "pseudo" else r.instance
        ev.add_agnostic(pred_sem[keep], pred_inst[keep], r.gt_cls[keep], r.gt_seg[keep])
    return ev.compute().agnostic


def student_vs_pseudo(results: list[FrameResult]) -> dict:
    """How well the student reproduces its teacher: class-agnostic PQ vs the pseudo-labels where they exist."""
    from sal_ros.eval.panoptic import PanopticEvaluator

    ev = PanopticEvaluator(1, min_points=LABEL_MIN_POINTS)
    for r in results:
        keep = r.in_frustum
        ev.add_agnostic(r.label[keep], r.instance[keep], (r.pseudo[keep] != 0).astype(np.int64), r.pseudo[keep])
    return ev.compute().agnostic


def metrics(results: list[FrameResult], online: dict, train_s: float, cfg: DemoConfig) -> dict:
    def pq(d: dict) -> dict:
        return {k: round(100 * d[k], 1) for k in ("pq", "sq", "rq")} | {k: int(d[k]) for k in ("tp", "fp", "fn")}

    return {
        "weights": weights_statement(cfg),
        "frames": len(results),
        "class_agnostic_pq_vs_ground_truth": {
            "pseudo-labels (camera frustum)": pq(agnostic_pq(results, "pseudo", "frustum")),
            "student (camera frustum)": pq(agnostic_pq(results, "student", "frustum")),
            "student (full 360-degree scan)": pq(agnostic_pq(results, "student", "scan")),
        },
        "student_vs_pseudo_labels": pq(student_vs_pseudo(results)),
        "online": online,
        "train_wall_s": round(train_s, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }


def report_markdown(m: dict) -> str:
    rows = [f"| {name} | {v['pq']} | {v['sq']} | {v['rq']} | {v['tp']} / {v['fp']} / {v['fn']} |"
            for name, v in m["class_agnostic_pq_vs_ground_truth"].items()]
    s = m["student_vs_pseudo_labels"]
    rows.append(f"| student vs its pseudo-labels (camera frustum) | {s['pq']} | {s['sq']} | {s['rq']} | "
                f"{s['tp']} / {s['fp']} / {s['fn']} |")
    on = m["online"]
    timings = on["node_timings_ms"]
    stage = " · ".join(f"{k} {v['median']:.0f}" for k, v in timings.items()
                       if k in ("decode", "model.voxelize", "model.backbone", "model.decoder", "model.postprocess",
                                "publish", "total"))
    lat = on["end_to_end_ms"]
    in_node = timings.get("latency", {})
    return "\n".join([
        "# sal_ros demo report", "",
        f"**Weights.** {m['weights']}", "",
        f"Class-agnostic panoptic quality (%) on {m['frames']} real SemanticKITTI scans (segments of at least "
        f"{LABEL_MIN_POINTS} points, SemanticKITTI convention):", "",
        "| segments | PQ | SQ | RQ | TP / FP / FN |", "|---|---|---|---|---|", *rows, "",
        "How to read it: the last row is the distillation itself (does the lidar student reproduce what the 2D "
        "teacher lifted?). Against ground truth the student can only be as good as its pseudo-labels"
        + (": SLIC superpixels are image regions, not objects, so they match few ground-truth segments; SAM 2 "
           "masks (`--masks sam2 --sam2-checkpoint ...`) follow objects. With ideal 2D masks the lifting itself "
           "reaches class-agnostic PQ ~90 on these scans (`sal-ros eval pseudolabels`; README, section "
           "Measured)."
           if m["config"].get("masks") == "slic" else "."), "",
        "Online, segmenter node on a bag replay (real rclpy + Fast DDS on localhost, CPU):", "",
        "| clouds sent | answered | dropped | end-to-end latency median / max (ms) | in-node latency median (ms) |",
        "|---|---|---|---|---|",
        f"| {on['clouds_sent']} | {on['clouds_answered']} | {on['dropped']} | {lat['median']} / {lat['max']} | "
        f"{in_node.get('median', '-')} |", "",
        f"Node stage medians (ms): {stage}.", "",
        f"Training: {m['config']['steps']} steps, {m['train_wall_s']} s wall.", "",
    ])


def write_ply(path: Path, r: FrameResult) -> None:
    """Binary PLY (CloudCompare, Open3D, MeshLab): x y z intensity label instance score, written atomically."""
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("label", "<u2"),
                      ("instance", "<u4"), ("score", "<f4")])
    rows = np.empty(len(r.points), dtype)
    rows["x"], rows["y"], rows["z"] = r.points.T
    rows["intensity"] = 0 if r.intensity is None else r.intensity
    rows["label"], rows["instance"], rows["score"] = r.label, r.instance, r.score
    kinds = {"<f4": "float", "<u2": "ushort", "<u4": "uint"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    header += [f"property {kinds[dtype[n].str]} {n}" for n in dtype.names] + ["end_header", ""]

    atomic_write(path, "\n".join(header).encode() + rows.tobytes())


def segment_colors(seg_id: np.ndarray, none: np.ndarray) -> np.ndarray:
    """A stable, well-spread colour per segment id; points in ``none`` are grey."""
    golden = (np.asarray(seg_id, np.int64) * 0.618033988749895) % 1.0
    import matplotlib

    rgb = matplotlib.colormaps["hsv"](golden)[:, :3] * 0.85 + 0.1
    rgb[none] = 0.75
    return rgb


def panels(r: FrameResult) -> list[tuple[str, np.ndarray]]:
    """(title, per-point RGB) of the four views: input, pseudo-labels, student, ground truth."""
    import matplotlib

    height = matplotlib.colormaps["viridis"](np.clip((r.points[:, 2] + 2.5) / 4.0, 0, 1))[:, :3]
    student_id = r.label * 100003 + r.instance
    return [
        ("input (height)", height),
        ("pseudo-labels (camera only)", segment_colors(r.pseudo, r.pseudo == 0)),
        ("student (lidar only)", segment_colors(student_id, student_id == 0)),
        ("ground truth", segment_colors(r.gt_seg, r.gt_cls == 0)),
    ]


def render_bev(path: Path, r: FrameResult, extent: float = 40.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.eval.report import atomic_savefig

    near = (np.abs(r.points[:, 0]) < extent) & (np.abs(r.points[:, 1]) < extent)
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.4))
    for ax, (title, rgb) in zip(axes, panels(r)):
        ax.scatter(-r.points[near, 1], r.points[near, 0], c=rgb[near], s=0.15, linewidths=0)
        ax.set(title=title, xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
        ax.set_facecolor("black")
    fig.suptitle(f"bird's-eye view, scan {r.stamp_ns} (x forward = up, ±{extent:.0f} m)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)


def render_camera(path: Path, r: FrameResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sal_ros.core.camera import project_points
    from sal_ros.eval.report import atomic_savefig

    view = r.camera
    proj = project_points(r.points, view.T_cam_lidar, view.camera, min_depth=1.0)
    uv = proj.uv[proj.valid]
    h, w = view.image.shape[:2]
    fig, axes = plt.subplots(4, 1, figsize=(14, 4 * 14 * h / w + 1.2))
    for ax, (title, rgb) in zip(axes, panels(r)):
        ax.imshow(view.image, cmap="gray" if view.image.ndim == 2 else None)
        ax.scatter(uv[:, 0], uv[:, 1], c=rgb[proj.valid], s=1.5, linewidths=0)
        ax.set(title=title, xlim=(0, w), ylim=(h, 0), xticks=[], yticks=[])
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- run


DEMO_OUTPUTS = ("bag", "frames", "train", "clouds", "png", "logs", "params.yaml", "metrics.json", "report.md")
SETTINGS_FILE = "settings.json"


def demo_settings(seq: Path, cfg: DemoConfig) -> dict:
    """What the results in the output folder depend on (not how they are shown: rate, progress)."""
    keys = ("steps", "max_points", "slic_segments", "masks", "sam2_checkpoint", "sam2_config", "clip_model",
            "clip_pretrained")
    return {"data": str(seq.resolve()), **{k: getattr(cfg, k) for k in keys}}


def start_over_if_settings_changed(out: Path, seq: Path, cfg: DemoConfig) -> None:
    """Steps resume from what the folder holds, so results made with other settings (other masks, weights, data,
    steps) would be taken as done: remove the demo's own outputs and say why, before anything runs."""
    import json
    import shutil

    wanted = demo_settings(seq, cfg)
    settings = out / SETTINGS_FILE
    if settings.exists():
        try:
            before = json.loads(settings.read_text())
        except (OSError, ValueError):
            before = {}
        changed = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        if changed:
            say("settings differ from the last demo in this folder ("
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()) + "): starting over")
            for name in DEMO_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    elif any((out / name).exists() for name in DEMO_OUTPUTS):
        say(f"{out} holds demo results without {SETTINGS_FILE} (older sal_ros): reusing them as they are")
    write_json(settings, wanted)


def run_demo(cfg: DemoConfig) -> dict:
    os.environ.setdefault("ROS_DOMAIN_ID", DEFAULT_DOMAIN_ID)
    from sal_ros.env import apply_ros_env_defaults

    apply_ros_env_defaults()
    seq = find_sequence(cfg.data)
    out = cfg.out.resolve()
    bag, frames, train_dir = out / "bag", out / "frames", out / "train"
    labels = frames / "pseudolabels"
    say(f"sal_ros demo on {seq} -> {out}")
    say(f"weights: {weights_statement(cfg)}")
    out.mkdir(parents=True, exist_ok=True)
    start_over_if_settings_changed(out, seq, cfg)
    say("[1/6] convert the dataset to a rosbag2")
    step_convert(seq, bag, cfg.progress)
    params = out / "params.yaml"
    atomic_write(params, yaml.safe_dump(node_params(bag, frames, train_dir / "model_last.pt", cfg), sort_keys=False))
    say("[2/6] record synced frames with the recorder node (bag replay over DDS)")
    step_record(bag, params, frames, out, cfg.rate)
    say(f"[3/6] pseudo-label the recorded frames ({cfg.masks} masks, CLIP tokens)")
    step_pseudolabel(frames, labels, cfg)
    say(f"[4/6] distill the tiny student ({cfg.steps} steps)")
    t0 = time.monotonic()
    checkpoint = step_train(frames, labels, train_dir, cfg)
    train_s = time.monotonic() - t0
    say("[5/6] segmenter node on a replay of the bag")
    online = step_segment(bag, params, out, cfg.rate)
    say("[6/6] report")
    results = gather(bag, frames, labels, online.outputs)
    if not results:
        raise RuntimeError("no frame could be joined with its labeled cloud and ground truth; see logs/")
    for r in results:
        write_ply(out / "clouds" / f"{r.stamp_ns}.ply", r)
        render_bev(out / "png" / f"{r.stamp_ns}_bev.png", r)
        if r.camera is not None:
            render_camera(out / "png" / f"{r.stamp_ns}_camera.png", r)
    m = metrics(results, online.summary(), train_s, cfg)
    m["checkpoint"] = str(checkpoint)
    write_json(out / "metrics.json", m)
    report = report_markdown(m)
    atomic_write(out / "report.md", report)
    say("\n" + report)
    say(f"outputs in {out}: report.md, metrics.json, png/, clouds/, train/curves.png, logs/")
    return m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="SemanticKITTI sequence folder or a folder holding one "
                        "(default: $SAL_DATA, else ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps of the student")
    parser.add_argument("--max-points", type=int, default=DemoConfig.max_points,
                        help="points per training sample (0 = all points of the camera frustum)")
    parser.add_argument("--slic-segments", type=int, default=DemoConfig.slic_segments,
                        help="SLIC superpixels per image for --masks slic")
    parser.add_argument("--rate", type=float, default=DemoConfig.rate, help="bag replay speed factor")
    parser.add_argument("--masks", choices=["slic", "sam2"], default="slic", help="2D mask generator")
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
    try:
        run_demo(cfg)
    except DemoDataError as exc:
        print(f"sal-ros demo: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"sal-ros demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
