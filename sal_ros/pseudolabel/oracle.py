"""Ground truth in place of the foundation models, to measure the rest of the pipeline without their weights.

- ``OracleMasks`` (mask source ``oracle``): the ground-truth segments rendered into each camera image take the
  place of SAM's masks; lifting, fusion and DBSCAN replace are the engine's. Upper bound of the 2D masks.
- ``oracle_tokens``: each pseudo-instance's token is the text embedding of the class that the ground truth says
  it mostly covers (plus optional noise), in place of its MaskCLIP token. Given ideal CLIP tokens, the student's
  zero-shot classification then measures what distillation and the text path keep.
- ``class_text_tokens``: the class names through the package's text encoder (the same weights and prompt form
  the node and ``eval model`` embed the vocabulary with).
"""
from __future__ import annotations

import zlib

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.data.labels import get_label_set
from sal_ros.pseudolabel.geometric import render_segments
from sal_ros.pseudolabel.masks import Masks

SPLAT = (2, 3)  # pixels each point paints around its projection (x, y), as `sal-ros eval pseudolabels` does


def oracle_masks(frame, view, segment: np.ndarray, min_depth: float = 1.0, splat: tuple[int, int] = SPLAT) -> Masks:
    """Ground-truth segments rendered into the image (z-buffer splats, ``render_segments``); segment 0 = none."""
    return render_segments(frame.points, view, segment, min_depth, splat)


class OracleMasks:
    """Mask source ``oracle``: per camera, one mask per ground-truth segment of the frame (ignore-class points
    paint nothing). The frame's ``gt_labels`` are required; a frame without them fails by name."""

    name = "oracle"

    def __init__(self, splat=SPLAT, label_set: str = "semantickitti", min_depth: float = 1.0) -> None:
        self.splat = (int(splat[0]), int(splat[1]))
        self.label_set = label_set
        self.min_depth = float(min_depth)
        self.identity = {"source": "oracle", "splat": list(self.splat)}

    def generate(self, image: np.ndarray) -> Masks:
        raise NotImplementedError("oracle masks are rendered from ground truth: use generate_for_frame()")

    def generate_for_frame(self, frame) -> dict[str, Masks]:
        if frame.gt_labels is None:
            raise SensorDataError(f"frame {frame.key}: oracle masks need ground-truth labels")
        return self.frame_masks(frame, frame.gt_labels)

    def frame_masks(self, frame, gt_labels: np.ndarray) -> dict[str, Masks]:
        cls, seg = get_label_set(self.label_set).split(gt_labels)
        seg = np.where(cls > 0, seg + 1, 0)  # +1: raw label 0 of an unlabeled thing must not vanish
        return {name: oracle_masks(frame, view, seg, self.min_depth, self.splat) for name, view in frame.cameras.items()}


def class_text_tokens(class_names, encoder_cfg: dict) -> np.ndarray:
    """(C, D) L2-normalized text embeddings of the class names (the oracle's pseudo-label tokens)."""
    from sal_ros.model.text_encoder import TextEncoder

    encoder = TextEncoder(encoder_cfg.get("model", "ViT-B-16"), encoder_cfg.get("pretrained"))
    emb = np.asarray(encoder.encode([n.replace("-", " ").replace("_", " ") for n in class_names]), np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def majority_class(instance: np.ndarray, gt_class: np.ndarray, num_instances: int) -> np.ndarray:
    """(K,) the ground-truth class (1..C) most of each pseudo-instance's labelled points carry; 0 where an
    instance covers only ignore-class points."""
    inst = np.asarray(instance, np.int64)
    cls = np.asarray(gt_class, np.int64)
    use = (inst > 0) & (cls > 0)
    if not use.any():
        return np.zeros(num_instances, np.int64)
    votes = np.zeros((num_instances + 1, int(cls.max()) + 1), np.int64)
    np.add.at(votes, (inst[use], cls[use]), 1)
    out = votes.argmax(axis=1)
    out[votes.sum(axis=1) == 0] = 0
    return out[1:]


def oracle_tokens(key: str, instance: np.ndarray, gt_labels: np.ndarray, label_set, class_tokens: np.ndarray,
                  noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(instance, tokens) of one frame's pseudo-labels with oracle tokens: pseudo-instance k gets the text token
    of its majority ground-truth class; ``noise`` adds a Gaussian of that norm (relative to the unit token,
    drawn per frame from ``(seed, key)``) before renormalising. Instances on ignore-class points only have no
    class to name: their points become unlabeled, and the ids are renumbered."""
    instance = np.asarray(instance, np.int64)
    k = int(instance.max(initial=0))
    cls = majority_class(instance, label_set.split(gt_labels)[0], k)
    keep = np.flatnonzero(cls > 0)
    remap = np.zeros(k + 1, np.int64)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    tokens = np.asarray(class_tokens, np.float32)[cls[keep] - 1]
    if noise > 0 and len(tokens):
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        tokens = tokens + noise * rng.standard_normal(tokens.shape).astype(np.float32) / np.sqrt(tokens.shape[1])
        tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    return remap[instance], tokens.astype(np.float32)
