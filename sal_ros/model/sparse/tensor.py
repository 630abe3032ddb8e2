"""Sparse voxel tensors: features at integer coordinates of one stride, the cache every tensor derived from
one input shares (coordinates per stride, kernel maps) and the inference convs' scratch workspace."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sal_ros.model.sparse.maps import KernelMap


class SparseCache:
    """State shared by all sparse tensors derived from one input: coordinates per stride and kernel maps."""

    def __init__(self, batch_size: Optional[int] = None) -> None:
        self.coords: dict[int, Tensor] = {}
        self.kmaps: dict[tuple[int, int, int, int], KernelMap] = {}
        self.batch_size = batch_size
        self.ts_caches = None  # torchsparse's own cache object, when that backend runs
        self.ts_shift: Optional[Tensor] = None  # keeps coordinates non-negative for torchsparse
        self.walk_columns = True  # submanifold maps walked along z (build_kernel_map); False: searched
        # Scratch tensors reused by the CPU inference convs of one forward pass (see Workspace); None: fresh each.
        self.workspace: Optional[Workspace] = None


class Workspace:
    """Flat scratch tensors by role, grown on demand and lent out as views: the inference convs' accumulators and
    temporaries (tens of MB at stride 1) would otherwise be fresh pages from the OS in every conv. A view is only
    valid until the next request for its role."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        flat = self._flat.get((role, dtype))
        if flat is None or flat.numel() < rows * cols:
            flat = self._flat[(role, dtype)] = torch.empty(rows * cols, dtype=dtype)
        return flat[:rows * cols].view(rows, cols)


class SparseTensor:
    """Voxel features ``feats (N, C)`` at integer ``coords (N, 4)`` ``[batch, x, y, z]`` of tensor ``stride``."""

    def __init__(self, feats: Tensor, coords: Tensor, stride: int = 1, cache: Optional[SparseCache] = None):
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be (N, 4) [batch, x, y, z], got {tuple(coords.shape)}")
        if coords.dtype.is_floating_point or coords.dtype == torch.bool:
            raise ValueError(f"coords must be integer, got {coords.dtype}")
        if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats must be (N, C) with N={coords.shape[0]}, got {tuple(feats.shape)}")
        if feats.device != coords.device:
            raise ValueError(f"feats on {feats.device} but coords on {coords.device}")
        if int(stride) < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        self.feats = feats
        self.coords = coords if coords.dtype == torch.int32 else coords.to(torch.int32)
        self.stride = int(stride)
        self.cache = cache if cache is not None else SparseCache()
        # The first tensor of a stride defines that stride's coordinates for transposed convs and skips.
        self.cache.coords.setdefault(self.stride, self.coords)

    def replace_feats(self, feats: Tensor) -> "SparseTensor":
        """Same coordinates, stride and cache; new features (after a norm, activation, ...)."""
        return SparseTensor(feats, self.coords, self.stride, self.cache)

    @property
    def batch_size(self) -> int:
        if self.cache.batch_size is None:
            self.cache.batch_size = int(self.coords[:, 0].max()) + 1 if len(self.coords) else 0
        return self.cache.batch_size

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def __len__(self) -> int:
        return self.coords.shape[0]

    def to(self, device) -> "SparseTensor":
        """Copy to another device with a fresh cache (kernel maps are rebuilt there)."""
        cache = SparseCache(self.cache.batch_size)
        return SparseTensor(self.feats.to(device), self.coords.to(device), self.stride, cache)

    def __repr__(self) -> str:
        return f"SparseTensor(n={len(self)}, channels={self.feats.shape[1]}, stride={self.stride})"


def cat_feats(a: SparseTensor, b: SparseTensor) -> SparseTensor:
    """Concatenate the channels of two tensors on the same voxels (U-Net skip connections)."""
    if a.stride != b.stride or len(a) != len(b):
        raise ValueError(f"cat_feats needs the same voxels, got {a} and {b}")
    if a.coords is not b.coords and not torch.equal(a.coords, b.coords):
        raise ValueError("cat_feats needs identical coordinates (same order); got different voxel sets")
    return a.replace_feats(torch.cat([a.feats, b.feats], dim=1))


def to_dense(x: SparseTensor, shape: tuple[int, int, int], origin: tuple[int, int, int] = (0, 0, 0)) -> Tensor:
    """Dense ``(B, C, *shape)`` grid of ``x``; cell ``i`` holds the voxel at ``origin + i * x.stride``."""
    rel = x.coords[:, 1:].long() - torch.as_tensor(origin, device=x.device)
    if bool((rel % x.stride != 0).any()):
        raise ValueError(f"origin {origin} is not aligned to stride {x.stride}")
    idx = rel // x.stride
    size = torch.as_tensor(shape, device=x.device)
    if bool(((idx < 0) | (idx >= size)).any()):
        raise ValueError(f"voxels fall outside the dense grid {shape} at origin {origin}")
    dense = x.feats.new_zeros(x.batch_size, x.feats.shape[1], *shape)
    dense[x.coords[:, 0].long(), :, idx[:, 0], idx[:, 1], idx[:, 2]] = x.feats
    return dense
