"""``sal-ros bench gpu``: the GPU figures in one command (about 5-8 min on one GPU), JSON on stdout.

Sections, each on the real SemanticKITTI scan:

- ``parity``: the same weights (``--checkpoint``, else seeded random minkunet34) on the CPU in float32 and on the
  device in float32 and bf16: share of points whose label / instance differ, largest score difference;
- ``latency``: per preset, the Segmenter on the device in float32 and bf16 (autocast), p50 / p99 of the whole call
  and stage medians over ``--repeats`` scans, peak memory; on CUDA, ``torch.compile`` of the decoder layers is timed
  beside eager and kept only where it is faster (the JSON says which). CUDA graphs are not used: kernel maps and
  voxel counts change with every scan (data-dependent shapes), which a captured graph cannot follow;
- ``node``: the segmenter node in its own process (``sal-ros run``, real DDS on loopback) answering a replay of
  ``--replay-frames`` clouds at 10 Hz: end-to-end latency p50 / p99, drops;
- ``train_step``: one training step (forward, Hungarian-matched SAL loss against the scan's ground-truth instances,
  backward, AdamW) under bf16 autocast, after one warm-up step; time and peak memory.

Without CUDA (``--device cuda``, the default) every section is skipped with a line saying so; ``--device cpu`` runs
all of them on the CPU at whatever size is given (how the tests check the code path on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sal_ros.bench.env import add_thread_argument, apply_threads, environment, finish
from sal_ros.bench.model import DEFAULT_SCAN, REPO, UNTHRESHOLDED, parity
from sal_ros.model.config import split_specs

SECTIONS = ("parity", "latency", "node", "train_step")
CUDA_GRAPHS_NOTE = ("not used: kernel maps and voxel counts change with every scan (data-dependent shapes), "
                    "which a captured CUDA graph cannot follow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; every section is skipped without CUDA) or cpu (checks the code path)")
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN, help="KITTI-format .bin scan with ../labels")
    parser.add_argument("--points", type=int, default=0, help="points taken from the scan (default 0: all)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model for parity and the node (default: seeded random weights of --parity-preset)")
    parser.add_argument("--parity-preset", default="minkunet34")
    parser.add_argument("--presets", default="tiny,minkunet34", help="comma-separated presets for latency")
    parser.add_argument("--train-preset", default="minkunet34")
    parser.add_argument("--repeats", type=int, default=30, help="timed scans per preset and precision (default 30)")
    parser.add_argument("--replay-frames", type=int, default=50, help="clouds replayed at 10 Hz (default 50)")
    parser.add_argument("--compile", choices=("auto", "off"), default="auto",
                        help="auto: time torch.compile of the decoder layers on CUDA and keep it where faster")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip ({', '.join(SECTIONS)})")
    add_thread_argument(parser)


def main(args: argparse.Namespace) -> int:
    import torch

    threads = apply_threads(args.threads)
    result: dict[str, Any] = {"bench": "gpu", "device": args.device, "threads": threads, "environment": environment(),
                              "cuda_graphs": CUDA_GRAPHS_NOTE}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        print(f"sal-ros bench gpu: unknown --skip {sorted(skip - set(SECTIONS))}; known: {SECTIONS}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        line = "CUDA is not available: parity, latency, node and train_step skipped (--device cpu runs them on CPU)"
        print(f"sal-ros bench gpu: {line}", file=sys.stderr)
        result.update(cuda=False, skipped=line)
        finish(result["environment"])
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    if not args.scan.is_file():
        print(f"sal-ros bench gpu: scan not found: {args.scan}", file=sys.stderr)
        return 1
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    scan, labels = _load_scan(args.scan, args.points)
    sections: dict[str, Callable[[], dict]] = {
        "parity": lambda: bench_parity(args, scan),
        "latency": lambda: {p: bench_latency(p, scan, args) for p in split_specs(args.presets)},
        "node": lambda: bench_node(args, scan),
        "train_step": lambda: bench_train_step(args.train_preset, scan, labels, args.device),
    }
    failed = False
    t_start = time.perf_counter()
    for name, run in sections.items():
        if name in skip:
            result[name] = {"skipped": "--skip"}
            continue
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as exc:  # one broken section must not hide the others' figures
            failed = True
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"sal-ros bench gpu: {name} done in {result[name]['section_s']} s", file=sys.stderr)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    finish(result["environment"])
    json.dump(result, sys.stdout, indent=2)
    print()
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------------- helpers


def _load_scan(path: Path, points: int) -> tuple[np.ndarray, np.ndarray | None]:
    scan = np.fromfile(path, np.float32).reshape(-1, 4)
    label_file = path.parent.parent / "labels" / f"{path.stem}.label"
    labels = np.fromfile(label_file, np.uint32) if label_file.is_file() else None
    if points and points < len(scan):
        keep = np.sort(np.random.default_rng(0).choice(len(scan), points, replace=False))
        scan, labels = scan[keep], None if labels is None else labels[keep]
    return scan, labels


def _model(preset: str, checkpoint: Path | None):
    import torch

    from sal_ros.model.config import ModelConfig
    from sal_ros.model.checkpoint import load_checkpoint
    from sal_ros.model.sal import SALModel

    if checkpoint is not None:
        return load_checkpoint(checkpoint, map_location="cpu")[0].eval()
    torch.manual_seed(0)
    return SALModel(ModelConfig.preset(preset)).eval()


def _embeddings(token_dim: int):
    from sal_ros.model.text_encoder import tiny_text_encoder
    from sal_ros.model.vocabulary import Vocabulary

    encoder = tiny_text_encoder()
    if encoder.embed_dim != token_dim:
        raise ValueError(f"the model predicts {token_dim}-d tokens, the tiny text encoder gives {encoder.embed_dim}")
    return encoder.encode(Vocabulary.from_yaml(REPO / "config" / "vocabulary_semantickitti.yaml"))


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    if device != "cuda":
        return None  # the CPU allocator keeps no peak
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, float)
    return {"p50": round(float(np.median(a)), 2), "p99": round(float(np.percentile(a, 99)), 2), "n": int(a.size)}


# ------------------------------------------------------------------------------------------------- sections


def bench_parity(args: argparse.Namespace, scan: np.ndarray) -> dict:
    """The same weights on the CPU (float32) and on the device (float32, bf16)."""
    from sal_ros.model.segmenter import Segmenter

    model = _model(args.parity_preset, args.checkpoint)
    emb = _embeddings(model.token_dim)
    pts, inten = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    cpu = Segmenter(model, "cpu", emb, UNTHRESHOLDED, amp=False).segment(pts, inten)
    out = {"model": str(args.checkpoint) if args.checkpoint else f"{args.parity_preset} (seeded random weights)",
           "points": len(pts)}
    for amp in (False, True):
        seg = Segmenter(model, args.device, emb, UNTHRESHOLDED, amp=amp)
        key = "bf16" if seg.amp else "fp32"
        if key not in out:  # a model the CPU keeps in float32 has no bf16 row
            out[key] = parity(cpu, seg.segment(pts, inten))
        model.to("cpu")
    return out


def bench_latency(preset: str, scan: np.ndarray, args: argparse.Namespace) -> dict:
    """p50 / p99 of the Segmenter's call in float32 and bf16, stage medians, peak memory; torch.compile on CUDA."""
    from sal_ros.model.segmenter import Segmenter

    device = args.device
    model = _model(preset, None)
    emb = _embeddings(model.token_dim)
    pts, inten = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    out: dict[str, Any] = {}
    for amp in (False, True):
        seg = Segmenter(model, device, emb, UNTHRESHOLDED, amp=amp)
        key = "bf16" if seg.amp else "fp32"
        if key in out:  # a CPU without native bf16 for this model: the bf16 row would repeat fp32
            continue
        _reset_peak(device)
        out[key] = _time_segmenter(seg, pts, inten, args.repeats, device)
        out[key]["peak_mib"] = _peak_mib(device)
    if device == "cuda" and args.compile == "auto":
        out["torch_compile"] = _try_compile(model, emb, pts, inten, args.repeats, out)
    else:
        out["torch_compile"] = {"used": False, "why": "not tried on CPU (inductor compile takes minutes)"
                                if device != "cuda" else "--compile off"}
    model.to("cpu")
    return out


def _time_segmenter(seg, pts: np.ndarray, inten: np.ndarray, repeats: int, device: str) -> dict:
    for _ in range(2):  # warm-up: allocator, kernels, lazy imports
        seg.segment(pts, inten)
    totals, stages = [], {}
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = seg.segment(pts, inten)
        _sync(device)
        totals.append((time.perf_counter() - t0) * 1e3)
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
    return {"total_ms": _percentiles(totals),
            "stage_median_ms": {k: round(float(np.median(v)), 2) for k, v in stages.items()}}


def _try_compile(model, emb, pts: np.ndarray, inten: np.ndarray, repeats: int, eager: dict) -> dict:
    """torch.compile(dynamic=True) on each decoder layer (dense tensors; the sparse backbone stays eager)."""
    import torch

    from sal_ros.model.segmenter import Segmenter

    layers = list(model.decoder.layers)
    try:
        for layer in model.decoder.layers:
            layer.compile(dynamic=True)
        seg = Segmenter(model, "cuda", emb, UNTHRESHOLDED, amp=True)
        t0 = time.perf_counter()
        seg.segment(pts, inten)  # compiles
        compile_s = time.perf_counter() - t0
        timed = _time_segmenter(seg, pts, inten, repeats, "cuda")
    except Exception as exc:  # no triton, an unsupported op: eager it is
        return {"used": False, "why": f"compile failed: {type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        for layer in layers:  # back to eager for whatever runs next
            layer._compiled_call_impl = None
        torch._dynamo.reset()
    base = eager.get("bf16", eager["fp32"])["total_ms"]["p50"]
    faster = timed["total_ms"]["p50"] < base
    return {"scope": "decoder layers, bf16", "compile_s": round(compile_s, 1), "compiled": timed,
            "eager_p50_ms": base, "used": faster,
            "why": "faster than eager" if faster else "not faster than eager: the node runs eager"}


def bench_node(args: argparse.Namespace, scan: np.ndarray) -> dict:
    """The node in its own process answering a 10 Hz replay of the scan; end-to-end latency from the topics."""
    import torch

    from sal_ros.tools import online
    from sal_ros.model.checkpoint import save_checkpoint
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER
    from sal_ros.model.text_encoder import tiny_text_encoder

    with tempfile.TemporaryDirectory(prefix="sal_bench_gpu_") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            model = _model(args.parity_preset, None)
            checkpoint = save_checkpoint(tmp / "model.pt", model, text_encoder_identity=tiny_text_encoder())
            del model
        bag = write_replay_bag(tmp / "bag", scan, args.replay_frames)
        params = tmp / "params.yaml"
        params.write_text(NODE_PARAMS.format(device=args.device, checkpoint=checkpoint, encoder=TINY_TEXT_ENCODER))
        if args.device == "cuda":
            torch.cuda.empty_cache()
        result = online.replay(bag, ["--params", str(params)], tmp / "node.log", cloud_topic=CLOUD_TOPIC, rate=1.0)
        summary = result.summary()
    lat = list(result.latency_ms.values())
    return {"clouds_sent": summary["clouds_sent"], "clouds_answered": summary["clouds_answered"],
            "dropped": summary["dropped"], "rate_hz": 10.0, "points": len(scan),
            "end_to_end_ms": _percentiles(lat) if lat else None, "node_timings_ms": summary["node_timings_ms"]}


CLOUD_TOPIC = "/bench/points"
NODE_PARAMS = """/**:
  ros__parameters:
    cloud_topic: /bench/points
sal_segmenter:
  ros__parameters:
    model:
      checkpoint: "{checkpoint}"
      device: {device}
    text_encoder:
      model: {encoder}
      pretrained: ""
    prompts: [car, person, road, building, vegetation]
"""


def write_replay_bag(path: Path, scan: np.ndarray, frames: int) -> Path:
    """``frames`` copies of the scan 0.1 s apart (10 Hz), lidar only, as a rosbag2 the replay plays."""
    from sal_ros.core.pointcloud2 import encode_cloud
    from sal_ros.data.convert import _BagWriter  # the converter's writer: Kilted typestore, one connection per topic

    start = 1_700_000_000_000_000_000
    with _BagWriter(path, "mcap") as bag:
        for i in range(max(1, frames)):
            stamp = start + i * 100_000_000
            msg = encode_cloud({"xyz": scan[:, :3], "intensity": scan[:, 3]}, "velodyne", stamp, bag.types)
            bag.write(CLOUD_TOPIC, msg, stamp)
    return path


def bench_train_step(preset: str, scan: np.ndarray, labels: np.ndarray | None, device: str) -> dict:
    """One optimizer step on the scan with its ground-truth instances as targets (random unit tokens)."""
    import torch

    from sal_ros.train.losses import LossWeights, Target, sal_loss

    if labels is None:
        raise ValueError("the scan has no labels file next to it (../labels/<name>.label)")
    model = _model(preset, None).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inst = labels >> 16
    ids = [i for i in np.unique(inst) if i > 0 and (inst == i).sum() >= 50]
    masks = torch.from_numpy(np.stack([inst == i for i in ids])).to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(len(ids), model.token_dim, generator=gen), dim=-1).to(device)
    target = Target(masks, tokens)
    pts = torch.from_numpy(np.ascontiguousarray(scan[:, :3])).to(device)
    inten = torch.from_numpy(np.ascontiguousarray(scan[:, 3])).to(device)
    amp = device == "cuda"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=amp):
            layers = model([pts], [inten])
        loss, _ = sal_loss(layers, [target], LossWeights())
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()  # warm-up
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    model.to("cpu")
    return {"preset": preset, "amp": "bf16 autocast" if amp else "off (CPU)", "instances": len(ids),
            "points": len(scan), "step_ms": round(ms, 1), "loss": round(loss, 4), "peak_mib": _peak_mib(device)}
