"""``sal-ros bench model``: model timings on a real lidar scan, each as a ratio to a reference timed in the same run.

Per preset and device, the Segmenter's stages (voxelize, backbone, decoder, postprocess: fusion, classification,
boxes) as the node runs them (bfloat16 autocast where the CPU has native bf16 or on CUDA; the decoder's
intermediate masks pooled straight to the attention levels), and beside it, interleaved run by run on the same
scan and weights, the float32 reference path (no autocast, full-resolution intermediate masks: the path before
issue 17). ``speedup_vs_fp32`` is the ratio of their median totals; ``parity`` counts the points whose label or
instance differ between the two. Each total is also given in this thread's CPU time (``total_cpu``), and
``ratios`` divides every preset's totals by those of ``tiny`` and ``minkunet34`` when they ran in the same call. Weights are random (timings do not depend on them); the vocabulary is the 19
SemanticKITTI classes from the tiny text encoder.

Backbone (``backbone``): MinkUNet alone, fused inference against the modules one by one, same dtype, interleaved;
``submanifold_map``: the stride-1 3x3x3 kernel map walked along z columns against the searched one.

Convolutions (sal_ros.bench.sparse_conv): one 3x3x3 submanifold layer of the stem's width on the scan's voxels inside a crop small enough for a
dense grid, through sal_ros.model.sparse.Conv3d and through F.conv3d with the same weights (time and the largest
absolute difference at the active voxels); and MinkUNet's 2x2x2 stride-2 downsampling conv on the whole scan, its
kernel map built from the downsampling's parents against the generic searched map, same run.

Torch runs with the segmenter node's thread policy unless ``--threads`` says otherwise; the JSON records threads,
CPU, load average before and after, and library versions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sal_ros.bench.env import add_thread_argument, apply_threads, environment, finish
from sal_ros.bench.sparse_conv import bench_conv, bench_spconv, bench_strided_conv, bench_submanifold_map
from sal_ros.bench.timing import median_ms
from sal_ros.core.cloud_input import SegmenterConfig
from sal_ros.model.config import split_specs

DEFAULT_SCAN = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "semantickitti" / "sequences" / "00"
                / "velodyne" / "000000.bin")
REPO = Path(__file__).resolve().parents[2]

# Every point keeps its best query (no score_threshold): speed and parity compare the model's whole output.
UNTHRESHOLDED = SegmenterConfig(score_threshold=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="KITTI-format .bin scan (x y z reflectance)")
    parser.add_argument("--points", type=int, default=0, help="points taken from the scan (default 0: all)")
    parser.add_argument("--presets", default="minkunet34,tiny",
                        help="comma-separated model presets, each with optional field overrides after colons, "
                             "e.g. tiny,tiny:voxel_size=0.4:num_queries=16 (a candidate timed beside the presets)")
    parser.add_argument("--voxel-size", type=float, default=None, help="override the presets' voxel size (m)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, and CUDA too when available")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per preset and device (default 3)")
    parser.add_argument("--conv-crop", type=float, nargs=3, default=(6.4, 6.4, 3.2), metavar=("X", "Y", "Z"),
                        help="metres of the dense-convolution crop ahead of the sensor (default 6.4 6.4 3.2)")
    parser.add_argument("--conv-channels", type=int, default=32, help="channels of the compared layer (default 32)")
    parser.add_argument("--no-reference", action="store_true", help="skip the float32 reference path (no ratios)")
    parser.add_argument("--spconv-path", type=Path, default=None,
                        help="folder holding spconv 2.x (e.g. pip install --target DIR spconv cumm ...): also time "
                             "spconv's CPU convs on the same layers, weights copied (reference only, not a dependency)")
    add_thread_argument(parser)


def main(args: argparse.Namespace) -> int:
    import torch

    from sal_ros.model.config import ModelConfig

    if not args.scan.is_file():
        print(f"sal-ros bench model: scan not found: {args.scan}", file=sys.stderr)
        return 1
    threads = apply_threads(args.threads)
    scan = load_scan(args.scan, args.points)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    try:
        presets = split_specs(args.presets)
        for spec in presets:
            preset_config(spec)
    except (TypeError, ValueError) as exc:
        print(f"sal-ros bench model: {exc}", file=sys.stderr)
        return 1
    result = {"bench": "model", "scan": str(args.scan), "points": len(scan), "threads": threads,
              "repeats": args.repeats, "environment": environment(), "models": {}, "backbone": {}, "conv": {},
              "strided_conv": {}, "submanifold_map": {}}
    for device in devices:
        if device == "cuda":
            result["gpu"] = torch.cuda.get_device_name(0)
        result["models"][device], result["backbone"][device] = {}, {}
        for name in presets:
            row, backbone = preset_in_fresh_process(name, args, device, threads)
            result["models"][device][name] = row
            print(f"{device} {name}: {row['median_ms']} speedup_vs_fp32 {row.get('speedup_vs_fp32')}",
                  file=sys.stderr)
            if backbone is not None:
                result["backbone"][device][name] = backbone
        result["submanifold_map"][device] = bench_submanifold_map(scan, device, ModelConfig().input.voxel_size,
                                                                  max(args.repeats, 3))
        result["conv"][device] = bench_conv(scan, device, tuple(args.conv_crop), args.conv_channels,
                                            ModelConfig().input.voxel_size, max(args.repeats, 3))
        result["strided_conv"][device] = bench_strided_conv(scan, device, ModelConfig().input.voxel_size,
                                                            args.conv_channels, max(args.repeats, 3))
        if args.spconv_path is not None and device == "cpu":
            result["spconv"] = bench_spconv(scan, args.spconv_path, ModelConfig().input.voxel_size, args.conv_channels,
                                            max(args.repeats, 3))
    result["ratios"] = preset_ratios(result["models"])
    finish(result["environment"])
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


REFERENCE_PRESETS = ("tiny", "minkunet34")


def preset_ratios(models: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per device and preset, its median total (wall, and this thread's CPU time) over each reference preset's
    timed in the same run, where that reference was among ``--presets``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for device, rows in models.items():
        for name, row in rows.items():
            for ref in REFERENCE_PRESETS:
                if ref in rows and ref != name:
                    ratios = out.setdefault(device, {}).setdefault(name, {})
                    for key in ("total", "total_cpu"):
                        ratios[f"{key}_vs_{ref}"] = round(row["median_ms"][key] / rows[ref]["median_ms"][key], 3)
    return out


def load_scan(path: Path, points: int = 0) -> np.ndarray:
    """The KITTI-format scan, or a seeded subset of ``points`` of it (the same subset in every process)."""
    scan = np.fromfile(path, np.float32).reshape(-1, 4)
    if points and points < len(scan):
        scan = scan[np.sort(np.random.default_rng(0).choice(len(scan), points, replace=False))]
    return scan


def preset_in_fresh_process(name: str, args: argparse.Namespace, device: str, threads: int) -> tuple[dict, dict]:
    """One preset's rows, timed in a process of its own, as a node runs one model: after minkunet34 had run in
    the same process, tiny took 1.2-1.4x longer (every stage, numpy ones too: the process's memory state)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_preset_rows, name, args.voxel_size, args.scan, args.points, device, args.repeats,
                           not args.no_reference, threads).result()


def _preset_rows(name: str, voxel_size: float | None, scan_path: Path, points: int, device: str, repeats: int,
                 reference: bool, threads: int) -> tuple[dict, dict | None]:
    apply_threads(threads)
    scan = load_scan(scan_path, points)
    config = preset_config(name, voxel_size)
    row = bench_preset(config, scan, device, repeats, reference=reference)
    backbone = bench_backbone(config, scan, device, max(repeats, 3)) if config.backbone == "minkunet" else None
    return row, backbone


def preset_config(spec: str, voxel_size: float | None = None):
    """The ModelConfig of ``preset[:field=value...]`` (``sal_ros.model.config.preset_settings``), ``--voxel-size``
    applied."""
    from sal_ros.model.config import ModelConfig, preset_settings

    overrides = preset_settings(spec)
    name = overrides.pop("preset")
    if voxel_size:
        overrides["voxel_size"] = voxel_size
    return ModelConfig.preset(name, **overrides)


def _stage_medians(stages: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(float(np.median(v)), 1) for k, v in stages.items()}


def bench_preset(config, scan: np.ndarray, device: str, repeats: int, reference: bool = True) -> dict:
    """Median ms per Segmenter stage (and their sum) after one warm-up run, and the same for the float32
    reference path, the two interleaved run by run so that load changes hit both alike."""
    import torch

    from sal_ros.model.sal import SALModel
    from sal_ros.model.segmenter import Segmenter
    from sal_ros.model.text_encoder import tiny_text_encoder
    from sal_ros.model.vocabulary import Vocabulary

    torch.manual_seed(0)
    encoder = tiny_text_encoder(device)
    vocab = Vocabulary.from_yaml(REPO / "config" / "vocabulary_semantickitti.yaml")
    model = SALModel(config)
    embeddings = encoder.encode(vocab)
    paths = {"fast": (Segmenter(model, device, embeddings, UNTHRESHOLDED), True)}
    if reference:
        paths["fp32"] = (Segmenter(model, device, embeddings, UNTHRESHOLDED, amp=False), False)
    points, intensity = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])

    def run(path: str):
        segmenter, pooled = paths[path]
        model.decoder.pooled_masks = pooled
        model.backbone.fused_inference = pooled  # the reference runs the backbone module by module, searched maps
        t0, c0 = time.perf_counter(), time.thread_time_ns()
        seg = segmenter.segment(points, intensity)
        # this thread's CPU time beside the wall time: on a shared machine it is inflated far less by other jobs
        return seg, {**seg.timings_ms, "total": (time.perf_counter() - t0) * 1e3,
                     "total_cpu": (time.thread_time_ns() - c0) / 1e6}

    try:
        outputs = {path: run(path)[0] for path in paths}  # warm-up: allocator, kernels, lazy imports
        stages: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
        for _ in range(max(1, repeats)):
            for path in paths:
                _, timings = run(path)
                for stage, ms in timings.items():
                    stages[path].setdefault(stage, []).append(ms)
    finally:
        model.decoder.pooled_masks = model.backbone.fused_inference = True
    with torch.inference_mode():
        voxels = model.prepare(torch.from_numpy(points).to(device)).num_voxels[0]
    params = model.num_parameters()
    row = {"voxel_size": config.input.voxel_size, "voxels": voxels, "queries": config.decoder.num_queries,
           "params_m": {k: round(v / 1e6, 2) for k, v in params.items()},
           "bf16": paths["fast"][0].amp, "median_ms": _stage_medians(stages["fast"])}
    if reference:
        row["reference_fp32_median_ms"] = _stage_medians(stages["fp32"])
        row["speedup_vs_fp32"] = round(float(np.median(stages["fp32"]["total"]) / np.median(stages["fast"]["total"])), 2)
        row["parity"] = parity(outputs["fp32"], outputs["fast"])
    return row


def bench_backbone(config, scan: np.ndarray, device: str, repeats: int) -> dict:
    """MinkUNet alone in the Segmenter's compute dtype: fused inference (BatchNorm folded, float32 epilogues, walked
    kernel maps, bucketed bf16 matmul shapes) against the modules one by one on searched maps, interleaved call by
    call, this thread's CPU time (a busy machine inflates it less than wall time); on the scan again and again, and
    on fresh scans (the scan with 1 cm of seeded noise per call: new voxels and pair counts, as a live sensor gives,
    so kernels compiled per matmul shape are paid again); and the largest difference relative to each level's
    range."""
    import torch

    from sal_ros.model.runtime import cpu_bf16
    from sal_ros.model.sal import SALModel

    torch.manual_seed(0)
    model = SALModel(config).to(device).eval()
    amp = device == "cuda" or cpu_bf16(config)

    def voxels(noise_seed=None):
        pts = scan[:, :3]
        if noise_seed is not None:
            pts = pts + np.random.default_rng(noise_seed).normal(0.0, 0.01, pts.shape).astype(np.float32)
        with torch.inference_mode():
            return model.prepare(torch.from_numpy(np.ascontiguousarray(pts)).to(device),
                                 torch.from_numpy(np.ascontiguousarray(scan[:, 3])).to(device)).voxels

    def run(fused: bool, x):
        model.backbone.fused_inference = fused
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=amp):
            out = model.backbone(type(x)(x.feats, x.coords, 1))  # fresh cache: maps built too
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    def timed(fused: bool, x) -> float:
        return median_ms(lambda: run(fused, x), 1, warmup=0, clock=time.thread_time_ns)

    same = voxels()
    try:
        fused, modules = run(True, same), run(False, same)
        diff = max(float((fused[s].feats.float() - modules[s].feats.float()).abs().max()
                         / modules[s].feats.float().abs().max().clamp(min=1e-12)) for s in modules)
        del fused, modules
        times: dict[str, list[float]] = {"fused": [], "modules": [], "fresh_fused": [], "fresh_modules": []}
        for r in range(repeats):
            fresh = voxels(noise_seed=r)
            for path in (True, False):
                name = "fused" if path else "modules"
                times[name].append(timed(path, same))
                times["fresh_" + name].append(timed(path, fresh))
    finally:
        model.backbone.fused_inference = True
    ms = {k: float(np.median(v)) for k, v in times.items()}
    return {"bf16": amp, "voxels": len(same), **{f"{k}_ms": round(v, 1) for k, v in ms.items()},
            "fused_speedup": round(ms["modules"] / ms["fused"], 3),
            "fresh_fused_speedup": round(ms["fresh_modules"] / ms["fresh_fused"], 3),
            "max_rel_diff": float(f"{diff:.3g}"), "clock": "thread CPU time"}


def parity(reference, fast) -> dict:
    """Share of points whose label / instance partition differs from the reference run, and the score drift.
    Instance ids are numbered in query order, so one instance more or less renumbers every later one:
    ``instance_differs_share`` compares the partitions (ids matched one to one by overlap), and
    ``instance_ids_differ_share`` the raw ids."""
    labelled = reference.label > 0
    return {"label_differs_share": round(float(np.mean(reference.label != fast.label)), 5),
            "instance_differs_share": round(instance_partition_differs(reference.instance, fast.instance), 5),
            "instance_ids_differ_share": round(float(np.mean(reference.instance != fast.instance)), 5),
            "labelled_points_reference": int(labelled.sum()), "labelled_points": int((fast.label > 0).sum()),
            "max_abs_score_diff": round(float(np.abs(reference.score - fast.score).max()), 5)}


def instance_partition_differs(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of points not in the instance matched to theirs: ids paired one to one for the largest total overlap
    (Hungarian), 0 (no instance) only with 0."""
    from scipy.optimize import linear_sum_assignment

    ref_ids, ref = np.unique(reference, return_inverse=True)
    other_ids, oth = np.unique(other, return_inverse=True)
    overlap = np.bincount(ref.reshape(-1) * len(other_ids) + oth.reshape(-1),
                          minlength=len(ref_ids) * len(other_ids)).reshape(len(ref_ids), len(other_ids))
    overlap[(ref_ids == 0)[:, None] != (other_ids == 0)[None, :]] = 0  # "no instance" is no instance's match
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return 1.0 - float(overlap[rows, cols].sum()) / max(len(reference), 1)
