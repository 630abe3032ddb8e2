"""The engine on real frames: nuScenes 6 cameras fused (objects across camera seams become one instance), whole
pipeline with SLIC + tiny CLIP, resumable runs (a killed CLI run redoes nothing and leaves no partial file), runs
that share an output folder (a run removes only stale temporary files), Ray backend on a private instance
(test_pseudolabel_ray.py: on a running cluster)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, kitti_sequence, ray_loopback, require_data

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import TMP_PREFIX, atomic_open
from sal_ros.data.pseudolabels import load_pseudolabels
from sal_ros.data.sources import FrameSource
from sal_ros.pseudolabel.engine import STALE_TEMP_S, EngineConfig, PseudoLabeler, label_from_masks, run
from sal_ros.pseudolabel.evaluate import oracle_masks
from sal_ros.core.camera import project_view
from sal_ros.pseudolabel.lifting import LIDAR_SPACING_DEG, LiftConfig

FUSION_IOU = 0.3
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "sal-tiny-engine-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def nuscenes_frame():
    source = FrameSource(require_data("nuscenes_mini"))
    return source.load(source.keys()[0])


def _box_members(points, box):
    c, (l, w, h), yaw = np.array(box["center"]), box["size_lwh"], box["yaw"]
    d = points - c
    cy, sy = np.cos(yaw), np.sin(yaw)
    x, y = d[:, 0] * cy + d[:, 1] * sy, -d[:, 0] * sy + d[:, 1] * cy
    return (np.abs(x) <= l / 2) & (np.abs(y) <= w / 2) & (np.abs(d[:, 2]) <= h / 2)


NUSCENES_LIFT = LiftConfig(lidar_spacing_deg=LIDAR_SPACING_DEG["nuscenes"])


@pytest.mark.parametrize("lift", [LiftConfig(occlusion=False), NUSCENES_LIFT], ids=["naive", "occlusion"])
def test_nuscenes_objects_across_cameras_become_one_instance(nuscenes_frame, lift):
    """Annotated boxes rendered as masks into all 6 cameras, lifted and fused: a box seen by two cameras is one
    pseudo-instance whose camera bits name both, with and without the occlusion test."""
    frame = nuscenes_frame
    boxes = json.loads((require_data("nuscenes_mini") / "boxes.json").read_text())["boxes"]
    segment = np.zeros(frame.num_points, np.int64)
    for k, box in enumerate(boxes, start=1):
        segment[_box_members(frame.points, box) & (segment == 0)] = k
    masks = {name: oracle_masks(frame, view, segment, splat=(3, 6)) for name, view in frame.cameras.items()}
    in_cam = {name: np.zeros(frame.num_points, bool) for name in frame.cameras}
    for name, view in frame.cameras.items():
        in_cam[name][project_view(frame.points, view, 1.0)[0]] = True
    pl = label_from_masks(frame, masks, None, lift, fusion_iou=FUSION_IOU, refine=None, min_points=1)
    assert pl.camera_names == list(frame.cameras) and len(pl.camera_names) == 6
    assert {c for i in range(1, pl.num_instances + 1) for c in pl.instance_cameras(i)} == set(frame.cameras)
    spanning = 0
    for k in range(1, len(boxes) + 1):
        members = segment == k
        seen_by = [n for n in frame.cameras if (in_cam[n] & members).sum() >= 5]
        if len(seen_by) < 2:
            continue
        spanning += 1
        ids, counts = np.unique(pl.instance[members & pl.in_frustum], return_counts=True)
        top = ids[np.argmax(counts)]
        assert top > 0 and counts.max() >= 0.8 * counts.sum(), f"box {k} split over instances {ids} {counts}"
        assert set(seen_by) <= set(pl.instance_cameras(int(top))), f"box {k}: {seen_by} vs {pl.instance_cameras(top)}"
    assert spanning >= 1  # the sample frame has objects on camera seams


def test_full_pipeline_six_cameras(nuscenes_frame, tiny_clip, tmp_path):
    config = EngineConfig(masks="slic", mask_options={"n_segments": 40}, clip_model="sal-tiny-engine-test",
                          token_options={"model_config": str(tiny_clip)})
    labeler = PseudoLabeler(config)
    pl = labeler.label_frame(nuscenes_frame)
    assert pl.num_points == nuscenes_frame.num_points and pl.tokens.shape == (pl.num_instances, 32)
    assert pl.num_instances > 20
    np.testing.assert_allclose(np.linalg.norm(pl.tokens.astype(np.float32), axis=1), 1, atol=2e-3)
    assert 0.4 < pl.in_frustum.mean() < 0.8  # six cameras see roughly half of a 360-degree sweep
    assert pl.coverage > 0.5
    bits = np.bitwise_or.reduce(pl.cameras)
    assert bits == 0b111111  # every camera contributed
    counts = np.bincount(pl.instance)[1:]
    assert counts.min() >= config.min_points
    assert pl.meta["mask_source"]["source"] == "slic" and pl.meta["clip"]["clip_model"] == "sal-tiny-engine-test"
    frame = nuscenes_frame
    empty = type(frame)(frame.stamp_ns, frame.frame_id, frame.points, key="x")
    with pytest.raises(SensorDataError, match="no camera"):
        labeler.label_frame(empty)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "sal_ros.cli", "pseudolabel", *map(str, args)]


def test_killed_run_resumes_without_redoing_frames(tmp_path, tiny_clip):
    n = 8
    seq = kitti_sequence(tmp_path, n)
    out = tmp_path / "pl"
    args = _cli(seq, "--masks", "slic", "--slic-segments", 60, "--clip-model", "sal-tiny-engine-test",
                "--clip-model-config", tiny_clip, "--random-weights", "--out", out, "--no-progress", "--workers", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.npz"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)  # parent and its workers, mid-run, no clean-up
    finally:
        proc.wait(timeout=30)
    finished = {p.name: p.stat() for p in out.glob("*.npz")}
    assert 2 <= len(finished) < n
    for name in finished:  # a finished name is always a whole file
        load_pseudolabels(out / name)
    # Temporary files of the run just killed are fresh: kept, as another node's live writer would be.
    fresh = {p.name for p in out.iterdir() if p.name.startswith(TMP_PREFIX)}
    stale = _stale_temp_file(out, "00_000007")  # as a run killed mid-write long ago leaves
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(finished) and summary["done"] == n - len(finished)
    assert not stale.exists()
    assert {p.name for p in out.iterdir()} - fresh == {f"00_{i:06d}.npz" for i in range(n)}  # no partial files
    for name, st in finished.items():  # untouched: same inode, same modification time
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    frames = FrameSource(seq)
    for key in frames.keys():
        pl = load_pseudolabels(out / f"{key}.npz", frames.load(key).num_points)
        assert pl.num_instances > 0 and pl.tokens.shape[1] == 32


def _stale_temp_file(out: Path, key: str) -> Path:
    """A temporary file (atomic_open's naming) whose writer stopped twice the staleness limit ago."""
    path = out / f"{TMP_PREFIX}{key}.npz.0123456789ab"
    path.write_bytes(b"half a file")
    then = time.time() - 2 * STALE_TEMP_S
    os.utime(path, (then, then))
    return path


def test_a_run_removes_only_stale_temp_files(tmp_path):
    """Another run (or node) writing into the same folder keeps its temporary file through this run's start and
    end clean-ups, so its write completes; a file untouched for longer than STALE_TEMP_S is removed."""
    seq = kitti_sequence(tmp_path, 1)
    out = tmp_path / "pl"
    out.mkdir()
    stale = _stale_temp_file(out, "00_000005")
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False, refine=None)
    with atomic_open(out / "00_000009.npz") as other:  # the other writer, mid-file
        other.write(b"first half ")
        summary = run(seq, cfg, out, progress=False)
        other.write(b"second half")
    assert (summary.done, summary.failed) == (1, {})
    assert (out / "00_000009.npz").read_bytes() == b"first half second half"
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["00_000000.npz", "00_000009.npz"]


def test_rerun_with_other_config_is_refused(tmp_path):
    seq = kitti_sequence(tmp_path, 1)
    out = tmp_path / "pl"
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False)
    s = run(seq, cfg, out, progress=False)
    assert (s.total, s.done, s.skipped) == (1, 1, 0)
    assert run(seq, cfg, out, progress=False).skipped == 1
    other = EngineConfig(masks="slic", mask_options={"n_segments": 31}, tokens=False)
    with pytest.raises(SensorDataError, match="another configuration"):
        run(seq, other, out, progress=False)
    assert run(seq, other, out, overwrite=True, progress=False).done == 1
    with pytest.raises(ValueError, match="--out"):
        run(seq, cfg, None, progress=False)  # raw dataset folders are never written into


def test_ray_backend(tmp_path, monkeypatch):
    ray_loopback(monkeypatch)
    seq = kitti_sequence(tmp_path, 2)
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False, refine=None)
    s = run(seq, cfg, tmp_path / "pl", workers=2, backend="ray", progress=False)
    assert (s.done, s.failed, s.workers) == (2, {}, 2)
    local = tmp_path / "local"
    run(seq, cfg, local, progress=False)
    for key in ("00_000000", "00_000001"):  # same labels whichever backend ran them
        a, b = load_pseudolabels(tmp_path / "pl" / f"{key}.npz"), load_pseudolabels(local / f"{key}.npz")
        np.testing.assert_array_equal(a.instance, b.instance)


def test_bag_source_labels_the_same_frames_as_the_dataset_folder(tmp_path):
    # A converted (or robot-recorded) rosbag2 is labeled straight from the bag, through the node's synchronizer;
    # bag frames are keyed by cloud stamp, and workers stream the bag without loading it whole.
    from sal_ros.data.convert import convert

    seq = require_data("semantickitti", "sequences", "00")
    bag = tmp_path / "bag"
    convert(seq, bag, progress=False)
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False)
    from_folder = run(seq, cfg, tmp_path / "pl_folder", progress=False)
    from_bag = run(bag, cfg, tmp_path / "pl_bag", progress=False)
    in_workers = run(bag, cfg, tmp_path / "pl_workers", workers=2, progress=False)
    assert from_folder.done == from_bag.done == in_workers.done == 2 and not from_bag.failed
    folder_keys, bag_keys = FrameSource(seq).keys(), FrameSource(bag).keys()
    assert len(bag_keys) == 2 and all(k.isdigit() for k in bag_keys)  # cloud stamps in ns
    for folder_key, bag_key in zip(folder_keys, bag_keys):
        a = load_pseudolabels(tmp_path / "pl_folder" / f"{folder_key}.npz")
        b = load_pseudolabels(tmp_path / "pl_bag" / f"{bag_key}.npz")
        c = load_pseudolabels(tmp_path / "pl_workers" / f"{bag_key}.npz")
        assert a.num_instances > 0
        assert np.array_equal(a.instance, b.instance) and np.array_equal(b.instance, c.instance)
    with pytest.raises(ValueError, match="--out"):
        run(bag, cfg, None, progress=False)  # a bag folder is never written into


def test_a_folder_that_is_no_source_is_refused_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("not frames")
    with pytest.raises(SensorDataError, match="not a dataset folder"):
        run(tmp_path, EngineConfig(masks="slic", tokens=False), tmp_path / "pl", progress=False)
