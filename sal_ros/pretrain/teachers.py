"""Frozen 2D teachers behind one interface: ``teacher.feature_map(frame, camera_name) -> FeatureMap``.

- ``dinov2``: a timm DINOv2 ViT (``vit_small_patch14_dinov2`` ... ``vit_large_patch14_dinov2``; ScaLR uses ViT-L/14)
  with weights from a local file; patch tokens of the last block, image resized so the short side is
  ``short_side`` (a multiple of the patch size);
- ``clip``: the open_clip image tower (MaskCLIP's dense value-path features, as ``sal-ros pseudolabel`` uses);
- ``random``: a seeded random projection of image patches (tests, plumbing);
- ``oracle``: the ground-truth class of the lidar points rendered into the image as one-hot features (for
  showing that distillation carries 2D knowledge into 3D when no real weights exist).

Without a weights file the ViT teachers run with seeded random weights and say so in their identity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.registry import Registry
from sal_ros.pseudolabel.clip_tokens import ClipTokenEncoder
from sal_ros.pseudolabel.lifting import LiftConfig, point_pixels
from sal_ros.pseudolabel.masks import as_rgb

log = logging.getLogger(__name__)
@dataclass
class FeatureMap:
    """(h, w, D) float32 features of one image; cell (r, c) covers pixels [r*sy, (r+1)*sy) x [c*sx, (c+1)*sx)."""

    feats: np.ndarray
    image_size: tuple[int, int]  # (H, W) of the camera image

    def cell_of(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Flat cell index of pixels (row, col)."""
        h, w = self.feats.shape[:2]
        r = np.minimum(rows.astype(np.int64) * h // self.image_size[0], h - 1)
        c = np.minimum(cols.astype(np.int64) * w // self.image_size[1], w - 1)
        return r * w + c

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.feats.reshape(-1, self.feats.shape[2])[self.cell_of(rows, cols)]


class RandomTeacher:
    """Seeded random linear map of ``patch`` x ``patch`` image patches (grey levels): deterministic features
    that depend on the image, for tests."""

    def __init__(self, dim: int = 32, patch: int = 8, seed: int = 0) -> None:
        self.dim, self.patch, self.seed = int(dim), int(patch), int(seed)
        self.weight = np.random.default_rng(seed).standard_normal((self.patch * self.patch, self.dim)).astype(np.float32)
        self.identity = {"teacher": "random", "dim": self.dim, "patch": self.patch, "seed": self.seed}

    def feature_map(self, frame, camera: str) -> FeatureMap:
        image = frame.cameras[camera].image
        grey = as_rgb(image).astype(np.float32).mean(axis=2) / 255.0
        p = self.patch
        h, w = grey.shape[0] // p, grey.shape[1] // p
        patches = grey[: h * p, : w * p].reshape(h, p, w, p).transpose(0, 2, 1, 3).reshape(h, w, p * p)
        return FeatureMap(np.tanh((patches - patches.mean()) @ self.weight), image.shape[:2])


class OracleTeacher:
    """One-hot ground-truth class (0..C, 0 = unlabelled) of the lidar points rendered into the image: each
    visible point (occlusion test of the pseudo-label engine) paints its class into the cell it falls in, the
    nearest point winning; cells no point reaches stay zero. ``stride`` pixels per cell."""

    def __init__(self, label_lut: np.ndarray, num_classes: int, stride: int = 4, lift=None) -> None:
        self.lut, self.num_classes, self.stride = np.asarray(label_lut), int(num_classes), int(stride)
        self.lift = lift or LiftConfig()
        self.dim = self.num_classes + 1
        self.identity = {"teacher": "oracle", "dim": self.dim, "stride": self.stride}

    def feature_map(self, frame, camera: str) -> FeatureMap:
        if frame.gt_labels is None:
            raise SensorDataError(f"frame {frame.key}: the oracle teacher needs ground-truth labels")
        view = frame.cameras[camera]
        H, W = view.image.shape[:2]
        h, w = -(-H // self.stride), -(-W // self.stride)
        px = point_pixels(frame.points, view, self.lift)
        keep = px.visible
        cls = self.lut[frame.gt_labels[px.index[keep]] & 0xFFFF].astype(np.int64)
        cell = (px.v[keep] // self.stride) * w + px.u[keep] // self.stride
        order = np.lexsort((px.depth[keep], cell))  # by cell, nearest first
        cells, first = np.unique(cell[order], return_index=True)
        owner = np.full(h * w, -1, np.int64)
        owner[cells] = cls[order][first]
        feats = np.zeros((h * w, self.dim), np.float32)
        hit = owner >= 0
        feats[np.flatnonzero(hit), owner[hit]] = 1.0
        return FeatureMap(feats.reshape(h, w, self.dim), (H, W))


class _ViTTeacher:
    """Shared image handling: RGB, resize to a patch grid with the short side ``short_side``, normalise."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def _tensor(self, image: np.ndarray, grid: tuple[int, int]):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(as_rgb(image))).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(grid[0] * self.patch, grid[1] * self.patch), mode="bilinear",
                                            antialias=True, align_corners=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        scale = self.short_side / min(height, width)
        return max(1, round(height * scale / self.patch)), max(1, round(width * scale / self.patch))


class DinoV2Teacher(_ViTTeacher):
    def __init__(self, model: str = "vit_small_patch14_dinov2", weights: str | None = None, short_side: int = 224,
                 device: str = "cpu", seed: int = 0) -> None:
        import timm
        import torch

        torch.manual_seed(seed)  # random weights (no file) are then reproducible
        self.net = timm.create_model(model, pretrained=False, num_classes=0, dynamic_img_size=True).eval().to(device)
        if weights:  # timm's or Meta's layout (timm's filter converts the latter: mask_token, registers, ...)
            from timm.models.vision_transformer import checkpoint_filter_fn

            _load_weights(self.net, Path(weights), lambda state: checkpoint_filter_fn(state, self.net))
        else:
            log.warning("DINOv2 teacher %s without a weights file: seeded random weights, features mean nothing", model)
        self.device, self.patch = torch.device(device), int(self.net.patch_embed.patch_size[0])
        self.short_side = int(short_side)
        self.dim = int(self.net.num_features)
        self.identity = {"teacher": "dinov2", "model": model, "weights": str(weights) if weights else None,
                         "short_side": self.short_side, "dim": self.dim}

    def feature_map(self, frame, camera: str) -> FeatureMap:
        import torch

        image = frame.cameras[camera].image
        grid = self._grid(*image.shape[:2])
        with torch.inference_mode():
            tokens = self.net.forward_features(self._tensor(image, grid))[0, self.net.num_prefix_tokens:]
        return FeatureMap(tokens.float().reshape(grid[0], grid[1], -1).cpu().numpy(), image.shape[:2])


class ClipTeacher:
    """open_clip image tower: MaskCLIP dense features (last block's value path, in the joint space)."""

    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = None, short_side: int | None = None,
                 device: str = "cpu") -> None:
        self.encoder = ClipTokenEncoder(model, pretrained, device=device, method="dense", short_side=short_side)
        self.dim = self.encoder.dim
        self.identity = {"teacher": "clip", **self.encoder.identity}

    def feature_map(self, frame, camera: str) -> FeatureMap:
        import torch

        image = frame.cameras[camera].image
        with torch.inference_mode():
            feats, grid = self.encoder.patch_features(as_rgb(image))
        return FeatureMap(feats.float().reshape(grid[0], grid[1], -1).cpu().numpy(), image.shape[:2])


def _load_weights(net, path: Path, convert=None) -> None:
    """A local state dict (.safetensors, or .pt / .pth read with weights_only=True) into ``net``, strictly
    (after ``convert(state)`` when given)."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if convert is not None:
        state = convert(state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the teacher (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _oracle_teacher(label_lut: np.ndarray | None, num_classes: int, lift, **options) -> OracleTeacher:
    if label_lut is None:
        raise ValueError("the oracle teacher needs a label set (SemanticKITTI ground truth)")
    return OracleTeacher(label_lut, num_classes, lift=lift, **options)


TEACHERS: Registry = Registry("teacher")  # each takes (label_lut, num_classes, lift, **options)
TEACHERS.register("dinov2", lambda label_lut, num_classes, lift, **options: DinoV2Teacher(**options))
TEACHERS.register("clip", lambda label_lut, num_classes, lift, **options: ClipTeacher(**options))
TEACHERS.register("random", lambda label_lut, num_classes, lift, **options: RandomTeacher(**options))
TEACHERS.register("oracle", _oracle_teacher)


def build_teacher(cfg: dict, label_lut: np.ndarray | None = None, num_classes: int = 0, lift=None):
    """A teacher from its config dict ``{"kind": ..., **options}``."""
    cfg = dict(cfg or {})
    return TEACHERS.lookup(cfg.pop("kind", "random"))(label_lut, num_classes, lift, **cfg)


__all__ = ["FeatureMap", "RandomTeacher", "OracleTeacher", "DinoV2Teacher", "ClipTeacher", "build_teacher", "TEACHERS"]
