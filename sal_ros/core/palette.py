"""The one colour palette of sal_ros: class colours of the node's outputs and segment colours of the demo's PNGs.

Id 0 (no class, no segment) is grey; id k >= 1 gets hue 0.12 + (k - 1) * golden ratio (mod 1), so neighbouring
ids differ strongly and a class keeps its colour when classes are appended to the vocabulary. numpy only: the node
(``~/labeled_points`` rgb, ``~/markers``, overlays) and the offline renderers import it alike.
"""
from __future__ import annotations

import colorsys

import numpy as np

UNLABELED_COLOR = (110, 110, 110)
GOLDEN = 0.618033988749895
SATURATION = 0.8
VALUES = (0.95, 0.8)  # even and odd ids alternate brightness


def _hsv_to_rgb(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    """Vectorised ``colorsys.hsv_to_rgb`` with the same float operations, so results are bit-identical."""
    i = (h * 6.0).astype(np.int64)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    sector = i % 6
    return np.stack([np.select([sector == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)], -1)


def id_colors(ids: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB per id (class label or segment id, >= 0); id 0 is ``UNLABELED_COLOR``."""
    ids = np.asarray(ids, np.int64)
    k = np.maximum(ids - 1, 0).astype(np.float64)
    hue = (0.12 + k * GOLDEN) % 1.0
    value = np.where(np.maximum(ids - 1, 0) % 2 == 0, VALUES[0], VALUES[1])
    rgb = np.round(_hsv_to_rgb(hue, SATURATION, value) * 255).astype(np.uint8)
    rgb[ids == 0] = UNLABELED_COLOR
    return rgb


def class_colors(num_classes: int) -> np.ndarray:
    """``(num_classes + 1, 3)`` uint8 RGB indexed by label: grey for label 0, then well-separated hues."""
    return id_colors(np.arange(num_classes + 1))


def label_colors(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Per-point colours from ``palette`` rows (``(K, 3)`` uint8 or packed ``(K,)``); labels beyond the palette
    (a stale vocabulary) are drawn as label 0."""
    label = np.asarray(label)
    if label.size and label.max() >= len(palette):
        label = np.where(label < len(palette), label, 0)
    return palette[label]


def segment_colors(segment: np.ndarray, none: np.ndarray | None = None) -> np.ndarray:
    """``(N, 3)`` uint8 per point: each distinct non-zero segment id gets its own palette colour (ids ranked, so a
    frame's segments take the best-separated first hues); segment 0 and points in ``none`` are grey."""
    segment = np.asarray(segment, np.int64)
    uniq, rank = np.unique(segment, return_inverse=True)
    rank = rank.reshape(segment.shape) + (0 if uniq.size and uniq[0] == 0 else 1)
    if none is not None:
        rank = np.where(none, 0, rank)
    return id_colors(rank)


def track_color(track_id: int) -> tuple[int, int, int]:
    """RGB of a track: hue by golden-ratio steps of its id, so neighbouring ids differ and an id keeps its colour."""
    hue = (0.05 + int(track_id) * GOLDEN) % 1.0
    value = 1.0 if int(track_id) % 3 else 0.75
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))
