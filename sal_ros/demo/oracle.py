"""Oracle pseudo-labels of the recorded frames: the ground-truth segments rendered into each camera image take the
place of SAM's masks; CLIP tokens, lifting, camera fusion and DBSCAN replace are the pseudo-label engine's, with
the same settings as the run with real masks. So the oracle run differs from it in the 2D masks only, and shows
what lifting and distillation make of object-level masks.

The recorder stores what the robot sees, not ground truth: the labels come from the bag's ``labels.npz``
(``sal-ros convert``), joined by the cloud's stamp.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from sal_ros.data.convert import LABELS_FILE
from sal_ros.data.framestore import FrameStore
from sal_ros.data.labels import get_label_set
from sal_ros.data.pseudolabels import pseudolabel_path, save_pseudolabels
from sal_ros.pseudolabel.engine import EngineConfig, PseudoLabeler, label_from_masks, pending_keys
from sal_ros.pseudolabel.masks import Masks
from sal_ros.pseudolabel.oracle import SPLAT, OracleMasks


def oracle_config(masks_run: EngineConfig) -> EngineConfig:
    """The masks run's engine settings with the oracle as mask source (a config hash of its own)."""
    return replace(masks_run, masks="oracle", mask_options={"splat": list(SPLAT)})


def load_ground_truth(bag: Path) -> dict[int, np.ndarray]:
    """Cloud stamp (ns) -> raw SemanticKITTI panoptic label per point, as ``sal-ros convert`` stored them."""
    with np.load(bag / LABELS_FILE) as gt_file:
        return {int(k): gt_file[k] for k in gt_file.files}


def frame_masks(frame, gt_labels: np.ndarray, label_set, min_depth: float) -> dict[str, Masks]:
    """Per camera, one mask per ground-truth segment (ignore-class points paint nothing)."""
    return OracleMasks(SPLAT, label_set.name, min_depth).frame_masks(frame, gt_labels)


def label_recorded_frames(frames: Path, gt: dict[int, np.ndarray], out: Path, config: EngineConfig,
                          progress: bool = True) -> tuple[int, int]:
    """Write oracle pseudo-labels of every recorded frame not yet labelled (resume); (written, skipped)."""
    store = FrameStore(frames)
    keys = store.keys()
    out.mkdir(parents=True, exist_ok=True)
    todo = pending_keys(keys, out, config.config_hash(), overwrite=False)
    if not todo:
        return 0, len(keys)
    written, skipped = len(todo), len(keys) - len(todo)
    labeler = PseudoLabeler(config, mask_source=OracleMasks())
    label_set = get_label_set("semantickitti")
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="oracle pseudo-labels", unit="frame")
    for key in todo:
        frame = store.load(key)
        if frame.stamp_ns not in gt:
            raise ValueError(f"recorded frame {key} (stamp {frame.stamp_ns}) has no ground truth in the bag")
        masks = frame_masks(frame, gt[frame.stamp_ns], label_set, config.lift.min_depth)
        tokens = None
        if labeler.token_encoder is not None:
            tokens = {name: labeler.token_encoder.encode(frame.cameras[name].image, m) for name, m in masks.items()}
        pl = label_from_masks(frame, masks, tokens, config.lift, config.fusion_iou, config.refine,
                              config.min_points, labeler.token_dim, labeler.meta)
        save_pseudolabels(pseudolabel_path(out, key), pl)
    return written, skipped
