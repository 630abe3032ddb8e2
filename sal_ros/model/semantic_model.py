"""Semantic student: a backbone (the family ``ModelConfig.backbone`` names) + a linear
per-voxel class head, trained by ``sal-ros train`` with ``objective: semantic`` on semantic pseudo-labels
(the indoor ScaLR study) or labels (SAM2-AMML), and run by the node like the SAL model (``SemanticSegmenter``).

Classes are closed-set (the checkpoint's ``class_names``). At run time the vocabulary still decides what is
published: a predicted class is published under the vocabulary class of the same (normalized) name, and classes
the vocabulary does not name get label 0, so ``ros2 param set ... prompts`` selects classes as for SAL.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sal_ros.core.cloud_input import CloudInput, ConfiguredSegmenter, SegmenterConfig, spread_nearest
from sal_ros.core.types import Segmentation
from sal_ros.model.backbone import build_backbone
from sal_ros.model.checkpoint import CheckpointError, ModelError, _load_state, check_state, read_checkpoint
from sal_ros.model.config import ModelConfig
from sal_ros.model.sal import SALModel

log = logging.getLogger(__name__)


class SemanticModel(nn.Module):
    """``forward(points, intensity)`` -> per cloud (N_b, C) class logits (points of one voxel share them)."""

    # the SAL model's input path: the same features and voxels
    point_features = SALModel.point_features
    prepare = SALModel.prepare

    def __init__(self, config: ModelConfig, class_names: Sequence[str]) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("a semantic model needs class names")
        self.config = config
        self.class_names = tuple(str(c) for c in class_names)
        self.backbone = build_backbone(config)
        self.head = nn.Linear(self.backbone.out_widths[1], len(self.class_names))

    @property
    def token_dim(self) -> int:
        return self.config.decoder.token_dim

    def voxel_logits(self, vin) -> Tensor:
        return self.head(self.backbone(vin.voxels)[1].feats)

    def forward(self, points, intensity=None) -> list[Tensor]:
        vin = self.prepare(points, intensity)
        per_cloud = self.voxel_logits(vin).split(vin.num_voxels)
        return [logits[p2v] for logits, p2v in zip(per_cloud, vin.point_to_voxel)]


def semantic_classes(payload: dict) -> list[str] | None:
    """Class names of a semantic checkpoint (``sal-ros train`` with ``objective: semantic``), else None."""
    cfg = (payload.get("extra") or {}).get("train_config") or {}
    if cfg.get("objective") != "semantic":
        return None
    return list((cfg.get("semantic") or {}).get("class_names") or [])


def is_semantic_checkpoint(path: str | Path) -> bool:
    return semantic_classes(read_checkpoint(path)) is not None


def load_semantic_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[SemanticModel, dict]:
    payload = read_checkpoint(path, map_location)
    names = semantic_classes(payload)
    if not names:
        raise CheckpointError(f"{path}: not a semantic checkpoint (train objective 'semantic' with class names)")
    try:
        config = ModelConfig.from_dict(dict(payload["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: stored model config is not valid here: {exc}") from exc
    check_state(path, payload["model"], lambda: SemanticModel(config, names))
    model = SemanticModel(config, names)
    _load_state(model, payload["model"], path)
    return model.eval(), {"class_names": names, "extra": payload.get("extra") or {}, "path": str(path)}


def _norm(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


class SemanticSegmenter(ConfiguredSegmenter):
    """The Segmenter's interface (``set_embeddings``, ``configure``, ``segment``) for a semantic checkpoint;
    ``score_threshold`` applies to the class probability, ``min_points`` does not apply (no instances)."""

    def __init__(self, model: SemanticModel, device: str = "cpu", config: SegmenterConfig | None = None,
                 amp: bool = True) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._config = config or SegmenterConfig()
        self.amp = amp and self.device.type == "cuda"
        self._lock = threading.Lock()
        self._active = None  # (TextEmbeddings, lut: model class -> vocabulary label)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs: Any) -> "SemanticSegmenter":
        return cls(load_semantic_checkpoint(path)[0], device, **kwargs)

    def set_embeddings(self, text_embeddings) -> None:
        """Only the vocabulary's class names matter: they select (and name) the published classes."""
        index = {_norm(n): k + 1 for k, n in enumerate(text_embeddings.class_names)}
        lut = np.array([0] + [index.get(_norm(n), 0) for n in self.model.class_names], np.uint16)
        if not lut.any():
            log.warning("no vocabulary class names a class of the semantic model (%s): nothing will be labelled",
                        ", ".join(self.model.class_names))
        with self._lock:
            self._active = (text_embeddings, lut)

    @property
    def text_embeddings(self):
        return None if self._active is None else self._active[0]

    def run(self, cloud: CloudInput) -> Segmentation:
        """The model on an admitted cloud (``admit``), under the settings it was admitted with."""
        with self._lock:
            active = self._active
        if active is None:
            raise ModelError("no vocabulary: call set_embeddings(text_encoder.encode(vocabulary)) first")
        te, lut = active
        points, valid, run = cloud.points, cloud.valid, cloud.run
        out = Segmentation.empty(len(points), te.class_names, te.version)
        out.dropped_points = cloud.dropped_points
        if valid.size == 0:
            return out
        t0 = time.perf_counter()
        cls, prob = self.predict(points[run], None if cloud.intensity is None else cloud.intensity[run])
        t1 = time.perf_counter()
        if run.size < valid.size:
            cls, prob = spread_nearest(points, valid, run, cls, prob)
        label = lut[cls + 1]
        label[prob < cloud.config.score_threshold] = 0
        out.label[valid], out.score[valid] = label, np.where(label > 0, prob, 0.0)
        out.timings_ms = {"model": (t1 - t0) * 1e3, "postprocess": (time.perf_counter() - t1) * 1e3}
        return out

    def predict(self, points: np.ndarray, intensity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(model class index (N,), its probability (N,)) per point."""
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            p = torch.from_numpy(points).to(self.device)
            i = None if intensity is None else torch.from_numpy(intensity).to(self.device)
            prob = self.model(p, i)[0].float().softmax(-1)
            top, cls = prob.max(-1)
        return cls.cpu().numpy(), top.cpu().numpy().astype(np.float32)


__all__ = ["SemanticModel", "SemanticSegmenter", "load_semantic_checkpoint", "is_semantic_checkpoint"]
