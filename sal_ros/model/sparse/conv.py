"""``Conv3d``: sparse 3D convolution with torchsparse 2.1's signature, weight layout and coordinate rules."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from sal_ros.model.sparse.hashing import kernel_offsets
from sal_ros.model.sparse.kernels import _GatherMatmulScatter, sparse_conv_inference
from sal_ros.model.sparse.maps import (KernelMap, _downsample_coords, _downsample_with_parents, build_kernel_map,
                                       build_parent_map)
from sal_ros.model.sparse.tensor import SparseCache, SparseTensor
from sal_ros.model.sparse.torchsparse_backend import _torchsparse_conv3d, torchsparse_available


class Conv3d(nn.Module):
    """Sparse 3D convolution with torchsparse 2.1's signature, weight layout and coordinate rules.

    ``backend``: "torch" (this module's gather-matmul-scatter), "torchsparse", or "auto" = torchsparse when
    it imports. torchsparse 2.1 has no CPU kernel maps, ignores dilation and aligns kernel != stride
    downsampling differently, so those cases always run on the torch backend (the choice depends only on
    the layer config and device, so a strided conv and its transposed twin always share a backend).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
        transposed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (cubic kernels only), got {value!r}")
        if backend not in ("auto", "torch", "torchsparse"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'torchsparse', got {backend!r}")
        if backend == "torchsparse" and not torchsparse_available():
            raise ImportError("backend='torchsparse' but torchsparse does not import")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.transposed = transposed
        self.kernel_volume = kernel_size**3
        self.backend = "torchsparse" if backend == "auto" and torchsparse_available() else backend
        if self.backend == "auto":
            self.backend = "torch"
        shape = (in_channels, out_channels) if self._is_pointwise else (self.kernel_volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def _is_pointwise(self) -> bool:
        return self.kernel_volume == 1 and self.stride == 1

    @property
    def weight(self) -> nn.Parameter:
        """Alias of ``kernel`` (torchsparse's name, kept for checkpoint compatibility)."""
        return self.kernel

    def reset_parameters(self) -> None:
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_volume
        bound = 1.0 / math.sqrt(fan)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}" if self.stride != 1 else ""
        s += f", dilation={self.dilation}" if self.dilation != 1 else ""
        s += ", bias=True" if self.bias is not None else ""
        s += ", transposed=True" if self.transposed else ""
        return s + f", backend={self.backend}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"{self}: expected {self.in_channels} input channels, got {x.feats.shape[1]}")
        if self._uses_torchsparse(x):
            return _torchsparse_conv3d(self, x)
        feats, weight, bias = _common_dtype(x.feats, self.kernel, self.bias)
        with torch.autocast(x.device.type, enabled=False):  # dtypes already chosen; index_add_ needs one
            if self._is_pointwise:
                out = x.replace_feats(feats @ weight)
            else:
                coords, stride, kmap = self._output_and_map(x)
                out = SparseTensor(_GatherMatmulScatter.apply(feats, weight, kmap), coords, stride, x.cache)
            if bias is not None:
                out.feats = out.feats + bias
        return out

    @torch.no_grad()
    def forward_inference(self, x: SparseTensor, weight: Tensor, bias: Optional[Tensor],
                          residual: Optional[Tensor] = None, relu: bool = False) -> SparseTensor:
        """``relu(conv(x) + bias + residual)`` with ``weight`` / ``bias`` in place of the conv's own (a BatchNorm
        folded in), without autograd, in the dtype of ``x.feats`` (weight and bias must have it); torch backend."""
        if self._is_pointwise:
            feats = x.feats @ weight if bias is None else torch.addmm(bias, x.feats, weight)
            if residual is not None:
                feats += residual
            return x.replace_feats(feats.relu_() if relu else feats)
        coords, stride, kmap = self._output_and_map(x)
        feats = sparse_conv_inference(x.feats, weight, kmap, bias, residual, relu, x.cache.workspace)
        return SparseTensor(feats, coords, stride, x.cache)

    def _uses_torchsparse(self, x: SparseTensor) -> bool:
        if self.backend != "torchsparse" or x.device.type != "cuda" or self.dilation != 1:
            return False
        return self.stride == 1 or self.kernel_size == self.stride

    def _output_and_map(self, x: SparseTensor) -> tuple[Tensor, int, KernelMap]:
        """Output coordinates, output stride and the kernel map (from the cache when possible)."""
        cache, s = x.cache, self.stride
        if not self.transposed:
            fine_stride, out_stride = x.stride, x.stride * s
            if s == 1:
                out_coords = x.coords
            else:
                out_coords = cache.coords.get(out_stride)
                if out_coords is None and self._is_parent_conv:  # MinkUNet's downsampling: map for free
                    out_coords, parents = _downsample_with_parents(x.coords, out_stride)
                    out_coords = cache.coords.setdefault(out_stride, out_coords)
                    cache.kmaps[self._map_key(fine_stride)] = build_parent_map(x.coords, out_coords, parents,
                                                                               fine_stride)
                elif out_coords is None:
                    out_coords = cache.coords.setdefault(out_stride, _downsample_coords(x.coords, out_stride))
            kmap = self._cached_map(cache, x.coords, out_coords, fine_stride)
            return out_coords, out_stride, kmap
        if x.stride % s:
            raise ValueError(f"transposed stride {s} does not divide the input's tensor stride {x.stride}")
        out_stride = x.stride // s
        out_coords = cache.coords.get(out_stride)
        if out_coords is None:
            raise ValueError(f"no coordinates of stride {out_stride} in the cache to upsample to")
        # The strided twin maps fine (out_stride) -> coarse (x.stride); transposed, it maps coarse -> fine.
        kmap = self._cached_map(cache, out_coords, x.coords, out_stride).transposed()
        return out_coords, out_stride, kmap

    @property
    def _is_parent_conv(self) -> bool:
        return self.kernel_size == self.stride == 2 and self.dilation == 1

    def _map_key(self, in_stride: int) -> tuple[int, int, int, int]:
        return (in_stride, self.kernel_size, self.stride, self.dilation)

    def _cached_map(self, cache: SparseCache, in_coords: Tensor, out_coords: Tensor, in_stride: int) -> KernelMap:
        key = self._map_key(in_stride)
        kmap = cache.kmaps.get(key)
        if kmap is None or kmap.n_in != len(in_coords) or kmap.n_out != len(out_coords):
            offsets = kernel_offsets(self.kernel_size, in_coords.device) * (in_stride * self.dilation)
            kmap = build_kernel_map(in_coords, out_coords, offsets, self.stride == 1, cache.walk_columns)
            cache.kmaps[key] = kmap
        return kmap


def _common_dtype(feats: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Autocast's compute dtype when it is on (matmuls in half/bfloat16), else the features' dtype."""
    device = feats.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else feats.dtype
    bias = None if bias is None else bias.to(dtype)
    return feats.to(dtype), weight.to(dtype), bias
