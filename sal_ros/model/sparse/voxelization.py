"""``voxelize``: points to voxels (mean features per cell) and the point -> voxel index."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sal_ros.model.sparse.hashing import _Box, _radix_order
from sal_ros.model.sparse.tensor import SparseCache, SparseTensor


def voxelize(
    points: Tensor, batch: Optional[Tensor], voxel_size: float, feats: Tensor
) -> tuple[SparseTensor, Tensor]:
    """Quantize points to voxels of edge ``voxel_size`` (cell ``floor(p / voxel_size)``), one per batch entry.

    Voxel features are the mean of their points' ``feats``; ``point_to_voxel (N,)`` maps each point to its
    voxel row, so ``x.feats[point_to_voxel]`` takes any per-voxel output back to the points. Voxels are
    sorted by ``[batch, x, y, z]``.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    if feats.ndim != 2 or feats.shape[0] != points.shape[0]:
        raise ValueError(f"feats must be (N, C) with N={points.shape[0]}, got {tuple(feats.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    n = points.shape[0]
    if batch is not None:
        if batch.shape != (n,):
            raise ValueError(f"batch must be ({n},), got {tuple(batch.shape)}")
        if n and int(batch.min()) < 0:
            raise ValueError("batch indices must be non-negative")
    if _voxelize_cpu_applies(points, batch, feats):
        voxels = _voxelize_cpu(points, batch, voxel_size, feats)
        if voxels is not None:
            return voxels
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or inf; drop invalid returns before voxelizing")
    if batch is None:
        batch = torch.zeros(n, dtype=torch.int64, device=points.device)
        batch_size = 1
    else:
        batch_size = int(batch.max()) + 1 if n else 0
    cells = torch.floor(points.double() / voxel_size).long()
    coords = torch.cat([batch.long()[:, None], cells], dim=1)
    if n == 0:
        empty = SparseTensor(feats.new_zeros(0, feats.shape[1]), coords.int(), 1, SparseCache(batch_size))
        return empty, torch.zeros(0, dtype=torch.int64, device=points.device)
    box = _Box.around(coords)
    keys, point_to_voxel = torch.unique(box.key(coords), return_inverse=True)
    counts = torch.bincount(point_to_voxel, minlength=len(keys)).to(feats.dtype)
    sums = feats.new_zeros(len(keys), feats.shape[1]).index_add_(0, point_to_voxel, feats)
    voxels = SparseTensor(sums / counts[:, None], box.decode(keys).int(), 1, SparseCache(batch_size))
    return voxels, point_to_voxel


def _voxelize_cpu_applies(points: Tensor, batch: Optional[Tensor], feats: Tensor) -> bool:
    floats = (torch.float32, torch.float64)
    cpu = points.device.type == "cpu" and (batch is None or batch.device.type == "cpu")
    plain = not (points.requires_grad or feats.requires_grad) and feats.dtype in floats and points.dtype in floats
    return cpu and plain and len(points) > 0


def _voxelize_cpu(points: Tensor, batch: Optional[Tensor], voxel_size: float,
                  feats: Tensor) -> Optional[tuple[SparseTensor, Tensor]]:
    """:func:`voxelize` of CPU clouds, same bits, 1.5x faster: cells per axis as contiguous float64 rows (the
    same ``floor(p / voxel_size)``), exact linear keys in a stable sort (torch's of int32 keys, or numpy's 16-bit
    radix passes over int64 ones) instead of ``torch.unique``, each voxel's coordinates from its first point
    instead of decoding keys, and the sums in point order, as the generic path adds them, by a CSR matmul. None
    when the key range passes 2**53 (the generic path then runs)."""
    cells = np.empty((3, len(points)))  # rows x, y, z: contiguous for the key arithmetic below
    np.divide(points.numpy().T, voxel_size, out=cells, dtype=np.float64)
    np.floor(cells, out=cells)
    lo, hi = cells.min(1), cells.max(1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("points contain NaN or inf; drop invalid returns before voxelizing")
    b = None if batch is None else batch.numpy()
    batch_size = 1 if b is None else int(b.max()) + 1
    ext = [batch_size] + (hi - lo + 1).tolist()
    if math.prod(ext) > 2**53:
        return None
    key = cells[0] - lo[0]
    for axis in (1, 2):  # row-major [b, x, y, z]: key order is coordinate order
        key *= ext[axis + 1]
        key += cells[axis]
        key -= lo[axis]
    if batch_size > 1:
        key += b * math.prod(ext[1:])
    n, total = len(key), math.prod(ext)
    if total <= 2**31:  # in the Segmenter 1.1 ms (0.5 m voxels) to 2.1 ms (0.2 m) faster than radix passes + CSR sums
        ordered, order = (t.numpy() for t in torch.sort(torch.from_numpy(key.astype(np.int32)), stable=True))
    else:
        keys = key.astype(np.int64)
        order = _radix_order(keys, int(total - 1).bit_length())
        ordered = keys[order]
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    voxel = np.cumsum(new)
    voxel -= 1
    point_to_voxel = np.empty(n, np.int64)
    point_to_voxel[order] = voxel
    coords = np.zeros((len(starts), 4), np.int32)
    first = order[starts]
    for axis in range(3):  # np.take per row: 3x faster than cells[:, first].T
        coords[:, axis + 1] = np.take(cells[axis], first)
    if batch_size > 1:
        coords[:, 0] = b[first]
    counts = np.diff(starts, append=n)
    means = _sums_in_point_order(feats, starts, order).div_(torch.from_numpy(counts).to(feats.dtype)[:, None])
    return SparseTensor(means, torch.from_numpy(coords), 1, SparseCache(batch_size)), torch.from_numpy(point_to_voxel)


def _sums_in_point_order(feats: Tensor, starts: np.ndarray, order: np.ndarray) -> Tensor:
    """Per voxel the sum of its points' ``feats`` (voxel v holds points ``order[starts[v]:starts[v + 1]]``, in
    point order): one CSR matmul (MKL adds each row's entries in column order: the bits of ``index_add_`` in
    point order, 4.7x faster on a 124,668-point scan)."""
    n = len(order)
    index = torch.int32 if n < 2**31 else torch.int64
    crow = torch.empty(len(starts) + 1, dtype=index)
    crow[:-1] = torch.from_numpy(starts)
    crow[-1] = n
    members = torch.sparse_csr_tensor(crow, torch.from_numpy(order).to(index), feats.new_ones(n),
                                      (len(starts), n), check_invariants=False)
    with torch.autocast("cpu", enabled=False):
        return members @ feats
