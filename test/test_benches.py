"""`sal-ros bench model` and `bench lift` as users run them, at sizes that take seconds: valid JSON with every
figure the performance table quotes, and the checks the benches make on themselves."""
import json
import subprocess
import sys

from conftest import REPO, require_data


def _bench(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_model_stages_and_sparse_vs_dense_conv():
    scan = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    out = _bench("model", "--scan", str(scan), "--presets", "tiny,realtime", "--points", "20000", "--repeats", "1",
                 "--device", "cpu", "--threads", "1")
    row = out["models"]["cpu"]["tiny"]
    stages = row["median_ms"]
    assert {"voxelize", "backbone", "decoder", "postprocess", "total", "total_cpu"} <= set(stages)
    # every preset over the reference presets timed in the same run, wall and thread CPU time
    fast = out["models"]["cpu"]["realtime"]["median_ms"]
    ratios = out["ratios"]["cpu"]["realtime"]
    assert set(ratios) == {"total_vs_tiny", "total_cpu_vs_tiny"} and "tiny" not in out["ratios"]["cpu"]
    assert abs(ratios["total_cpu_vs_tiny"] - fast["total_cpu"] / stages["total_cpu"]) < 0.002
    assert all(v > 0 for v in stages.values()) and out["points"] == 20000
    # the float32 reference path timed in the same run, the ratio, and how far the labels moved
    assert set(row["reference_fp32_median_ms"]) == set(stages)
    assert abs(row["speedup_vs_fp32"] - row["reference_fp32_median_ms"]["total"] / stages["total"]) < 0.02
    assert 0 <= row["parity"]["label_differs_share"] <= 0.01
    env = out["environment"]
    assert env["torch_threads"] == out["threads"] == 1 and env["cpu_model"] and env["torch"]
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
    strided = out["strided_conv"]["cpu"]
    assert strided["maps_identical"] and strided["voxels_out"] < strided["voxels_in"] and strided["conv_ms"] > 0
    conv = out["conv"]["cpu"]
    assert conv["active_voxels"] > 0 and conv["sparse_ms"] > 0 and conv["dense_ms"] > 0
    assert conv["max_abs_diff"] < 1e-4  # same weights, same layer: the sparse conv is the dense one


def test_instance_parity_compares_partitions_not_ids():
    import numpy as np

    from sal_ros.bench.model import instance_partition_differs

    reference = np.array([0, 1, 1, 2, 2, 2, 3, 3, 0, 0])
    renumbered = np.array([0, 1, 1, 3, 3, 3, 2, 2, 0, 0])  # instance 1 of one run missing -> later ids shift
    assert instance_partition_differs(reference, renumbered) == 0.0 and (reference != renumbered).mean() == 0.5
    merged = np.array([0, 1, 1, 1, 1, 1, 3, 3, 0, 0])  # instances 1 and 2 merged: it is matched to the larger (2),
    assert abs(instance_partition_differs(reference, merged) - 0.2) < 1e-12  # so instance 1's 2 points differ
    unassigned = np.array([5, 1, 1, 2, 2, 2, 3, 3, 0, 0])  # a stuff point became an instance of its own
    assert abs(instance_partition_differs(reference, unassigned) - 0.1) < 1e-12


def test_bench_model_times_candidates_given_as_preset_overrides():
    import pytest

    from sal_ros.bench.model import preset_config
    from sal_ros.model.config import ModelConfig, split_specs

    config = preset_config("tiny:voxel_size=0.4:num_queries=16")
    assert config == ModelConfig.preset("tiny", voxel_size=0.4, num_queries=16)
    assert preset_config("realtime", voxel_size=0.5).input.voxel_size == 0.5  # --voxel-size still applies
    for bad in ("tiny:voxel_size", "tiny:no_such_field=1", "no_such_preset"):
        with pytest.raises((TypeError, ValueError)):
            preset_config(bad)
    # a list of specs: commas inside brackets belong to a spec's value
    specs = split_specs("tiny, realtime:widths=[16,24,32,48]:voxel_size=0.6,minkunet34,")
    assert specs == ["tiny", "realtime:widths=[16,24,32,48]:voxel_size=0.6", "minkunet34"]
    assert preset_config(specs[1]).minkunet.widths == (16, 24, 32, 48)
    for bad in ("tiny,realtime:widths=[16,24", "tiny]", "realtime:widths=(16,24))"):
        with pytest.raises(ValueError, match="unbalanced"):
            split_specs(bad)


def test_bench_model_says_when_the_conv_crop_is_empty():
    scan = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    out = _bench("model", "--scan", str(scan), "--presets", "tiny", "--points", "2000", "--repeats", "1",
                 "--device", "cpu", "--conv-crop", "0.2", "0.2", "0.2")
    assert "enlarge --conv-crop" in out["conv"]["cpu"]["error"]
    assert out["models"]["cpu"]["tiny"]["median_ms"]["total"] > 0  # the model figures are still there


def test_bench_lift_six_cameras():
    data = require_data("nuscenes_mini")
    out = _bench("lift", "--data", str(data), "--skip-models", "--repeats", "1")
    assert out["cameras"] == 6 and out["points"] > 0 and out["instances"] > 0
    assert out["multi_camera_instances"] > 0  # fused across camera borders
    for key in ("lift_fuse_occlusion", "lift_fuse_naive"):
        assert out[key]["total_ms"] > 0
    # The verdict is reported, not asserted: a test holds on any machine. (It restated the code before.)
    assert isinstance(out["meets_goal"], bool) and out["goal_lift_fuse_ms"] > 0


def test_bench_vocabulary_times_cold_and_warm_embeddings():
    out = _bench("vocabulary", "--model", "sal-tiny-text", "--sizes", "4,8", "--repeats", "1")
    assert out["threads"] == 1 and out["environment"]["cpu_model"] and "load_average_end" in out["environment"]
    small, large = out["results"]
    assert (small["prompts"], small["texts"], large["prompts"]) == (4, 24, 8)
    for result in (small, large):
        for stage in ("parse", "cold", "warm_memory", "warm_disk", "open_with_disk_cache"):
            assert result[stage]["wall_ms"] >= 0 and result[stage]["cpu_ms"] >= 0, (stage, result)
    assert small["max_abs_difference_to_reference"] < 1e-5 and small["speedup_cold_vs_reference"] > 0
    assert "reference_full_context" not in large  # only the smallest size unless --reference-all
    assert set(out["goals"]) == {"cold_4_s"} and isinstance(out["goals"]["cold_4_s"]["met"], bool)
