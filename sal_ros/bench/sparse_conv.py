"""The sparse convolution parts of ``sal-ros bench model``, each against a reference in the same run: the stride-1
3x3x3 kernel map walked along z columns against the searched one; one 3x3x3 submanifold layer of the stem's width on
the voxels inside a crop small enough for a dense grid, through sal_ros.model.sparse.Conv3d and through F.conv3d
with the same weights; MinkUNet's 2x2x2 stride-2 conv on the whole scan, its kernel map built from the
downsampling's parents against the generic searched map; and (given a folder holding spconv) both against spconv's
CPU convs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from sal_ros.bench.timing import median_ms


def bench_submanifold_map(scan: np.ndarray, device: str, voxel_size: float, repeats: int) -> dict:
    """The 3x3x3 submanifold kernel map on the whole scan's stride-1 voxels, walked along z columns (what Conv3d
    does) against the searched one, same run, and whether their pairs are identical."""
    import torch

    from sal_ros.model.sparse import build_kernel_map, kernel_offsets, voxelize

    pts = torch.from_numpy(np.ascontiguousarray(scan[:, :3])).to(device)
    x, _ = voxelize(pts, None, voxel_size, pts)
    offsets = kernel_offsets(3, x.device)

    def build(walk: bool):
        return build_kernel_map(x.coords, x.coords, offsets, True, walk_columns=walk)

    with torch.inference_mode():
        a, b = build(True), build(False)
        same = all(torch.equal(i, j) and torch.equal(o, p)
                   for i, o, j, p in zip(a.in_idx, a.out_idx, b.in_idx, b.out_idx))
        walked = median_ms(lambda: build(True), repeats, warmup=1, clock=time.thread_time_ns)
        searched = median_ms(lambda: build(False), repeats, warmup=1, clock=time.thread_time_ns)
    return {"voxels": len(x), "pairs": sum(len(i) for i in a.in_idx) + len(x), "walked_ms": round(walked, 2),
            "searched_ms": round(searched, 2), "map_speedup": round(searched / walked, 2), "maps_identical": same}


def bench_conv(scan: np.ndarray, device: str, crop: tuple[float, float, float], channels: int, voxel_size: float,
               repeats: int) -> dict:
    """One submanifold 3x3x3 layer, sparse vs dense F.conv3d with the same weights, on a crop of the scan."""
    import torch
    import torch.nn.functional as F

    from sal_ros.model.sparse import Conv3d, kernel_offsets, to_dense, voxelize

    lo = np.array([2.0, -crop[1] / 2, -2.4])  # ahead of the car: road, kerbs, cars
    inside = np.all((scan[:, :3] >= lo) & (scan[:, :3] < lo + crop), axis=1)
    if not inside.any():
        return {"error": f"no scan points in the {list(crop)} m crop ahead of the sensor; enlarge --conv-crop"}
    pts = torch.from_numpy(scan[inside, :3] - lo.astype(np.float32)).to(device)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(len(pts), channels, generator=gen).to(device)
    shape = tuple(int(np.ceil(c / voxel_size)) for c in crop)
    x, _ = voxelize(pts, None, voxel_size, feats)
    x.coords[:, 1:] = x.coords[:, 1:].clamp(min=0).minimum(torch.tensor(shape, device=device) - 1)  # float edge
    conv = Conv3d(channels, channels, 3, backend="torch").to(device).eval()
    weight = torch.zeros(channels, channels, 3, 3, 3, device=device)
    for k, (dx, dy, dz) in enumerate(kernel_offsets(3).tolist()):
        weight[:, :, dx + 1, dy + 1, dz + 1] = conv.kernel[k].detach().T
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def sparse():
        fresh = type(x)(x.feats, x.coords, 1)  # new cache: includes building the kernel map
        return conv(fresh).feats

    def dense():
        return F.conv3d(to_dense(x, shape), weight, padding=1)

    def timed(fn):
        out = _synced(fn, sync)()  # the warm-up call's output is the one compared
        return out, median_ms(_synced(fn, sync), repeats, warmup=0)

    with torch.inference_mode():
        sparse_out, sparse_ms = timed(sparse)
        dense_grid, dense_ms = timed(dense)
        idx = x.coords[:, 1:].long()
        dense_out = dense_grid[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T
        # dense conv also sums empty neighbours (zeros), so it equals the submanifold conv at active voxels
        diff = float((sparse_out - dense_out).abs().max())
    return {"layer": f"Conv3d({channels}, {channels}, kernel_size=3) submanifold", "voxel_size": voxel_size,
            "crop_m": list(crop), "grid": list(shape), "active_voxels": len(x),
            "occupancy_percent": round(100 * len(x) / float(np.prod(shape)), 3),
            "sparse_ms": round(sparse_ms, 2), "dense_ms": round(dense_ms, 2),
            "dense_over_sparse": round(dense_ms / sparse_ms, 1), "max_abs_diff": diff}


def bench_strided_conv(scan: np.ndarray, device: str, voxel_size: float, channels: int, repeats: int) -> dict:
    """MinkUNet's 2x2x2 stride-2 conv on the whole scan's voxels, kernel map included, with the map built from the
    downsampling's parents (what Conv3d does) and by the generic search (the reference), same run."""
    import torch

    from sal_ros.model.sparse import (Conv3d, SparseTensor, _downsample_coords, _downsample_with_parents,
                                      build_kernel_map, build_parent_map, kernel_offsets, voxelize)

    pts = torch.from_numpy(np.ascontiguousarray(scan[:, :3])).to(device)
    gen = torch.Generator().manual_seed(0)
    x, _ = voxelize(pts, None, voxel_size, torch.randn(len(pts), channels, generator=gen).to(device))
    conv = Conv3d(channels, channels, 2, 2, backend="torch").to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def parent_map():
        out, parents = _downsample_with_parents(x.coords, 2)
        return build_parent_map(x.coords, out, parents, 1)

    def searched_map():
        out = _downsample_coords(x.coords, 2)
        return build_kernel_map(x.coords, out, kernel_offsets(2, x.device), submanifold=False)

    def whole_conv():
        return conv(SparseTensor(x.feats, x.coords, 1)).feats  # fresh cache: the map is built every call

    def timed(fn):
        return median_ms(_synced(fn, sync), repeats, warmup=1)

    with torch.inference_mode():
        a, b = parent_map(), searched_map()
        same = all(sorted(zip(i.tolist(), o.tolist())) == sorted(zip(j.tolist(), p.tolist()))
                   for i, o, j, p in zip(a.in_idx, a.out_idx, b.in_idx, b.out_idx))
        parent_ms, searched_ms = timed(parent_map), timed(searched_map)
        conv_ms = timed(whole_conv)
    return {"layer": f"Conv3d({channels}, {channels}, kernel_size=2, stride=2)", "voxels_in": len(x),
            "voxels_out": a.n_out, "conv_ms": round(conv_ms, 2), "parent_map_ms": round(parent_ms, 2),
            "searched_map_ms": round(searched_ms, 2), "map_speedup": round(searched_ms / parent_ms, 2),
            "maps_identical": same}


def bench_spconv(scan: np.ndarray, path: Path, voxel_size: float, channels: int, repeats: int) -> dict:
    """Our 2x2x2 stride-2 and 3x3x3 submanifold convs against spconv's CPU ones on the whole scan's voxels, the same
    weights, kernel maps built in every call by both; the outputs are compared before timing."""
    import torch

    sys.path.insert(0, str(path))
    try:
        import spconv.pytorch as spconv
    except Exception as exc:  # not there, or its extension does not load here
        return {"error": f"spconv does not import from {path}: {type(exc).__name__}: {exc}"}
    from sal_ros.model.sparse import Conv3d, SparseTensor, kernel_offsets, voxelize

    gen = torch.Generator().manual_seed(0)
    pts = torch.from_numpy(np.ascontiguousarray(scan[:, :3]))
    x, _ = voxelize(pts, None, voxel_size, torch.randn(len(pts), channels, generator=gen))
    lo = x.coords[:, 1:].min(0).values
    shift = -lo + lo % 2  # non-negative for spconv, even so that stride-2 cells stay the same cells
    idx = x.coords.clone()
    idx[:, 1:] += shift
    shape = (idx[:, 1:].max(0).values + 2).tolist()
    out: dict = {"voxels": len(x), "channels": channels, "spconv": getattr(spconv, "__version__", "2.x")}
    for name, k, s in (("strided_2x2x2", 2, 2), ("submanifold_3x3x3", 3, 1)):
        ours = Conv3d(channels, channels, k, s, backend="torch").eval()
        cls = spconv.SubMConv3d if s == 1 else spconv.SparseConv3d
        theirs = cls(channels, channels, k, s, bias=False, algo=spconv.ConvAlgo.Native).eval()
        with torch.no_grad():
            weight = torch.zeros_like(theirs.weight)  # (out, kx, ky, kz, in)
            centre = (k - 1) // 2
            for j, (dx, dy, dz) in enumerate(kernel_offsets(k).tolist()):
                weight[:, dx + centre, dy + centre, dz + centre, :] = ours.kernel[j].T
            theirs.weight.copy_(weight)

        def run_ours():
            return ours(SparseTensor(x.feats, x.coords, 1))

        def run_theirs():
            return theirs(spconv.SparseConvTensor(x.feats, idx.int(), shape, 1))

        with torch.inference_mode():
            a, b = run_ours(), run_theirs()
            rows = {tuple(c): i for i, c in enumerate(((a.coords[:, 1:].long() + shift) // s).tolist())}
            order = torch.tensor([rows[tuple(c)] for c in b.indices[:, 1:].tolist()])
            diff = float((a.feats[order] - b.features).abs().max())
            ours_ms, theirs_ms = median_ms(run_ours, repeats, warmup=1), median_ms(run_theirs, repeats, warmup=1)
        out[name] = {"ours_ms": round(ours_ms, 2), "spconv_ms": round(theirs_ms, 2),
                     "ours_over_spconv": round(ours_ms / theirs_ms, 2), "max_abs_diff": diff,
                     "output_voxels": len(a.coords)}
    return out


def _synced(fn, sync):
    """``fn`` followed by a device sync, returning ``fn``'s result: what a timing must include on CUDA."""
    def call():
        out = fn()
        sync()
        return out
    return call
