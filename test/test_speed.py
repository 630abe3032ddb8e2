"""Issue 17's faster inference path is the same model: bf16 on CPUs with native bf16, decoder masks pooled straight
to the attention levels, kernel maps of the stride-2 convs from the downsampling's parents. Each is checked
against the path it replaces on the real 124,668-point scan."""
import numpy as np
import pytest
import torch

from conftest import require_data, semantickitti_embeddings
from sal_ros.core.cloud_input import SegmenterConfig
from sal_ros.model import runtime
from sal_ros.model.sal import ModelConfig, SALModel
from sal_ros.model.segmenter import Segmenter
from sal_ros.model.sparse import (_downsample_coords, _downsample_with_parents, build_kernel_map, build_parent_map,
                                  kernel_offsets, voxelize)
from conftest import REPO

# Labels of the bf16 path may differ from the float32 path on at most this share of the scan's points (measured
# 0.47% with the seeded tiny model), and only where two queries' fused scores tie within bf16 rounding.
MAX_LABEL_DIFF_SHARE = 0.01
MAX_TIE_SCORE_GAP = 0.005


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    return np.fromfile(path, np.float32).reshape(-1, 4)


def _tiny_model(seed: int = 0) -> SALModel:
    torch.manual_seed(seed)
    return SALModel(ModelConfig.preset("tiny")).eval()


def test_parent_kernel_map_is_the_searched_map(scan):
    """Every stride-2 level of the real scan: the pairs built from the downsampling's parents are the pairs the
    generic search finds, offset by offset."""
    x, _ = voxelize(torch.from_numpy(scan[:, :3].copy()), None, 0.05, torch.zeros(len(scan), 1))
    coords, stride = x.coords, 1
    for _ in range(4):
        out, parents = _downsample_with_parents(coords, stride * 2)
        assert torch.equal(out, _downsample_coords(coords, stride * 2))
        fast = build_parent_map(coords, out, parents, stride)
        slow = build_kernel_map(coords, out, kernel_offsets(2) * stride, submanifold=False)
        assert sum(len(i) for i in fast.in_idx) == len(coords)  # every fine voxel in exactly one pair
        for k in range(8):
            a = sorted(zip(fast.in_idx[k].tolist(), fast.out_idx[k].tolist()))
            b = sorted(zip(slow.in_idx[k].tolist(), slow.out_idx[k].tolist()))
            assert a == b, f"stride {stride}, offset {k}"
        coords, stride = out, stride * 2


def test_pooled_decoder_masks_match_full_resolution_masks(scan):
    """float32, same weights: the inference path (masks pooled straight to the attention levels) gives the last
    layer the training path gives."""
    model = _tiny_model()
    pts = torch.from_numpy(scan[:, :3].copy())
    with torch.inference_mode():
        vin = model.prepare(pts, torch.from_numpy(scan[:, 3].copy()))
        feats = model.backbone(vin.voxels)
        model.decoder.pooled_masks = False
        full = model.decode(feats, 1, all_layers=False)[-1]
        model.decoder.pooled_masks = True
        pooled = model.decode(feats, 1, all_layers=False)[-1]
        every = model.decode(feats, 1, all_layers=True)[-1]  # the training path ignores pooled_masks
    assert pooled.masks[0].shape == full.masks[0].shape == (model.config.decoder.num_queries, vin.num_voxels[0])
    torch.testing.assert_close(pooled.masks[0], full.masks[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.objectness, full.objectness, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.tokens, full.tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(every.masks[0], full.masks[0])


def test_cpu_bf16_needs_native_bf16_and_wide_layers_or_the_override(monkeypatch):
    monkeypatch.delenv(runtime.ENV_BF16, raising=False)
    flags = runtime.cpu_flags()
    native = torch.backends.mkldnn.is_available() and bool({"amx_bf16", "avx512_bf16"} & flags)
    assert runtime.native_bf16_cpu() == native
    wide = ModelConfig.preset("tiny", widths=(16, 24, 32, 128))  # the 128-channel stage makes bf16 pay
    assert runtime.cpu_bf16(wide) == native and not runtime.cpu_bf16(ModelConfig.preset("tiny"))
    assert runtime.cpu_bf16(ModelConfig.preset("minkunet34")) == native
    torch.manual_seed(0)
    assert Segmenter(SALModel(wide), "cpu").amp == native and not Segmenter(_tiny_model(), "cpu").amp
    monkeypatch.setenv(runtime.ENV_BF16, "0")
    assert not runtime.native_bf16_cpu() and not Segmenter(SALModel(wide), "cpu").amp
    monkeypatch.setenv(runtime.ENV_BF16, "1")
    assert runtime.native_bf16_cpu() and Segmenter(_tiny_model(), "cpu").amp
    assert not Segmenter(_tiny_model(), "cpu", amp=False).amp


def test_node_thread_policy_leaves_a_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.node_torch_threads(cores=4) == 3
    assert runtime.node_torch_threads(cores=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.node_torch_threads(cores=4) == torch.get_num_threads()


def test_bf16_labels_match_float32_on_the_real_scan_except_boundary_points(scan, monkeypatch):
    """The full scan through the Segmenter twice: float32 with full-resolution decoder masks (the path before
    issue 17) and the fast path in bf16 (forced, so CPUs without native bf16 check the same numerics)."""
    monkeypatch.setenv(runtime.ENV_BF16, "1")
    model = _tiny_model()
    # thing classes only: every query that wins points is an instance, so instances show which query won
    embeddings = semantickitti_embeddings()
    whole = SegmenterConfig(score_threshold=0.0)  # every point keeps its best query: compare all of them
    fast = Segmenter(model, "cpu", embeddings, whole)
    reference = Segmenter(model, "cpu", embeddings, whole, amp=False)
    assert fast.amp and not reference.amp
    pts, inten = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    with monkeypatch.context() as full_masks:
        full_masks.setattr(model.decoder, "pooled_masks", False)
        ref = reference.segment(pts, inten)
    out = fast.segment(pts, inten)
    assert len(pts) == 124_668 and (ref.label > 0).mean() > 0.9  # a labelled scan, not an empty comparison
    segments = np.unique(np.stack([ref.label, ref.instance]), axis=1).shape[1]
    assert segments >= 3, f"only {segments} segments"  # the seeded random tiny model: 3 queries win points
    differs = np.flatnonzero((ref.label != out.label) | (ref.instance != out.instance))
    assert len(differs) <= MAX_LABEL_DIFF_SHARE * len(pts), f"{len(differs)} labels or instances differ"
    # A label changes only on a decision boundary: where two queries tie to within bf16 rounding, so the bf16
    # path's winner scores what float32's winner scored (measured: <= 0.001).
    assert np.abs(ref.score[differs] - out.score[differs]).max(initial=0.0) <= MAX_TIE_SCORE_GAP
    same = ref.label == out.label
    assert np.abs(ref.score[same] - out.score[same]).max() <= MAX_TIE_SCORE_GAP


def test_bench_codec_times_sensor_msgs_py_side_by_side(capsys):
    """`sal-ros bench codec` with rclpy: create_cloud and read_points on the same clouds, checked equal to ours
    before timing, with the ratios and the machine's facts in the JSON."""
    import argparse
    import json

    from conftest import require_rclpy
    from sal_ros.bench import codec

    require_rclpy()
    parser = argparse.ArgumentParser()
    codec.add_arguments(parser)
    args = parser.parse_args(["--points", "5000", "--repeats", "3", "--reference-repeats", "1", "--backend", "rclpy"])
    assert codec.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    ros = out["sensor_msgs_py"]
    ms = ros["alternating_median_ms"]
    assert set(ms) == {"encode", "encode_reused_buffer", "create_cloud_packed", "create_cloud_from_columns", "decode",
                       "read_points"}
    assert ros["encode_reused_buffer_vs_create_cloud"] == pytest.approx(
        ms["encode_reused_buffer"] / ms["create_cloud_packed"], rel=0.05, abs=0.01)
    assert all(v > 0 for v in ms.values())
    assert ros["encode_vs_create_cloud"] == pytest.approx(ms["encode"] / ms["create_cloud_packed"], rel=0.05, abs=0.01)
    assert ros["encode_vs_create_cloud_from_columns"] == pytest.approx(
        ms["encode"] / ms["create_cloud_from_columns"], rel=0.05, abs=0.01)
    env = out["environment"]
    assert env["cpu_model"] and len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3


def _bench_gpu(*args, env=None) -> tuple[dict, str]:
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "bench", "gpu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_bench_gpu_without_cuda_says_what_it_skipped():
    out, err = _bench_gpu(env={"CUDA_VISIBLE_DEVICES": ""})  # as on a machine without a GPU
    assert out["cuda"] is False and "CUDA is not available" in out["skipped"] and "CUDA is not available" in err
    assert not any(section in out for section in ("parity", "latency", "node", "train_step"))
    assert out["environment"]["torch"] and out["threads"] >= 1


@pytest.mark.slow
def test_bench_gpu_sections_run_on_cpu():
    """Every section of the GPU run on the CPU at a small size: the code a GPU day runs, minus CUDA."""
    scan = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    out, _ = _bench_gpu("--device", "cpu", "--scan", str(scan), "--points", "5000", "--presets", "tiny",
                        "--parity-preset", "tiny", "--train-preset", "tiny", "--repeats", "2", "--replay-frames", "3",
                        "--threads", "1", env={"OMP_NUM_THREADS": "1"})
    assert out["parity"]["fp32"]["label_differs_share"] == 0.0  # CPU against CPU: the same numbers
    tiny = out["latency"]["tiny"]["fp32"]
    assert tiny["total_ms"]["n"] == 2 and tiny["total_ms"]["p99"] >= tiny["total_ms"]["p50"] > 0
    assert out["latency"]["tiny"]["torch_compile"]["used"] is False
    node = out["node"]
    assert node["clouds_sent"] == 3 and node["clouds_answered"] >= 1 and node["end_to_end_ms"]["p50"] > 0
    step = out["train_step"]
    assert step["instances"] > 0 and step["step_ms"] > 0 and np.isfinite(step["loss"])
    assert "CUDA graph" in out["cuda_graphs"]


def test_bench_node_records_its_threads_and_machine(semantickitti_dir):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "bench", "node", "--repeats", "2", "--points", "20000",
                           "--typed-outputs", "off", "--threads", "1",
                           "--data", str(semantickitti_dir / "sequences" / "00")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    env = out["environment"]
    assert out["threads"] == env["torch_threads"] == 1 and env["cpu_model"] and env["torch"]
    assert len(env["load_average_start"]) == 3 and out["overhead_ms"] > 0
    # CPU time beside wall time, and the fresh-buffer encode as the same run's reference for the reused one
    assert out["overhead_cpu_ms"] == pytest.approx(sum(out["cpu_median_ms"].values()), abs=0.01)
    parts = out["publish_parts_cpu_median_ms"]
    assert out["encode_reuse_speedup_cpu"] == pytest.approx(
        parts["encode_cloud_fresh_buffer"] / parts["encode_cloud"], rel=0.05, abs=0.01)


def test_bench_spconv_reference_is_optional_and_says_why(scan, tmp_path):
    """spconv is a measurement reference only: without it in the given folder the bench says so and goes on."""
    import sys

    from sal_ros.bench.sparse_conv import bench_spconv

    before = list(sys.path)
    try:
        out = bench_spconv(scan[:2000], tmp_path, 0.05, 8, 1)
    finally:
        sys.path[:] = before
    assert "spconv does not import" in out["error"] and str(tmp_path) in out["error"]


def test_pooled_masks_under_autocast_with_float32_mask_features():
    """A backbone that hands float32 features to the decoder under autocast (WaffleIron does): the block logits are
    bf16, the pooling follows them, and the attention mask matches float32 except at near-zero logits."""
    from sal_ros.model.mask_pooling import allowed_pooled

    gen = torch.Generator().manual_seed(0)
    mask_feats, emb = torch.randn(10_000, 16, generator=gen), torch.randn(8, 16, generator=gen)
    parents = torch.randint(0, 500, (10_000,), generator=gen)
    exact = allowed_pooled(emb, mask_feats, parents, 500)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = allowed_pooled(emb, mask_feats, parents, 500)
    assert mixed.shape == exact.shape == (8, 500) and mixed.dtype == torch.bfloat16
    assert ((mixed == 0) != (exact == 0)).float().mean() < 0.01
