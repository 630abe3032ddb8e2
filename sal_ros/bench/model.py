"""``sal-ros bench model``: per-stage model timings on a real 120k-point scan, and sparse vs dense convolution.

Stages are the Segmenter's (voxelize, backbone, decoder, postprocess: fusion, classification, boxes), median ms
over ``--repeats`` runs after a warm-up, for each model preset on CPU and on CUDA when present. Weights are
random (timings do not depend on them); the vocabulary is the 19 SemanticKITTI classes from the tiny text encoder.

The convolution check runs one 3x3x3 submanifold layer of the stem's width on the scan's voxels inside a crop
small enough for a dense grid, through sal_ros.model.sparse.Conv3d and through F.conv3d with the same weights;
it reports both times and the largest absolute difference at the active voxels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SCAN = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "semantickitti" / "sequences" / "00"
                / "velodyne" / "000000.bin")
REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="KITTI-format .bin scan (x y z reflectance)")
    parser.add_argument("--points", type=int, default=120_000, help="points taken from the scan (default 120000)")
    parser.add_argument("--presets", default="minkunet34,tiny", help="comma-separated model presets")
    parser.add_argument("--voxel-size", type=float, default=None, help="override the presets' voxel size (m)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, and CUDA too when available")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per preset and device (default 3)")
    parser.add_argument("--conv-crop", type=float, nargs=3, default=(6.4, 6.4, 3.2), metavar=("X", "Y", "Z"),
                        help="metres of the dense-convolution crop ahead of the sensor (default 6.4 6.4 3.2)")
    parser.add_argument("--conv-channels", type=int, default=32, help="channels of the compared layer (default 32)")


def main(args: argparse.Namespace) -> int:
    import torch

    from sal_ros.model.backbone import ModelConfig

    if not args.scan.is_file():
        print(f"sal-ros bench model: scan not found: {args.scan}", file=sys.stderr)
        return 1
    scan = np.fromfile(args.scan, np.float32).reshape(-1, 4)
    if args.points and args.points < len(scan):
        scan = scan[np.sort(np.random.default_rng(0).choice(len(scan), args.points, replace=False))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result = {"scan": str(args.scan), "points": len(scan), "torch": str(torch.__version__),
              "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "models": {}, "conv": {}}
    for device in devices:
        if device == "cuda":
            result["gpu"] = torch.cuda.get_device_name(0)
        result["models"][device] = {}
        for name in presets:
            overrides = {"voxel_size": args.voxel_size} if args.voxel_size else {}
            result["models"][device][name] = bench_preset(ModelConfig.preset(name, **overrides), scan, device,
                                                          args.repeats)
            print(f"{device} {name}: {result['models'][device][name]['median_ms']}", file=sys.stderr)
        result["conv"][device] = bench_conv(scan, device, tuple(args.conv_crop), args.conv_channels,
                                            ModelConfig().voxel_size, max(args.repeats, 3))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def bench_preset(config, scan: np.ndarray, device: str, repeats: int) -> dict:
    """Median ms per Segmenter stage (and their sum) after one warm-up run."""
    import torch

    from sal_ros.model.sal import SALModel
    from sal_ros.model.segmenter import Segmenter
    from sal_ros.model.vocabulary import Vocabulary, tiny_text_encoder

    torch.manual_seed(0)
    encoder = tiny_text_encoder(device)
    vocab = Vocabulary.from_yaml(REPO / "config" / "vocabulary_semantickitti.yaml")
    model = SALModel(config)
    segmenter = Segmenter(model, device, encoder.encode(vocab))
    points, intensity = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    segmenter.segment(points, intensity)  # warm-up: allocator, kernels, lazy imports
    stages: dict[str, list[float]] = {}
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        seg = segmenter.segment(points, intensity)
        wall = (time.perf_counter() - t0) * 1e3
        for stage, ms in {**seg.timings_ms, "total": wall}.items():
            stages.setdefault(stage, []).append(ms)
    with torch.inference_mode():
        voxels = model.prepare(torch.from_numpy(points).to(device)).num_voxels[0]
    params = model.num_parameters()
    return {"voxel_size": config.voxel_size, "voxels": voxels, "queries": config.num_queries,
            "params_m": {k: round(v / 1e6, 2) for k, v in params.items()},
            "median_ms": {k: round(float(np.median(v)), 1) for k, v in stages.items()}}


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
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return out, float(np.median(times))

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
