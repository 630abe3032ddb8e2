"""The torchsparse 2.1 backend (CUDA): the same conv through its kernels, coordinates converted to its divided,
non-negative units and back."""
from __future__ import annotations

from torch import nn

from sal_ros.model.sparse.tensor import SparseTensor


def torchsparse_available() -> bool:
    """True where ``import torchsparse`` works (its CUDA kernels are then used for CUDA inputs)."""
    try:
        import torchsparse  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load its extension
        return False
    return True


_TS_SHIFT_ALIGN = 2**16  # shift is a multiple of every power-of-two tensor stride up to 65536


def _torchsparse_conv3d(conv: nn.Module, x: SparseTensor) -> SparseTensor:
    """Run ``conv`` (a Conv3d) through torchsparse 2.1 (CUDA), in its divided, non-negative coordinates."""
    import torchsparse
    from torchsparse.nn import functional as tsF

    cache = x.cache
    if cache.ts_shift is None:
        lowest = int(cache.coords[min(cache.coords)][:, 1:].min()) if len(x) else 0
        cache.ts_shift = -(lowest // _TS_SHIFT_ALIGN) * _TS_SHIFT_ALIGN if lowest < 0 else 0
    shift = cache.ts_shift
    coords = x.coords.clone()
    coords[:, 1:] = (coords[:, 1:] + shift) // x.stride
    t = torchsparse.SparseTensor(feats=x.feats, coords=coords, stride=x.stride)
    if cache.ts_caches is None:
        cache.ts_caches = t._caches
    t._caches = cache.ts_caches
    t._caches.cmaps.setdefault(t.stride, (t.coords, t.spatial_range))
    k, s = conv.kernel_size, conv.stride
    padding = (k - 1) // 2 if k % 2 == 1 and s == 1 else 0  # as torchsparse.nn.Conv3d derives it
    out = tsF.conv3d(
        t, conv.kernel, (k, k, k), bias=conv.bias, stride=(s, s, s), padding=(padding,) * 3, dilation=1,
        transposed=conv.transposed, training=conv.training,
    )
    out_stride = int(out.stride[0])
    known = cache.coords.get(out_stride)
    if known is not None and len(known) == len(out.coords):
        out_coords = known  # same voxels in the same (lexicographic) order, kept identical for cat_feats
    else:
        out_coords = out.coords.clone()
        out_coords[:, 1:] = out_coords[:, 1:] * out_stride - shift
    return SparseTensor(out.feats, out_coords, out_stride, cache)
