"""WaffleIron backbone (Puy, Boulch, Marlet, ICCV 2023; ScaLR's backbone): no sparse convolution, pure PyTorch.

Points (here: the stride-1 voxels of ``SALModel.prepare``, one representative per voxel) are embedded point-wise,
then every block does

* spatial mix: the (batch-normalised) point features are averaged into the cells of a 2D grid seen along one
  axis (the axis cycles z, y, x over the blocks: a bird's-eye view, then two side views), the grid goes through
  two depthwise 3x3 convolutions, and each point reads its cell back (residual, layer scale);
* channel mix: a point-wise two-layer MLP (residual, layer scale).

The paper's point embedding also pools the 16 nearest neighbours; this one is point-wise (voxel means already
carry the local average). The forward pass returns ``{stride: SparseTensor}`` like MinkUNet: stride 1 holds the
per-voxel features, and the coarser strides the query decoder attends to are their means over cells of that
stride, so SAL's decoder runs unchanged on top.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sal_ros.model.sparse import SparseTensor

AXES = (2, 1, 0)  # block i projects along AXES[i % 3]: z (bird's-eye), then y, then x


class GridGeometry:
    """Flat 2D cell index of every point for each projection axis, and the grid sizes, for one batch."""

    def __init__(self, centres: Tensor, batch: Tensor, batch_size: int, cell: float, extent: tuple[float, float, float]):
        ext = torch.tensor(extent, dtype=centres.dtype, device=centres.device)
        sizes = [max(1, int(round(2 * e / cell))) for e in extent]
        idx = torch.floor((centres + ext) / cell).long()
        idx = torch.stack([idx[:, a].clamp(0, sizes[a] - 1) for a in range(3)], dim=1)  # far points: edge cells
        self.batch_size = batch_size
        self.shapes: dict[int, tuple[int, int]] = {}
        self.cells: dict[int, Tensor] = {}
        self.counts: dict[int, Tensor] = {}
        for axis in AXES:
            a, b = [k for k in range(3) if k != axis]
            h, w = sizes[a], sizes[b]
            flat = (batch * h + idx[:, a]) * w + idx[:, b]
            self.shapes[axis] = (h, w)
            self.cells[axis] = flat
            self.counts[axis] = torch.bincount(flat, minlength=batch_size * h * w).clamp_(min=1)


class SpatialMix(nn.Module):
    def __init__(self, width: int, layer_scale: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, groups=width))
        self.scale = nn.Parameter(torch.full((width,), float(layer_scale)))

    def forward(self, x: Tensor, geo: GridGeometry, axis: int) -> Tensor:
        h, w = geo.shapes[axis]
        cells, counts = geo.cells[axis], geo.counts[axis]
        y = self.norm(x)
        grid = y.new_zeros(geo.batch_size * h * w, y.shape[1]).index_add_(0, cells, y)
        grid = grid / counts[:, None].to(grid.dtype)
        grid = grid.view(geo.batch_size, h, w, -1).permute(0, 3, 1, 2)
        grid = self.conv(grid.contiguous(memory_format=torch.channels_last))
        back = grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])[cells]
        return x + self.scale * back


class ChannelMix(nn.Module):
    def __init__(self, width: int, layer_scale: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, width), nn.ReLU(inplace=True),
                                 nn.Linear(width, width))
        self.scale = nn.Parameter(torch.full((width,), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.mlp(x)


class WaffleIron(nn.Module):
    """``forward(voxels) -> {1, 2, 4, 8, 16: SparseTensor}``; all levels have ``waffle_width`` channels."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.waffle_width
        self.embed = nn.Sequential(nn.Linear(cfg.in_channels, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                   nn.Linear(width, width))
        self.spatial = nn.ModuleList(SpatialMix(width, cfg.waffle_layer_scale) for _ in range(cfg.waffle_depth))
        self.channel = nn.ModuleList(ChannelMix(width, cfg.waffle_layer_scale) for _ in range(cfg.waffle_depth))
        self.out_norm = nn.BatchNorm1d(width)
        self.out_widths = {s: width for s in (16, 8, 4, 2, 1)}

    def forward(self, x: SparseTensor) -> dict[int, SparseTensor]:
        cfg = self.cfg
        batch = x.coords[:, 0].long()
        centres = (x.coords[:, 1:].float() + 0.5) * cfg.voxel_size
        geo = GridGeometry(centres, batch, x.batch_size, cfg.waffle_cell, tuple(cfg.waffle_extent))
        feats = self.embed(x.feats)
        for i, (spatial, channel) in enumerate(zip(self.spatial, self.channel)):
            feats = channel(spatial(feats, geo, AXES[i % 3]))
        fine = x.replace_feats(self.out_norm(feats))
        out = {1: fine}
        for stride in sorted(set(cfg.attention_strides) - {1}):
            out[stride] = pool_to_stride(fine, stride)
        return out


def pool_to_stride(x: SparseTensor, stride: int) -> SparseTensor:
    """Mean of ``x``'s features over the cells of ``stride`` voxels; coordinates floored to multiples of it,
    rows sorted by [batch, x, y, z] (sparse.py's convention for strided tensors)."""
    coords = x.coords.long().clone()
    coords[:, 1:] = torch.div(coords[:, 1:], stride, rounding_mode="floor") * stride
    cells, inverse = torch.unique(coords, dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(cells)).to(x.feats.dtype)
    feats = x.feats.new_zeros(len(cells), x.feats.shape[1]).index_add_(0, inverse, x.feats) / counts[:, None]
    return SparseTensor(feats, cells.int(), stride, x.cache)


__all__ = ["WaffleIron", "GridGeometry", "pool_to_stride", "AXES"]
