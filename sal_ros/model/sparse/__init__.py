"""Sparse voxel tensors and sparse 3D convolution in pure PyTorch, in torchsparse 2.1's layout.

Conventions (shared with torchsparse 2.1 so one checkpoint runs on either backend):

* ``coords`` is an int32 ``(N, 4)`` tensor ``[batch, x, y, z]``, always in base-voxel units; a tensor of
  stride ``s`` holds coordinates that are multiples of ``s`` (torchsparse 2.1 divides them by ``s`` instead;
  the torchsparse backend converts). Negative coordinates are fine.
* Kernel offsets of a cubic kernel of size ``k`` are ``range(k) - (k - 1) // 2`` per axis ({-1, 0, 1} for k=3,
  {0, 1} for k=2), scaled by tensor stride and dilation. Order (torchsparse 2.1 / MinkowskiEngine): for an
  odd kernel volume x varies fastest (``index = ix + k * (iy + k * iz)``), for an even one z varies fastest
  (``index = iz + k * (iy + k * ix)``). See :func:`kernel_offsets`.
* Weights: ``Conv3d.kernel`` of shape ``(kernel_volume, C_in, C_out)``, or ``(C_in, C_out)`` for a 1x1x1
  stride-1 kernel; the parameter is named ``kernel`` as in torchsparse, so state dicts are interchangeable.
* Output voxel ``o`` of a (strided or submanifold) convolution sums ``feats[o + offset_k] @ kernel[k]``.
* Stride 1 is submanifold: the output coordinates are the input coordinates.
* Stride ``s`` downsamples with floor alignment: output coordinates are
  ``unique(floor(coords / (in_stride * s)) * (in_stride * s))``, output stride ``in_stride * s``. This is
  torchsparse's rule whenever kernel size == stride (MinkUNet's 2x2x2 stride-2 convs) and its "minkowski"
  downsample mode otherwise; torchsparse's default "spconv" mode for kernel 3 / stride 2 instead outputs
  every aligned cell that any input reaches, which the torchsparse backend here does not use. The dense
  equivalent is ``F.conv3d(stride=s, padding=(k - 1) // 2)`` on a grid whose origin is a multiple of
  ``in_stride * s``, read at the output coordinates.
* Transposed convolution with stride ``s`` goes back to the coordinates the tensor of stride
  ``in_stride / s`` had (from the shared cache) and uses the transposed kernel map of the matching strided
  conv: fine voxel ``i`` receives ``feats[o] @ kernel[k]`` for every pair ``(o <- i, k)`` of that map.

All tensors derived from one input share a :class:`SparseCache` holding per-stride coordinates and kernel
maps keyed by ``(in_stride, kernel_size, stride, dilation)``, so every layer config builds its map once per
forward pass and transposed convs reuse the maps of their strided twins.

The package, by concern: ``tensor`` (SparseTensor, SparseCache, Workspace), ``hashing`` (coordinate keys, radix
sort, kernel offsets), ``maps`` (kernel maps, downsampling), ``kernels`` (gather-matmul-scatter, the fused
inference conv), ``conv`` (Conv3d), ``layers`` (BatchNorm, ReLU, conv-norm-ReLU, residual blocks), ``fused`` (those
layers at inference: norms folded into the convs, epilogues on the kernels' accumulators), ``torchsparse_backend``,
``voxelization`` (voxelize).
"""
import warnings

from sal_ros.model.sparse.conv import Conv3d
from sal_ros.model.sparse.hashing import kernel_offsets
from sal_ros.model.sparse.kernels import sparse_conv_inference
from sal_ros.model.sparse.maps import KernelMap, build_kernel_map, build_parent_map
from sal_ros.model.sparse.tensor import SparseCache, SparseTensor, Workspace, cat_feats, to_dense
from sal_ros.model.sparse.torchsparse_backend import torchsparse_available
from sal_ros.model.sparse.voxelization import voxelize

# The downsampling the benches time on its own (private to the convs otherwise).
from sal_ros.model.sparse.maps import _downsample_coords, _downsample_with_parents  # noqa: E402,F401

# The kernel maps' CSR scatter matrices and voxelize's sums are plain CSR tensors of ones; torch's one-time
# beta notice says nothing here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

__all__ = [
    "SparseTensor",
    "SparseCache",
    "Workspace",
    "KernelMap",
    "Conv3d",
    "voxelize",
    "cat_feats",
    "to_dense",
    "kernel_offsets",
    "build_kernel_map",
    "build_parent_map",
    "sparse_conv_inference",
    "torchsparse_available",
]
