"""The demo's steps. Each leaves its result in the output folder and skips work that is already there, so an
interrupted demo resumes where it stopped. Node steps run the real nodes in their own process over DDS on a bag
replay; pseudo-labeling and training call their Python APIs in this process."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from sal_ros.core.files import atomic_write
from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, image_topic, info_topic
from sal_ros.data.labels import get_label_set
from sal_ros.demo.settings import LABEL_MIN_POINTS, ORACLE, DemoConfig, say
from sal_ros.env import config_file
from sal_ros.tools.online import OnlineResult, bag_topics, replay

SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"  # `sal-ros pseudolabel`'s default


def step_convert(seq: Path, bag: Path, progress: bool) -> None:
    from sal_ros.data.convert import convert

    if (bag / "metadata.yaml").is_file():
        say(f"    {bag} exists, kept")
        return
    summary = convert(seq, bag, progress=progress)
    say(f"    {summary.frames} frames, cameras {sorted(summary.cameras)}, labelled {summary.labelled}")


def node_params(bag: Path, frames: Path, checkpoint: Path, cfg: DemoConfig) -> dict:
    """The ROS 2 params YAML of both nodes: the bag's topics, its static extrinsics, the student checkpoint."""
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


def write_params(path: Path, bag: Path, frames: Path, checkpoint: Path, cfg: DemoConfig) -> Path:
    return atomic_write(path, yaml.safe_dump(node_params(bag, frames, checkpoint, cfg), sort_keys=False))


def step_record(bag: Path, params: Path, frames: Path, log: Path, rate: float) -> None:
    """The recorder node on a replay of the bag: synced frames as a robot would store them."""
    from sal_ros.data.framestore import FrameStore

    wanted = bag_topics(bag)[CLOUD_TOPIC]
    if len(FrameStore(frames).keys()) >= wanted:
        say(f"    {frames} holds all {wanted} frames, kept")
        return
    replay(bag, ["--params", str(params), "--no-segmenter", "--record", str(frames)], log,
           cloud_topic=CLOUD_TOPIC, rate=rate, segmenter=False,
           done=lambda: len(FrameStore(frames).keys()) >= wanted)
    say(f"    recorded {len(FrameStore(frames).keys())} synced frames into {frames}")


def engine_config(cfg: DemoConfig):
    """The pseudo-label engine's settings for the chosen masks: `sal-ros pseudolabel`'s defaults otherwise."""
    from sal_ros.pseudolabel.engine import EngineConfig

    if cfg.masks == "slic":
        mask_options = {"n_segments": cfg.slic_segments}
    else:
        mask_options = {"checkpoint": cfg.sam2_checkpoint, "points_per_side": 32, "pred_iou_thresh": 0.8,
                        "stability_score_thresh": 0.95, "config": cfg.sam2_config or SAM2_CONFIG}
    return EngineConfig(masks=cfg.masks, mask_options=mask_options, clip_model=cfg.clip_model,
                        clip_pretrained=cfg.clip_pretrained, device="cpu")


def step_pseudolabel(frames: Path, labels: Path, bag: Path, run: str, cfg: DemoConfig) -> None:
    """Pseudo-labels of the recorded frames: the engine with the chosen masks, or the oracle (same settings)."""
    from sal_ros.demo.oracle import label_recorded_frames, load_ground_truth, oracle_config
    from sal_ros.pseudolabel.engine import run as label_frames

    config = engine_config(cfg)
    if run == ORACLE:
        done, skipped = label_recorded_frames(frames, load_ground_truth(bag), labels, oracle_config(config),
                                              cfg.progress)
    else:
        summary = label_frames(frames, config, labels, progress=cfg.progress)
        if summary.failed:
            raise RuntimeError(f"pseudo-labeling failed on {len(summary.failed)} frames: {summary.failed}")
        done, skipped = summary.done, summary.skipped
    say(f"    {done} frames labelled, {skipped} kept, in {labels}")


def train_config(frames: Path, labels: Path, train_dir: Path, cfg: DemoConfig) -> dict:
    """config/train_tiny.yaml fitted to two scans: whole frustums (no FrankenFrustum), PQ-sized segments only."""
    base = yaml.safe_load(config_file("train_tiny.yaml").read_text())
    base.update(out_dir=str(train_dir), device="cpu", checkpoint_every=max(10, cfg.steps // 4),
                text_encoder={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained},
                sources=[{"frames": str(frames), "pseudolabels": str(labels)}])
    base["data"].update(max_points=cfg.max_points, franken_frustum=1, min_instance_points=LABEL_MIN_POINTS)
    base["optim"].update(steps=cfg.steps, lr=3e-3, warmup_steps=min(10, max(1, cfg.steps // 5)))
    return base


def step_train(frames: Path, labels: Path, train_dir: Path, cfg: DemoConfig) -> tuple[Path, float]:
    """Distill the tiny student (resuming a stopped run); the checkpoint and the wall time of this call."""
    from sal_ros.train.dataset import DistillDataset, load_scans
    from sal_ros.train.trainer import TrainConfig, Trainer

    t0 = time.monotonic()
    config = train_config(frames, labels, train_dir, cfg)
    atomic_write(train_dir / "train.yaml", yaml.safe_dump(config, sort_keys=False))  # `sal-ros train --config` it
    train_cfg = TrainConfig.from_dict(config)
    scans = load_scans(train_cfg.sources, base=train_dir, text_encoder=train_cfg.text_encoder)
    trainer = Trainer(train_cfg, DistillDataset(scans, train_cfg.data, seed=train_cfg.seed), progress=cfg.progress)
    step = trainer.resume()  # ResumeError (a ValueError) when the folder holds another run
    if step:
        say(f"    resumed at step {step}")
    trainer.fit()
    say(f"    {trainer.step} steps -> {train_dir / 'model_last.pt'}")
    return train_dir / "model_last.pt", time.monotonic() - t0


def step_segment(bag: Path, params: Path, log: Path, rate: float) -> OnlineResult:
    """The segmenter node with the student on a replay of the bag; its labeled clouds and its ~/stats."""
    result = replay(bag, ["--params", str(params)], log, cloud_topic=CLOUD_TOPIC, rate=rate)
    summary = result.summary()
    say(f"    {summary['clouds_answered']}/{summary['clouds_sent']} clouds answered, end-to-end latency median "
        f"{summary['end_to_end_ms']['median']} ms")
    return result
