"""One CLIP token per 2D mask, in the joint image-text space of an open_clip model (L2-normalized).

Methods (``method=``):

- ``mask_attention`` (default, SAL): MaskCLIP's relative mask attention (Ding, Wang, Tu, ICML 2023). Each mask gets
  a "mask class token", a copy of the [CLS] token, that runs through the ViT blocks beside the normal tokens but
  attends only to itself and to the patches its mask covers; the attention bias is log(fraction of the patch
  covered), so partly covered patches count less ("relative"). Patch and [CLS] tokens never see mask tokens, so
  the image features are unchanged. The final mask tokens go through ``ln_post`` and ``proj`` like [CLS].
  ``mask_layers`` limits this to the last blocks (mask tokens start as the [CLS] state there); None = all blocks.
- ``dense``: MaskCLIP (Zhou et al., ECCV 2022) dense features: the last block's value path (v-projection, output
  projection, ``ln_post``, ``proj``; no query/key, no MLP) per patch, averaged over the patches of each mask
  weighted by coverage.
- ``crop``: each mask's bounding box (with context margin) cropped, padded square, encoded as a whole image; the
  baseline SAL argues against.

The whole image is encoded at its aspect ratio: short side ``short_side`` (default the model's input size),
positional embeddings resized bicubically, so a wide KITTI image keeps its objects' shapes.
"""
from __future__ import annotations

import math

import numpy as np

from sal_ros.pseudolabel.masks import Masks, as_rgb

METHODS = ("mask_attention", "dense", "crop")


class ClipTokenEncoder:
    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = None, device: str = "cpu",
                 method: str = "mask_attention", short_side: int | None = None, max_long_side: int = 1024,
                 mask_layers: int | None = None, crop_margin: float = 0.1, model=None,
                 model_config: str | None = None) -> None:
        import open_clip
        import torch

        if model_config:  # a custom architecture (json file or folder of them) next to the shipped ones
            open_clip.add_model_config(model_config)

        if method not in METHODS:
            raise ValueError(f"unknown token method {method!r}; known: {', '.join(METHODS)}")
        if model is None:
            from sal_ros.model.open_clip_models import load_open_clip

            model = load_open_clip(model_name, pretrained or None).to(device)
        self.model = model.eval()
        self.visual = model.visual
        if not hasattr(self.visual, "transformer") or not hasattr(self.visual, "class_embedding"):
            raise ValueError(f"{model_name}: token methods need an open_clip VisionTransformer")
        if method != "crop" and (getattr(self.visual, "attn_pool", None) is not None
                                 or self.visual.pool_type != "tok"):
            raise ValueError(f"{model_name}: {method} needs [CLS] pooling without an attention pooler; use 'crop'")
        self.torch, self.device, self.method = torch, torch.device(device), method
        self.patch = int(self.visual.patch_size[0])
        self.base_grid = tuple(int(g) for g in self.visual.grid_size)
        self.input_size = int(self.visual.image_size[0])
        self.short_side = int(short_side or self.input_size)
        self.max_long_side = int(max_long_side)
        self.mask_layers = mask_layers
        self.crop_margin = crop_margin
        cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
        mean = cfg.get("mean", getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.identity = {"clip_model": model_name, "clip_pretrained": str(pretrained), "token_method": method,
                         "short_side": self.short_side, "mask_layers": mask_layers, "dim": self.dim}

    @property
    def dim(self) -> int:
        return int(self.visual.output_dim)

    # --- public ------------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray, masks: Masks) -> np.ndarray:
        """(M, D) float32 unit-norm tokens, one per mask (zero rows for empty masks)."""
        if len(masks) == 0:
            return np.zeros((0, self.dim), np.float32)
        rgb = as_rgb(image)
        if rgb.shape[:2] != masks.masks.shape[1:]:
            raise ValueError(f"image {rgb.shape[:2]} and masks {masks.masks.shape[1:]} differ in size")
        with self.torch.inference_mode():
            if self.method == "crop":
                tokens = self._encode_crops(rgb, masks)
            else:
                tokens = self._encode_dense(rgb, masks)
        tokens = tokens.float().cpu().numpy()
        norm = np.linalg.norm(tokens, axis=1, keepdims=True)
        tokens = np.where(norm > 0, tokens / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
        tokens[masks.areas == 0] = 0.0
        return tokens

    # --- whole-image methods -----------------------------------------------------------------------------------
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an image: short side ``short_side``, aspect kept, long side capped."""
        scale = self.short_side / min(height, width)
        scale = min(scale, self.max_long_side / max(height, width))
        return (max(1, round(height * scale / self.patch)), max(1, round(width * scale / self.patch)))

    def _pixels(self, rgb: np.ndarray, size: tuple[int, int]):
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(rgb).copy()).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def _pos_embed(self, grid: tuple[int, int]):
        pos = self.visual.positional_embedding
        if tuple(grid) == self.base_grid:
            return pos
        gh0, gw0 = self.base_grid
        patches = pos[1:].reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
        patches = self.torch.nn.functional.interpolate(patches.float(), size=grid, mode="bicubic",
                                                       align_corners=False)
        return self.torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])

    def _embeds(self, rgb: np.ndarray, grid: tuple[int, int]):
        v = self.visual
        x = v.conv1(self._pixels(rgb, (grid[0] * self.patch, grid[1] * self.patch)))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1)
        x = self.torch.cat([cls, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        return v.ln_pre(x)

    def coverage(self, masks: Masks, grid: tuple[int, int]) -> np.ndarray:
        """(M, P) fraction of each patch's pixels inside each mask (P = rows * cols, row-major)."""
        m, h, w = masks.masks.shape
        rows = np.arange(h) * grid[0] // h
        cols = np.arange(w) * grid[1] // w
        patch_of = (rows[:, None] * grid[1] + cols[None, :]).reshape(-1)
        p = grid[0] * grid[1]
        per_patch = np.bincount(patch_of, minlength=p).astype(np.float32)
        flat = masks.masks.reshape(m, -1)
        cov = np.stack([np.bincount(patch_of[f], minlength=p) for f in flat]).astype(np.float32)
        return cov / np.maximum(per_patch, 1)

    def patch_features(self, rgb: np.ndarray):
        """MaskCLIP-style dense features: ``((P, D) patch tokens in CLIP's joint space, (rows, cols) grid)``, the last
        block's value path instead of its attention (call under inference mode)."""
        grid = self.grid_for(*rgb.shape[:2])
        x = self._embeds(rgb, grid)
        blocks = list(self.visual.transformer.resblocks)
        for blk in blocks[:-1]:
            x = blk(x)
        return self._value_path(blocks[-1], x)[0, 1:], grid

    def _encode_dense(self, rgb: np.ndarray, masks: Masks):
        torch = self.torch
        if self.method == "dense":
            feats, grid = self.patch_features(rgb)
            cov = torch.from_numpy(self.coverage(masks, grid)).to(self.device)
            weights = cov / cov.sum(1, keepdim=True).clamp(min=1e-6)
            return weights @ feats
        grid = self.grid_for(*rgb.shape[:2])
        cov = torch.from_numpy(self.coverage(masks, grid)).to(self.device)
        x = self._embeds(rgb, grid)
        blocks = list(self.visual.transformer.resblocks)
        n_mask_blocks = len(blocks) if self.mask_layers is None else max(1, min(self.mask_layers, len(blocks)))
        split = len(blocks) - n_mask_blocks
        for blk in blocks[:split]:
            x = blk(x)
        n_img, m = x.shape[1], cov.shape[0]
        x = torch.cat([x, x[:, :1].expand(1, m, -1)], dim=1)
        bias = self._mask_attention_bias(cov, n_img).to(x.dtype)
        for blk in blocks[split:]:
            x = blk(x, attn_mask=bias)
        return self.visual.ln_post(x[0, n_img:]) @ self.visual.proj

    def _mask_attention_bias(self, cov, n_img: int):
        """(L, L) additive attention bias over [CLS, patches, mask tokens]."""
        torch = self.torch
        m = cov.shape[0]
        size = n_img + m
        bias = torch.full((size, size), float("-inf"), device=cov.device)
        bias[:n_img, :n_img] = 0.0  # the image attends as usual and never sees mask tokens
        bias[n_img:, 1:n_img] = torch.log(cov)  # log(0) = -inf: patches outside the mask are invisible
        idx = torch.arange(m, device=cov.device) + n_img
        bias[idx, idx] = 0.0  # a mask token always sees itself (a mask smaller than every patch still works)
        return bias

    def _value_path(self, blk, x):
        attn = blk.attn
        if not hasattr(attn, "in_proj_weight") or attn.in_proj_weight is None:
            raise ValueError("dense tokens need nn.MultiheadAttention blocks with a packed in-projection")
        d = x.shape[-1]
        y = blk.ln_1(x)
        v = self.torch.nn.functional.linear(y, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        v = attn.out_proj(v)
        return self.visual.ln_post(v) @ self.visual.proj

    # --- crops -------------------------------------------------------------------------------------------------
    def _encode_crops(self, rgb: np.ndarray, masks: Masks, batch: int = 32):
        torch = self.torch
        h, w = rgb.shape[:2]
        crops = []
        for mask in masks.masks:
            ys, xs = np.nonzero(mask)
            if ys.size == 0:
                ys, xs = np.array([0]), np.array([0])
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            side = max(y1 - y0, x1 - x0) * (1 + 2 * self.crop_margin)
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            crops.append(_square_crop(rgb, cy, cx, max(int(math.ceil(side)), 2), h, w))
        out = []
        for s in range(0, len(crops), batch):
            px = torch.cat([self._pixels(c, (self.input_size, self.input_size)) for c in crops[s:s + batch]])
            out.append(self.model.encode_image(px))
        return torch.cat(out)


def _square_crop(rgb: np.ndarray, cy: float, cx: float, side: int, h: int, w: int) -> np.ndarray:
    """A side x side window centred at (cy, cx); outside the image filled with grey (CLIP mean-ish)."""
    out = np.full((side, side, 3), 124, np.uint8)
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out
