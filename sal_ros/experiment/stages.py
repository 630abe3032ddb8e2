"""The experiment's stages, each cached in ``out_dir`` and resumed where it stopped:

- ``pseudolabel``: the engine per teacher over the training frames (its own per-frame resume; local or Ray);
- ``pseudolabel_quality``: class-agnostic PQ of those pseudo-labels against ground truth (``eval pseudolabels``'
  scoring);
- ``train``: one student or reference per distinct train config, in ``train/<config hash>/`` (a config.yaml that
  ``sal-ros train --config`` reproduces; the trainer's exact resume);
- ``self_train``: a student's self-training rounds when the recipe has a ``self_training`` section, in
  ``train/<config hash>/round_<r>/`` (train/selftrain.py; ``sal-ros train`` on that config.yaml runs them too);
- ``evaluate``: a checkpoint through the node's Segmenter on a test set, scored on the camera frustum and on the
  whole scan (``eval model``'s conventions) in one pass, cached per (checkpoint, test set).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from sal_ros.core.camera import in_camera_frustum
from sal_ros.core.files import atomic_write
from sal_ros.experiment.config import ExperimentConfig, Teacher, TestSet

REGIONS = ("frustum", "full")


def config_hash(data) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, data) -> Path:
    return atomic_write(path, json.dumps(data, indent=1, default=str))


# ------------------------------------------------------------------------------------------- pseudo-labels
def engine_config(teacher: Teacher):
    """The teacher's engine settings; tokens off: the students take oracle tokens (no CLIP image tower here)."""
    from sal_ros.pseudolabel.engine import EngineConfig

    return EngineConfig.from_dict({"tokens": False, **teacher.engine})


def pseudolabel_dir(cfg: ExperimentConfig, teacher: Teacher) -> Path:
    return cfg.out_dir / "pseudolabels" / f"{teacher.name}-{engine_config(teacher).config_hash()}"


def pseudolabel(cfg: ExperimentConfig, teacher: Teacher, select: str, progress: bool) -> dict:
    from sal_ros.pseudolabel.engine import run

    opts = cfg.pseudolabel
    summary = run(cfg.dataset, engine_config(teacher), pseudolabel_dir(cfg, teacher), workers=int(opts.get("workers", 1)),
                  backend=opts.get("backend", "local"), progress=progress, ray_address=opts.get("ray_address"),
                  select=select)
    if summary.failed:
        raise RuntimeError(f"pseudo-labels of teacher {teacher.name}: {len(summary.failed)} frames failed: "
                           + "; ".join(f"{k}: {v}" for k, v in list(summary.failed.items())[:3]))
    return asdict(summary)


def pseudolabel_quality(cfg: ExperimentConfig, teacher: Teacher, select: str, progress: bool) -> dict:
    """Class-agnostic PQ / SQ / RQ of the teacher's pseudo-labels on the selected frames (camera-visible,
    labelled points; SAL's pseudo-label metric), cached."""
    from tqdm import tqdm

    from sal_ros.data.labels import get_label_set
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path
    from sal_ros.data.sources import iter_source_frames
    from sal_ros.eval.pseudolabels import PseudoLabelScore, scored_points

    folder = pseudolabel_dir(cfg, teacher)
    path = cfg.out_dir / "quality" / f"{folder.name}-{config_hash([select, cfg.label_set])}.json"
    if path.exists():
        return json.loads(path.read_text())
    label_set, score = get_label_set(cfg.label_set), PseudoLabelScore()
    min_depth = engine_config(teacher).lift.min_depth
    for frame in tqdm(iter_source_frames(cfg.dataset, select=select), desc=f"quality {teacher.name}", unit="frame",
                      disable=not progress):
        pl = load_pseudolabels(pseudolabel_path(folder, frame.key), frame.num_points)
        keep, cls, seg, thing = scored_points(frame, label_set, min_depth)
        score.add(pl.instance[keep], cls, seg, thing, label_set.min_points)
    result = score.summary()
    write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------------ training
def train_config(cfg: ExperimentConfig, sources: list[dict], data: dict | None = None) -> dict:
    """The recipe with these sources (absolute paths), the experiment's steps and any data overrides."""
    d = json.loads(json.dumps(cfg.recipe))
    d["sources"] = sources
    d["device"] = cfg.device
    d["out_dir"] = "."  # the folder of the config.yaml written beside the run
    if cfg.steps:
        d.setdefault("optim", {})["steps"] = int(cfg.steps)
    if data:
        d["data"] = {**d.get("data", {}), **data}
    return d


def student_sources(cfg: ExperimentConfig, teacher: Teacher, select: str) -> list[dict]:
    return [{"frames": str(cfg.dataset), "select": select, "pseudolabels": str(pseudolabel_dir(cfg, teacher)),
             "oracle_tokens": cfg.label_set, "token_noise": cfg.token_noise}]


def supervised_sources(cfg: ExperimentConfig, select: str, region: str) -> list[dict]:
    return [{"frames": str(cfg.dataset), "select": select, "oracle": cfg.label_set, "region": region}]


def train_dir(cfg: ExperimentConfig, train_cfg: dict) -> Path:
    return cfg.out_dir / "train" / config_hash(train_cfg)


def train(cfg: ExperimentConfig, train_cfg: dict, progress: bool) -> dict:
    """Train (or resume, or find finished) the run of ``train_cfg``; its checkpoint and what it took."""
    from sal_ros.train.dataset import DistillDataset, load_scans
    from sal_ros.train.trainer import TrainConfig, Trainer

    out = train_dir(cfg, train_cfg)
    done = out / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", yaml.safe_dump(train_cfg, sort_keys=False))
    tc = TrainConfig.from_dict(train_cfg)
    tc.out_dir = str(out)
    scans = load_scans(tc.sources, base=out, text_encoder=tc.text_encoder, seed=tc.seed)
    trainer = Trainer(tc, DistillDataset(scans, tc.data, seed=tc.seed), progress=progress)
    start = trainer.resume()
    t0 = time.perf_counter()
    records = trainer.fit()
    info = {"checkpoint": str(out / "model_last.pt"), "config": str(out / "config.yaml"), "frames": len(scans),
            "steps": tc.optim.steps, "resumed_at": start, "train_wall_s": round(time.perf_counter() - t0, 1),
            "final_loss": records[-1]["loss"] if records else None}
    write_json(done, info)
    return info


def self_train(cfg: ExperimentConfig, train_cfg: dict, info: dict, progress: bool) -> list[dict]:
    """The recipe's ``self_training`` rounds after the run of ``train_cfg`` (train/selftrain.py): round r in
    ``<its folder>/round_<r>``, each cached (``done.json``); [] when the recipe has none."""
    from sal_ros.train.dataset import load_scans
    from sal_ros.train.selftrain import SelfTrainConfig
    from sal_ros.train.selftrain import self_train as rounds
    from sal_ros.train.trainer import TrainConfig

    if not SelfTrainConfig.from_dict(train_cfg.get("self_training")).rounds:
        return []
    out = train_dir(cfg, train_cfg)
    tc = TrainConfig.from_dict(train_cfg)
    tc.out_dir = str(out)
    scans = load_scans(tc.sources, base=out, text_encoder=tc.text_encoder, seed=tc.seed)
    return [{**r, "config": info["config"], "frames": len(scans)}
            for r in rounds(tc, scans, Path(info["checkpoint"]), progress)]


def untrained(cfg: ExperimentConfig) -> dict:
    """The recipe's model at initialisation (its seed), saved as a checkpoint: the floor every model must beat."""
    from sal_ros.model.text_encoder import TextEncoder
    from sal_ros.train.loop import seed_everything
    from sal_ros.train.trainer import TrainConfig, build_model, save_model

    d = train_config(cfg, [])
    out = cfg.out_dir / "train" / f"untrained-{config_hash([d['model'], d['seed'], d.get('text_encoder')])}"
    path = out / "model_last.pt"
    if not path.exists():
        tc = TrainConfig.from_dict(d)
        seed_everything(tc.seed)
        dim = TextEncoder(tc.text_encoder.get("model", "ViT-B-16"), tc.text_encoder.get("pretrained")).embed_dim
        save_model(path, build_model(tc.model, dim), {"step": 0, "untrained": True}, tc.text_encoder)
    return {"checkpoint": str(path), "frames": 0, "steps": 0}


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg: ExperimentConfig, checkpoint: Path, test: TestSet, progress: bool, keep_view: bool) -> dict:
    """Zero-shot panoptic metrics of a checkpoint on a test set, camera frustum and whole scan, as ``eval model``
    computes them (the node's Segmenter and score threshold); cached next to the checkpoint. ``keep_view``
    also stores the first scan's prediction for the bird's-eye figure."""
    from tqdm import tqdm

    from sal_ros.core.cloud_input import SegmenterConfig
    from sal_ros.data.labels import get_label_set, vocabulary_lut
    from sal_ros.data.sources import iter_source_frames
    from sal_ros.eval.model import build_segmenter
    from sal_ros.eval.offline import add_frame, to_dataset_classes
    from sal_ros.eval.panoptic import PanopticEvaluator

    key = config_hash([str(test.path), test.select, str(cfg.vocabulary), cfg.label_set, checkpoint.stat().st_mtime_ns])
    path = checkpoint.parent / "eval" / f"{test.name}-{key}.json"
    view_path = path.with_suffix(".npz")
    if path.exists() and (view_path.exists() or not keep_view):
        cached = json.loads(path.read_text())
        if all("agnostic_by_class" in cached[r] for r in REGIONS):  # a score of older code lacks it: scored again
            return cached
    label_set = get_label_set(cfg.label_set)
    segmenter = build_segmenter(checkpoint, cfg.vocabulary, cfg.device, SegmenterConfig())
    evaluators = {r: PanopticEvaluator.for_label_set(label_set) for r in REGIONS}
    lut, frames = None, 0
    for frame in tqdm(iter_source_frames(test.path, select=test.select), desc=f"eval {test.name}", unit="frame",
                      disable=not progress):
        if frame.gt_labels is None:
            continue
        seg = segmenter.segment(frame.points, frame.intensity)
        lut = vocabulary_lut(seg.class_names, label_set) if lut is None else lut
        inside = in_camera_frustum(frame)
        add_frame(evaluators["full"], seg, frame.gt_labels, label_set, lut)
        add_frame(evaluators["frustum"], seg, frame.gt_labels, label_set, lut, inside)
        if frames == 0 and keep_view:
            sem, inst = to_dataset_classes(seg, label_set, lut)
            gt_sem, gt_seg = label_set.split(frame.gt_labels)
            view = {"xy": frame.points[:, :2].astype(np.float32), "sem": sem.astype(np.int16), "inside": inside,
                    "inst": inst.astype(np.int64), "gt_sem": gt_sem.astype(np.int16), "gt_seg": gt_seg.astype(np.int64),
                    "key": np.array(frame.key)}  # plain arrays: read back without pickle
            atomic_write(view_path, lambda f, view=view: np.savez_compressed(f, **view))
        frames += 1
    if frames == 0:
        raise ValueError(f"test set {test.name} ({test.path}, select {test.select}): no frame with ground truth")
    result = {"frames": frames, "test": {"path": str(test.path), "select": test.select}}
    for region, ev in evaluators.items():
        res = ev.compute()
        s = res.summary
        result[region] = {k: 100 * float(s[k]) for k in ("agnostic_pq", "agnostic_sq", "agnostic_rq", "pq", "sq",
                                                         "rq", "miou", "pq_things", "pq_stuff")}
        result[region].update({f"agnostic_{k}": int(res.agnostic[k]) for k in ("tp", "fp", "fn")})
        result[region]["agnostic_by_class"] = res.agnostic_per_class()
    write_json(path, result)
    return result
