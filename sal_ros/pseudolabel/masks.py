"""2D mask sources behind one interface, and SAL's "flatten" step.

``MaskSource.generate(image) -> Masks``: (M, H, W) bool masks at the image's resolution and (M,) scores.

- ``Sam2Masks``: SAM 2 / 2.1 automatic mask generator (``sam2`` package; hydra config name + checkpoint);
- ``SamMasks``: SAM automatic mask generator (``segment_anything``; model type + checkpoint);
- ``SlicMasks``: SLIC superpixels (scikit-image), Seal's classical baseline; needs no weights.

Without a checkpoint the SAM models keep their random initialisation: the pipeline runs (tests, benches) but
the masks mean nothing. ``image_size`` shrinks the model input (SAM 2 default 1024) for speed.

``flatten_masks`` is SAL's flatten: greedy NMS with intersection over the *smaller* mask, largest masks first,
so a whole object survives and the parts inside it (wheels, windows) are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sal_ros.core.errors import SensorDataError


@dataclass
class Masks:
    masks: np.ndarray  # (M, H, W) bool
    scores: np.ndarray  # (M,) float32
    boxes: np.ndarray | None = field(default=None, repr=False)  # (M, 4) cache of bboxes(), when known

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, bool)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        if self.masks.ndim != 3 or self.masks.shape[0] != self.scores.size:
            raise ValueError(f"masks {self.masks.shape} and scores {self.scores.shape} disagree")
        self.areas = self.masks.sum(axis=(1, 2), dtype=np.int64)  # (M,) pixels, used everywhere: once

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def bboxes(self) -> np.ndarray:
        """(M, 4) int64 row0, row1, col0, col1 (exclusive ends); empty masks get (0, 0, 0, 0). Cached."""
        if self.boxes is None:
            self.boxes = self._compute_bboxes()
        return self.boxes

    def _compute_bboxes(self) -> np.ndarray:
        rows, cols = self.masks.any(axis=2), self.masks.any(axis=1)
        out = np.zeros((len(self), 4), np.int64)
        has = self.areas > 0
        h, w = self.masks.shape[1:]
        out[has, 0] = rows[has].argmax(1)
        out[has, 1] = h - rows[has][:, ::-1].argmax(1)
        out[has, 2] = cols[has].argmax(1)
        out[has, 3] = w - cols[has][:, ::-1].argmax(1)
        return out

    def ids_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(P,) int32 mask index at the given pixels, -1 = none; where masks overlap the smaller one wins
        (the same rule as ``label_image``). Reads only pixels inside a mask's bounding box."""
        out = np.full(len(rows), -1, np.int32)
        if len(self) == 0 or len(rows) == 0:
            return out
        b = self.bboxes()
        cand = ((rows >= b[:, 0:1]) & (rows < b[:, 1:2]) & (cols >= b[:, 2:3]) & (cols < b[:, 3:4]))
        mi, pi = np.nonzero(cand)
        hit = self.masks[mi, rows[pi], cols[pi]]
        mi, pi = mi[hit], pi[hit]
        order = np.lexsort((self.areas[mi], pi))  # per point, smallest mask first
        mi, pi = mi[order], pi[order]
        first = np.r_[True, pi[1:] != pi[:-1]]
        out[pi[first]] = mi[first]
        return out

    @classmethod
    def empty(cls, height: int, width: int) -> "Masks":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.float32))


class MaskSource(Protocol):
    name: str

    def generate(self, image: np.ndarray) -> Masks: ...


def mask_source_identity(source) -> dict:
    """What made a source's masks, for file metadata: its ``identity``, else its name and scalar settings."""
    ident = getattr(source, "identity", None)
    if ident is None:
        ident = {"source": source.name, **{k: v for k, v in vars(source).items() if isinstance(v, (int, float, str))}}
    return ident


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) uint8/uint16/float image -> (H, W, 3) uint8 RGB, as the 2D models expect."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3] if image.shape[2] != 1 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise SensorDataError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(image, initial=0)) <= 1.0 else 1.0
        image = np.clip(np.nan_to_num(image) * scale, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SensorDataError(f"unsupported image dtype {image.dtype}")
    return np.ascontiguousarray(image)


def pairwise_intersections(masks: Masks) -> np.ndarray:
    """(M, M) pixel counts of pairwise mask intersections, counted only where bounding boxes overlap (most
    pairs of a full-resolution mask set never touch)."""
    m = len(masks)
    box = masks.bboxes()
    inter = np.zeros((m, m), np.int64)
    np.fill_diagonal(inter, masks.areas)
    r0 = np.maximum(box[:, None, 0], box[None, :, 0])
    r1 = np.minimum(box[:, None, 1], box[None, :, 1])
    c0 = np.maximum(box[:, None, 2], box[None, :, 2])
    c1 = np.minimum(box[:, None, 3], box[None, :, 3])
    for i, j in zip(*np.nonzero(np.triu((r1 > r0) & (c1 > c0), 1))):
        win = (slice(r0[i, j], r1[i, j]), slice(c0[i, j], c1[i, j]))
        inter[i, j] = inter[j, i] = np.count_nonzero(masks.masks[i][win] & masks.masks[j][win])
    return inter


def flatten_masks(masks: Masks, min_overlap: float = 0.8, order: str = "area") -> Masks:
    """Keep whole objects over their parts: drop a mask when intersection / area of the smaller of it and an
    already kept mask exceeds ``min_overlap``. ``order`` "area" visits large masks first (SAL), "score" by score."""
    if len(masks) <= 1:
        return masks
    masks.bboxes()  # computed once here, kept for lifting
    areas = masks.areas
    inter = pairwise_intersections(masks)
    smaller = np.minimum(areas[:, None], areas[None, :]).clip(min=1)
    overlap = inter / smaller
    if order == "area":
        visit = np.lexsort((-masks.scores, -areas))
    elif order == "score":
        visit = np.lexsort((-areas, -masks.scores))
    else:
        raise ValueError(f"order must be 'area' or 'score', got {order!r}")
    kept: list[int] = []
    for i in visit:
        if areas[i] > 0 and (not kept or overlap[i, kept].max() <= min_overlap):
            kept.append(int(i))
    kept_arr = np.array(sorted(kept), np.int64)
    return Masks(masks.masks[kept_arr], masks.scores[kept_arr], masks.bboxes()[kept_arr])


def label_image(masks: Masks) -> np.ndarray:
    """(H, W) int32 mask index per pixel, -1 = none; where flattened masks still overlap, the smaller one wins."""
    _, h, w = masks.masks.shape
    labels = np.full((h, w), -1, np.int32)
    for i in np.argsort(-masks.areas, kind="stable"):
        labels[masks.masks[i]] = i
    return labels


# --- sources -----------------------------------------------------------------------------------------------------

class SlicMasks:
    """SLIC superpixels as masks (score 1). ``n_segments`` per image; colour or greyscale input."""

    name = "slic"

    def __init__(self, n_segments: int = 150, compactness: float = 10.0, sigma: float = 1.0,
                 min_size_factor: float = 0.3) -> None:
        self.n_segments, self.compactness, self.sigma = n_segments, compactness, sigma
        self.min_size_factor = min_size_factor

    def generate(self, image: np.ndarray) -> Masks:
        from skimage.segmentation import slic

        rgb = as_rgb(image)
        grey = bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))
        seg = slic(rgb[..., 0] if grey else rgb, n_segments=self.n_segments, compactness=self.compactness,
                   sigma=self.sigma, start_label=0, min_size_factor=self.min_size_factor,
                   channel_axis=None if grey else -1)
        ids = np.unique(seg)
        masks = seg[None, :, :] == ids[:, None, None]
        return Masks(masks, np.ones(ids.size, np.float32))


def _records_to_masks(records: list[dict], height: int, width: int) -> Masks:
    if not records:
        return Masks.empty(height, width)
    masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
    scores = np.array([float(r.get("predicted_iou", 1.0)) for r in records], np.float32)
    return Masks(masks, scores)


_GENERATOR_DEFAULTS = dict(points_per_side=32, pred_iou_thresh=0.8, stability_score_thresh=0.95,
                           box_nms_thresh=0.7, min_mask_region_area=0)


class Sam2Masks:
    """SAM 2 automatic masks. ``config``: a hydra config name shipped with sam2, e.g.
    ``configs/sam2.1/sam2.1_hiera_t.yaml``; ``checkpoint``: its weights (None = random, for tests only)."""

    name = "sam2"

    def __init__(self, config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint: str | None = None,
                 device: str = "cpu", image_size: int | None = None, **generator_kwargs) -> None:
        import torch
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2

        overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
        model = build_sam2(config, checkpoint, device=device, hydra_overrides_extra=overrides)
        self.generator = SAM2AutomaticMaskGenerator(model, **{**_GENERATOR_DEFAULTS, **generator_kwargs})
        s = int(model.image_size)
        # The predictor hard-codes the feature sizes of a 1024 input; they follow the backbone strides 4/8/16.
        self.generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        self.device, self._torch = device, torch
        self.identity = {"source": "sam2", "config": config, "checkpoint": str(checkpoint), "image_size": s}

    def generate(self, image: np.ndarray) -> Masks:
        rgb = as_rgb(image)
        with self._torch.inference_mode():
            records = self.generator.generate(rgb)
        return _records_to_masks(records, *rgb.shape[:2])


class SamMasks:
    """SAM (v1) automatic masks. ``model_type`` vit_b / vit_l / vit_h as in segment_anything's registry;
    ``image_size`` (default 1024) builds the same architecture for a smaller input (random weights only, since
    checkpoints are trained at 1024)."""

    name = "sam"

    def __init__(self, model_type: str = "vit_b", checkpoint: str | None = None, device: str = "cpu",
                 image_size: int | None = None, **generator_kwargs) -> None:
        import torch
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        if image_size and image_size != 1024:
            if checkpoint:
                raise ValueError("SAM checkpoints are trained at 1024 px; image_size needs random weights")
            model = _build_sam_at(model_type, int(image_size))
        else:
            model = sam_model_registry[model_type](checkpoint=checkpoint)
        model.to(device).eval()
        self.generator = SamAutomaticMaskGenerator(model, **{**_GENERATOR_DEFAULTS, **generator_kwargs})
        self._torch = torch
        self.identity = {"source": "sam", "model_type": model_type, "checkpoint": str(checkpoint),
                         "image_size": int(model.image_encoder.img_size)}

    def generate(self, image: np.ndarray) -> Masks:
        rgb = as_rgb(image)
        with self._torch.inference_mode():
            records = self.generator.generate(rgb)
        return _records_to_masks(records, *rgb.shape[:2])


_SAM_ARCH = {  # embed dim, depth, heads, global attention blocks: segment_anything's build_sam_vit_*
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def _build_sam_at(model_type: str, image_size: int):
    """segment_anything's architecture for ``model_type`` at another input size (random weights)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if model_type not in _SAM_ARCH:
        raise ValueError(f"unknown SAM model type {model_type!r}; known: {', '.join(_SAM_ARCH)}")
    dim, depth, heads, global_idx = _SAM_ARCH[model_type]
    patch, prompt_dim = 16, 256
    grid = image_size // patch
    encoder = ImageEncoderViT(depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14,
                              out_chans=prompt_dim)
    prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim,
                                                                                 mlp_dim=2048, num_heads=8),
                          transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
