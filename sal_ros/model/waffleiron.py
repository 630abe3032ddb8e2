"""WaffleIron backbone (Puy, Boulch, Marlet, ICCV 2023; ScaLR's backbone): no sparse convolution, pure PyTorch.

Points (here: the stride-1 voxels of ``SALModel.prepare``, one representative per voxel) are embedded point-wise,
then every block does

* spatial mix: the (batch-normalised) point features are averaged into the cells of a 2D grid seen along one
  axis (the axis cycles z, y, x over the blocks: a bird's-eye view, then two side views), the grid goes through
  two depthwise 3x3 convolutions, and each point reads its cell back (residual, layer scale);
* channel mix: a point-wise two-layer MLP (residual, layer scale).

The embedding is local, as the paper's (which max-pools an MLP over each point's 16 nearest neighbours): here
over the voxels of the 3x3x3 neighbourhood, from their features and their offsets (in voxel units, from the
voxels' mean point positions). Without it a point only sees the 2D cells it shares, and on 0.2 m voxels the
student of a one-hot teacher never told sidewalk from road or trunk from vegetation. The forward pass returns ``{stride: SparseTensor}`` like MinkUNet: stride 1 holds the
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


class NeighbourEmbedding(nn.Module):
    """``point(f_i) + out(max_j ReLU(BN(edge([offset_ij, f_j]))))`` over the occupied voxels j around voxel i."""

    def __init__(self, cfg, hidden: int = 64) -> None:
        super().__init__()
        cin = cfg.input.in_channels
        self.scale = cfg.input.coord_scale / cfg.input.voxel_size  # input xyz (divided by coord_scale) -> voxel units
        self.edge = nn.Sequential(nn.Linear(3 + cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.out = nn.Linear(hidden, cfg.waffleiron.width)
        self.point = nn.Linear(cin, cfg.waffleiron.width)

    def forward(self, x: SparseTensor) -> Tensor:
        i, j = neighbour_pairs(x.coords)
        f = x.feats
        offset = (f[j, :3] - f[i, :3]) * self.scale
        h = self.edge(torch.cat([offset, f[j]], dim=1))
        pooled = h.new_full((len(f), h.shape[1]), float("-inf"))
        pooled = pooled.scatter_reduce(0, i[:, None].expand_as(h), h, "amax")  # every voxel is its own neighbour
        return self.point(f) + self.out(pooled)


def neighbour_pairs(coords: Tensor) -> tuple[Tensor, Tensor]:
    """(i, j) rows of every pair of voxels whose [batch, x, y, z] differ by at most 1 in x, y and z."""
    keys, mult = _linear_keys(coords.long())
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    rows_i, rows_j = [], []
    rng = torch.arange(-1, 2, device=coords.device)
    for dx in rng:
        for dy in rng:
            for dz in rng:
                q = keys + dx * mult[1] + dy * mult[2] + dz * mult[3]
                pos = torch.searchsorted(sorted_keys, q).clamp_(max=len(keys) - 1)
                hit = sorted_keys[pos] == q
                rows_i.append(torch.nonzero(hit).squeeze(1))
                rows_j.append(order[pos[hit]])
    return torch.cat(rows_i), torch.cat(rows_j)


class WaffleIron(nn.Module):
    """``forward(voxels) -> {1, 2, 4, 8, 16: SparseTensor}``; all levels have ``waffleiron.width`` channels; its
    settings are the config's ``waffleiron`` section."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        net = cfg.waffleiron
        width = net.width
        self.embed = NeighbourEmbedding(cfg)
        self.spatial = nn.ModuleList(SpatialMix(width, net.layer_scale) for _ in range(net.depth))
        self.channel = nn.ModuleList(ChannelMix(width, net.layer_scale) for _ in range(net.depth))
        self.out_norm = nn.BatchNorm1d(width)
        self.out_widths = {s: width for s in (16, 8, 4, 2, 1)}

    def forward(self, x: SparseTensor) -> dict[int, SparseTensor]:
        cfg = self.cfg
        batch = x.coords[:, 0].long()
        centres = (x.coords[:, 1:].float() + 0.5) * cfg.input.voxel_size
        geo = GridGeometry(centres, batch, x.batch_size, cfg.waffleiron.cell, cfg.waffleiron.extent)
        feats = self.embed(x)
        for i, (spatial, channel) in enumerate(zip(self.spatial, self.channel)):
            feats = channel(spatial(feats, geo, AXES[i % 3]))
        fine = x.replace_feats(self.out_norm(feats))
        out = {1: fine}
        for stride in sorted(set(cfg.decoder.attention_strides) - {1}):
            out[stride] = pool_to_stride(fine, stride)
        return out


def pool_to_stride(x: SparseTensor, stride: int) -> SparseTensor:
    """Mean of ``x``'s features over the cells of ``stride`` voxels; coordinates floored to multiples of it,
    rows sorted by [batch, x, y, z] (sparse.py's convention for strided tensors)."""
    coords = x.coords.long().clone()
    coords[:, 1:] = torch.div(coords[:, 1:], stride, rounding_mode="floor") * stride
    keys, _ = _linear_keys(coords)  # 1-D unique: torch.unique(dim=0) was 30 % of the tiny backbone's time
    _, inverse = torch.unique(keys, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    cells = coords.new_zeros(n, 4).index_copy_(0, inverse, coords)
    counts = torch.bincount(inverse, minlength=n).to(x.feats.dtype)
    feats = x.feats.new_zeros(n, x.feats.shape[1]).index_add_(0, inverse, x.feats) / counts[:, None]
    return SparseTensor(feats, cells.int(), stride, x.cache)


def _linear_keys(c: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys of [batch, x, y, z] rows, ordered as the rows sort lexicographically, with a margin of one cell
    on every side, and the multiplier of each column."""
    lo = c.min(0).values - 1
    span = c.max(0).values - lo + 2
    mult = torch.stack([span[1] * span[2] * span[3], span[2] * span[3], span[3], torch.ones_like(span[3])])
    return ((c - lo) * mult).sum(1), mult


__all__ = ["WaffleIron", "NeighbourEmbedding", "GridGeometry", "neighbour_pairs", "pool_to_stride", "AXES"]
