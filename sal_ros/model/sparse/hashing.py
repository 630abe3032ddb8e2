"""Coordinate hashing: exact int64 keys of ``[b, x, y, z]`` inside a box, numpy's radix sort over them, and
the kernel offsets in torchsparse 2.1 order."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

_MAX_KEY = 2**62  # linear keys of coordinate boxes must stay far from int64 overflow


class _Box:
    """Exact linear int64 keys for coordinates ``[b, x, y, z]`` inside an axis-aligned box."""

    def __init__(self, lo: Tensor, hi: Tensor) -> None:
        ext = (hi - lo + 1).tolist()
        if math.prod(ext) >= _MAX_KEY:
            raise ValueError(f"coordinate range {ext} too large to hash into int64 keys")
        self.lo = lo
        self.ext = ext
        # Row-major strides so that key order is lexicographic [b, x, y, z], as torch.unique(dim=0) sorts.
        self.mult = torch.tensor([ext[1] * ext[2] * ext[3], ext[2] * ext[3], ext[3], 1], device=lo.device)

    @classmethod
    def around(cls, *coord_sets: Tensor, margin: int = 0) -> "_Box":
        """Smallest box holding all sets, grown by ``margin`` on the spatial axes."""
        lo = torch.stack([c.min(0).values for c in coord_sets]).min(0).values
        hi = torch.stack([c.max(0).values for c in coord_sets]).max(0).values
        grow = torch.tensor([0, margin, margin, margin], device=lo.device)
        return cls(lo - grow, hi + grow)

    def key(self, coords: Tensor) -> Tensor:
        return ((coords - self.lo) * self.mult).sum(1)

    def decode(self, keys: Tensor) -> Tensor:
        out = torch.empty(len(keys), 4, dtype=torch.int64, device=keys.device)
        rest = keys
        for axis in range(4):
            out[:, axis] = torch.div(rest, self.mult[axis], rounding_mode="floor")
            rest = rest - out[:, axis] * self.mult[axis]
        return out + self.lo


def kernel_offsets(kernel_size: int, device=None) -> Tensor:
    """``(k**3, 3)`` int64 offsets ``[dx, dy, dz]`` in torchsparse 2.1 order (unit spacing)."""
    r = torch.arange(kernel_size, device=device) - (kernel_size - 1) // 2
    if kernel_size**3 % 2 == 1:  # x fastest
        gz, gy, gx = torch.meshgrid(r, r, r, indexing="ij")
    else:  # z fastest
        gx, gy, gz = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)


def _radix_order(keys: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort of non-negative int64 ``keys`` below ``2**bits``: numpy's radix sort, 16 bits per pass."""
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    for shift in range(16, bits, 16):
        order = order[np.argsort((keys[order] >> shift & 0xFFFF).astype(np.uint16), kind="stable")]
    return order
