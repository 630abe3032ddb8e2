"""Score sources of semantic pseudo-labels: per camera image, class probabilities ``(C, h, w)`` at any resolution.

``clip`` (open vocabulary: MaskCLIP dense features of the open_clip image tower against the vocabulary's text
embeddings), ``folder`` (precomputed maps of any closed-set segmenter), ``torchscript`` (a local TorchScript model
file) and ``oracle`` (ground-truth classes rendered into the image, degraded by Gaussian logit noise: the
known-quality teacher of the tests and the measurements). ``build_score_source`` picks one by name.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.registry import Registry
from sal_ros.data.labels import get_label_set
from sal_ros.model.text_encoder import TextEncoder
from sal_ros.model.vocabulary import Vocabulary
from sal_ros.pseudolabel.clip_tokens import ClipTokenEncoder
from sal_ros.core.camera import project_view
from sal_ros.pseudolabel.masks import as_rgb


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def render_point_values(points: np.ndarray, view, values: np.ndarray, min_depth: float = 1.0,
                        splat: tuple[int, int] = (2, 3)) -> np.ndarray:
    """(H, W) int64 image of per-point ``values``: each projected point paints a (2 sx + 1) x (2 sy + 1) splat and
    the nearest point wins a pixel (z-buffer), as a camera would show the scene; 0 where no point paints."""
    idx, uv, depth = project_view(points, view, min_depth)
    h, w = view.image.shape[:2]
    du, dv = np.meshgrid(np.arange(-splat[0], splat[0] + 1), np.arange(-splat[1], splat[1] + 1))
    u = (uv[:, 0].astype(np.int64)[:, None] + du.reshape(1, -1)).ravel()
    v = (uv[:, 1].astype(np.int64)[:, None] + dv.reshape(1, -1)).ravel()
    d, val = np.repeat(depth, du.size), np.repeat(np.asarray(values)[idx], du.size)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    pix, d, val = v[ok] * w + u[ok], d[ok], val[ok]
    order = np.lexsort((d, pix))  # per pixel, nearest first
    pix, val = pix[order], val[order]
    first = np.r_[True, pix[1:] != pix[:-1]]
    image = np.zeros(h * w, np.int64)
    image[pix[first]] = val[first]
    return image.reshape(h, w)


class OracleScores:
    """Ground-truth classes rendered into the image (z-buffered splats, the nearest point wins a pixel: what the
    camera shows), as logits ``strength`` * one-hot + N(0, ``noise``) per pixel and class; unrendered pixels get
    noise only. A known-quality stand-in for a 2D segmenter (``noise`` 0: a perfect one)."""

    name = "oracle"

    def __init__(self, label_set: str = "semantickitti", noise: float = 1.0, strength: float = 2.0,
                 splat: tuple[int, int] = (2, 3), seed: int = 0, min_depth: float = 1.0) -> None:
        self.label_set = get_label_set(label_set)
        self.class_names = list(self.label_set.class_names)
        self.noise, self.strength, self.splat, self.seed, self.min_depth = noise, strength, tuple(splat), seed, min_depth

    def render(self, frame, view) -> np.ndarray:
        """(H, W) int class id per pixel (0 = none) of the nearest ground-truth point."""
        if frame.gt_labels is None:
            raise SensorDataError(f"frame {frame.key}: oracle scores need ground-truth labels")
        cls, _ = self.label_set.split(frame.gt_labels)
        return render_point_values(frame.points, view, cls, self.min_depth, self.splat)

    def scores(self, frame, view) -> np.ndarray:
        rendered = self.render(frame, view)
        c = len(self.class_names)
        seed = [self.seed, int(hashlib.sha1(f"{frame.key}/{view.name}".encode()).hexdigest()[:8], 16)]
        logits = np.random.default_rng(seed).normal(0.0, self.noise, (c, *rendered.shape)).astype(np.float32)
        rows, cols = np.nonzero(rendered > 0)
        logits[rendered[rows, cols] - 1, rows, cols] += self.strength
        return softmax(logits)


class FolderScores:
    """Precomputed maps of any 2D segmenter: ``<root>/<frame key>/<camera>.npy`` (C, h, w) probabilities or
    logits (``logits: true``), or (h, w) integer class maps (1..C, 0 = none); class names in
    ``<root>/classes.txt`` (one per line, class k on line k)."""

    name = "folder"

    def __init__(self, root: str, logits: bool = False) -> None:
        self.root, self.logits = Path(root), bool(logits)
        names = self.root / "classes.txt"
        if not names.is_file():
            raise FileNotFoundError(f"{names}: a score folder names its classes, one per line")
        self.class_names = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]

    def scores(self, frame, view) -> np.ndarray:
        path = self.root / frame.key / f"{view.name}.npy"
        if not path.is_file():
            raise SensorDataError(f"no score map {path}")
        m = np.load(path, allow_pickle=False)
        c = len(self.class_names)
        if m.ndim == 2 and m.dtype.kind in "iu":
            if m.max(initial=0) > c:
                raise SensorDataError(f"{path}: class {m.max()} but {c} classes")
            out = (m[None] == np.arange(1, c + 1)[:, None, None]).astype(np.float32)
            return out
        if m.ndim != 3 or m.shape[0] != c:
            raise SensorDataError(f"{path}: shape {m.shape}, expected ({c}, h, w) or (h, w) class ids")
        m = m.astype(np.float32)
        return softmax(m) if self.logits else m


class TorchScriptScores:
    """A local TorchScript segmenter: (1, 3, H, W) float RGB in [0, 1] -> (1, C, h, w) logits; class names given
    (``class_names``) or in a ``<model>.classes.txt`` beside it."""

    name = "torchscript"

    def __init__(self, model: str, class_names: list[str] | None = None, device: str = "cpu") -> None:
        import torch

        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model {path} not found")
        if class_names is None:
            names = path.with_suffix(path.suffix + ".classes.txt")
            if not names.is_file():
                raise FileNotFoundError(f"{names}: give the model's class names (class_names or this file)")
            class_names = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
        self.class_names = list(class_names)
        self.torch, self.device = torch, torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    def scores(self, frame, view) -> np.ndarray:
        rgb = as_rgb(view.image)
        x = self.torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().to(self.device) / 255.0
        with self.torch.inference_mode():
            out = self.model(x)
        out = out[0].float().cpu().numpy()
        if out.ndim != 3 or out.shape[0] != len(self.class_names):
            raise SensorDataError(f"TorchScript model gave shape {out.shape}, expected ({len(self.class_names)}, h, w)")
        return softmax(out)


class ClipDenseScores:
    """Open vocabulary, MaskCLIP-style (Zhou et al., ECCV 2022): per patch, the last ViT block's value path
    (``ClipTokenEncoder.patch_features``) in CLIP's joint space, cosine against the vocabulary's text embeddings
    (a class with several descriptions takes its best), softmax at CLIP's logit scale. Maps are patch-grid sized."""

    name = "clip"

    def __init__(self, vocabulary, clip_model: str = "ViT-B-16", pretrained: str | None = None, device: str = "cpu",
                 logit_scale: float = 100.0, short_side: int | None = None) -> None:
        if isinstance(vocabulary, (str, Path)):
            vocabulary = Vocabulary.from_yaml(vocabulary)
        elif not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_prompts(list(vocabulary))
        self.encoder = ClipTokenEncoder(clip_model, pretrained, device=device, method="dense", short_side=short_side)
        text = TextEncoder(clip_model, pretrained, device).encode(vocabulary)
        self.class_names = list(text.class_names)
        self.text = self.encoder.torch.from_numpy(np.ascontiguousarray(text.embeddings)).to(self.encoder.device)
        self.row_class = np.asarray(text.row_class)
        self.logit_scale = float(logit_scale)

    def scores(self, frame, view) -> np.ndarray:
        enc, torch = self.encoder, self.encoder.torch
        with torch.inference_mode():
            feats, grid = enc.patch_features(as_rgb(view.image))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            sims = (feats @ self.text.float().T).cpu().numpy()  # (P, rows)
        per_class = np.full((sims.shape[0], len(self.class_names)), -np.inf, np.float32)
        np.maximum.at(per_class.T, self.row_class, sims.T)
        return softmax(self.logit_scale * per_class.T.reshape(len(self.class_names), *grid), axis=0)


SCORE_SOURCES: Registry = Registry("score source")  # each takes (device, **options)
SCORE_SOURCES.register("clip", ClipDenseScores)
SCORE_SOURCES.register("folder", lambda device, **options: FolderScores(**options))
SCORE_SOURCES.register("torchscript", TorchScriptScores)
SCORE_SOURCES.register("oracle", lambda device, **options: OracleScores(**options))


def build_score_source(kind: str, device: str = "cpu", **options):
    return SCORE_SOURCES.lookup(kind)(device=device, **options)
