"""Semantic pseudo-labels (issue 16): score sources, lifting + fusion, confidence filtering, runs and evaluation,
on the real SemanticKITTI frames of ../shared/data."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sal_ros.core.errors import SensorDataError
from sal_ros.data.pseudolabels import CAMERA_DISAGREE, FRAME_DISAGREE, SemanticLabels, load_semantic
from sal_ros.pseudolabel.score_sources import render_point_values
from sal_ros.pseudolabel.semantic_labeler import CameraScores, FilterConfig, apply_frame_agreement, fuse_scores, top2


def sal_ros(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", *map(str, args)], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"sal-ros {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------------- constructed data
def test_fusion_means_probabilities_and_flags_disagreeing_cameras():
    a = CameraScores("a", np.array([0, 1]), np.array([[0.9, 0.1], [0.6, 0.4]], np.float32), np.array([0, 1, 2]))
    b = CameraScores("b", np.array([1, 2]), np.array([[0.2, 0.8], [0.3, 0.7]], np.float32), np.array([1, 2]))
    probs, seen, disagree, in_frustum = fuse_scores([a, b], 4, 2)
    np.testing.assert_allclose(probs[1], [0.4, 0.6])
    assert seen.tolist() == [True, True, True, False]
    assert disagree.tolist() == [False, True, False, False]
    assert in_frustum.tolist() == [True, True, True, False]
    cls, conf, margin = top2(probs[:3])
    assert cls.tolist() == [0, 1, 1]
    np.testing.assert_allclose(margin, [0.8, 0.2, 0.4], atol=1e-6)


def _labels(raw):
    raw = np.asarray(raw, np.uint16)
    n = raw.size
    return SemanticLabels(raw.copy(), raw, np.ones(n), np.ones(n), np.zeros(n), raw > 0, {"class_names": ["a", "b"]})


def test_frame_agreement_drops_points_the_neighbours_contradict():
    pts = np.array([[0, 0, 0], [5, 0, 0], [10, 0, 0]], np.float32)
    labels = _labels([1, 1, 2])
    # neighbour 1 agrees at point 0, contradicts point 1, sees nothing near point 2; neighbour 2 contradicts 0
    n1 = (pts[:2] + 0.05, np.array([1, 2], np.uint16))
    n2 = (pts[:1] - 0.05, np.array([2], np.uint16))
    apply_frame_agreement(labels, pts, [n1, n2], radius=0.2, min_agree=0.5)
    assert labels.label.tolist() == [1, 0, 2]  # 1 of 2 votes agree at point 0 (kept at 0.5), 0 of 1 at point 1
    assert labels.filtered.tolist() == [0, FRAME_DISAGREE, 0]


# ---------------------------------------------------------------------------------------------- oracle study
@pytest.fixture(scope="module")
def oracle_study(semantickitti_dir_module):
    from sal_ros.pseudolabel.semantic_eval import oracle_study

    return oracle_study(semantickitti_dir_module, noise=1.0)


@pytest.fixture(scope="module")
def semantickitti_dir_module():
    from conftest import require_data

    return require_data("semantickitti", "sequences", "00")


def test_filtering_raises_the_accuracy_of_kept_points(oracle_study):
    rows = {r["name"]: r for r in oracle_study["rows"]}
    base = rows["none"]
    assert base["kept_share"] == 100.0 and 40 < base["acc_all"] < 75  # the noise makes a mediocre teacher
    for name in ("score >= 0.3", "margin >= 0.1", "frames (1 each side)", "margin >= 0.1 + frames"):
        r = rows[name]
        assert r["acc_kept"] > base["acc_all"] + 10, (name, r)  # filtering keeps the right labels ...
        assert r["acc_filtered"] < base["acc_all"], (name, r)  # ... and drops the wrong ones
        assert 20 < r["kept_share"] < 80, (name, r)
    assert rows["margin >= 0.2"]["acc_kept"] > rows["margin >= 0.1"]["acc_kept"]  # stricter: cleaner, fewer
    assert rows["margin >= 0.2"]["kept_share"] < rows["margin >= 0.1"]["kept_share"]


def test_occlusion_test_removes_points_that_show_the_wrong_object(oracle_study):
    o = oracle_study["occlusion"]
    assert o["hidden"] > 200  # points behind nearer objects, on two real scans
    assert o["hidden_wrong_share"] > 80  # naive lifting would give most of them the class of the object in front
    assert o["visible_wrong_share"] < 10


# ---------------------------------------------------------------------------------------------- command line
def test_cli_run_resume_refusal_and_eval(tmp_path, semantickitti_dir):
    out = tmp_path / "sem"
    args = ["pseudolabel", semantickitti_dir, "--semantic", "--scores", "oracle", "--oracle-noise", "1.0",
            "--min-margin", "0.1", "--frame-agreement", "1", "--out", out, "--no-progress"]
    first = json.loads(sal_ros(*args).stdout.strip().splitlines()[-1])
    assert (first["done"], first["failed"]) == (2, {})
    again = json.loads(sal_ros(*args).stdout.strip().splitlines()[-1])
    assert (again["skipped"], again["done"]) == (2, 0)  # resumed: nothing redone
    other = sal_ros(*[a if a != "0.1" else "0.2" for a in args], check=False)
    assert other.returncode == 1 and "another configuration" in other.stderr
    pl = load_semantic(out / "00_000000.npz")
    assert pl.class_names[0] == "car" and pl.meta["frame_votes_from"] == 1
    assert ((pl.filtered > 0) == (pl.seen & (pl.label == 0))).all()
    assert 0.2 < pl.kept_share < 0.6
    ev = sal_ros("eval", "pseudolabels", semantickitti_dir, "--semantic", "--pseudolabels", out, "--out",
                 tmp_path / "ev")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    row = metrics["rows"][0]
    assert row["acc_kept"] > row["acc_all"] + 10 and row["acc_filtered"] < row["acc_all"]
    assert set(row["iou_kept"]) >= {"car", "road", "building"} and (tmp_path / "ev" / "semantic_pseudolabels.png").stat().st_size
    assert "acc kept" in ev.stdout


def _write_folder_maps(root, source_dir):
    """Noise-free class maps of the ground truth as (H, W) class ids: what a closed-set segmenter would save."""
    from sal_ros.data.labels import get_label_set
    from sal_ros.data.sources import FrameSource

    ls = get_label_set("semantickitti")
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(ls.class_names) + "\n")
    src = FrameSource(source_dir)
    for key in src.keys():
        frame = src.load(key)
        cls, _ = ls.split(frame.gt_labels)
        (root / key).mkdir(parents=True)
        for name, view in frame.cameras.items():
            np.save(root / key / f"{name}.npy", render_point_values(frame.points, view, cls).astype(np.uint8))
    return src


def test_folder_scores_route_and_a_bad_map_fails_its_frame_only(tmp_path, semantickitti_dir):
    src = _write_folder_maps(tmp_path / "maps", semantickitti_dir)
    bad = tmp_path / "maps" / "00_000001" / "image_0.npy"
    np.save(bad, np.zeros((3, 4, 5), np.float32))  # wrong class count
    out = tmp_path / "sem"
    run = sal_ros("pseudolabel", semantickitti_dir, "--semantic", "--scores", "folder", "--score-folder",
                  tmp_path / "maps", "--out", out, "--no-progress", check=False)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 1 and summary["done"] == 1 and list(summary["failed"]) == ["00_000001"]
    assert "shape (3, 4, 5)" in summary["failed"]["00_000001"]
    pl = load_semantic(out / "00_000000.npz")
    frame = src.load("00_000000")
    from sal_ros.data.labels import get_label_set

    gt, _ = get_label_set("semantickitti").split(frame.gt_labels)
    scored = pl.seen & (gt > 0)
    assert (pl.label[scored] == gt[scored]).mean() > 0.95  # noise-free maps + occlusion test: nearly exact


def test_torchscript_route(tmp_path, semantickitti_dir):
    import torch

    class Fixed(torch.nn.Module):  # class 2 everywhere, at a quarter of the resolution
        def forward(self, x):
            logits = torch.zeros(1, 3, x.shape[2] // 4, x.shape[3] // 4)
            logits[:, 1] = 5.0
            return logits

    path = tmp_path / "seg.pt"
    torch.jit.script(Fixed()).save(str(path))
    (tmp_path / "seg.pt.classes.txt").write_text("road\ncar\nperson\n")
    out = tmp_path / "sem"
    sal_ros("pseudolabel", semantickitti_dir, "--semantic", "--scores", "torchscript", "--score-model", path,
            "--min-score", "0.9", "--out", out, "--no-progress", "--max-frames", "1")
    pl = load_semantic(out / "00_000000.npz")
    assert pl.class_names == ["road", "car", "person"]
    assert set(np.unique(pl.label[pl.seen]).tolist()) == {2} and pl.seen.sum() > 10000
    assert float(pl.confidence[pl.seen].min()) > 0.9


def test_clip_dense_route_runs_with_random_weights(tmp_path, semantickitti_dir):
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.score_sources import ClipDenseScores
    from sal_ros.pseudolabel.semantic_labeler import SemanticConfig, SemanticLabeler

    scores = ClipDenseScores(["car", "road", "tree"], clip_model="sal-tiny-text")
    frame = FrameSource(semantickitti_dir).load("00_000000")
    m = scores.scores(frame, frame.cameras["image_0"])
    h, w = scores.encoder.grid_for(*frame.cameras["image_0"].image.shape[:2])
    assert m.shape == (3, h, w) and np.allclose(m.sum(0), 1, atol=1e-5)
    labels = SemanticLabeler(SemanticConfig(scores="clip"), score_source=scores).label_frame(frame)
    assert labels.class_names == ["car", "road", "tree"] and labels.seen.sum() > 10000
    assert set(np.unique(labels.raw_label[labels.seen]).tolist()) <= {1, 2, 3}


def test_camera_agreement_filter_on_the_six_nuscenes_cameras(nuscenes_dir):
    """Two cameras that overlap and disagree: with --camera-agreement their shared points are ignored."""
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.semantic_labeler import label_from_scores

    frame = FrameSource(nuscenes_dir).load(FrameSource(nuscenes_dir).keys()[0])
    maps = {name: np.stack([np.full((4, 4), 0.9 if i % 2 else 0.1), np.full((4, 4), 0.1 if i % 2 else 0.9)])
            for i, name in enumerate(sorted(frame.cameras))}  # neighbours in sorted order say different classes
    off = label_from_scores(frame, maps, ["a", "b"])
    on = label_from_scores(frame, maps, ["a", "b"], filt=FilterConfig(camera_agreement=True))
    dropped = (on.filtered & CAMERA_DISAGREE) > 0
    assert dropped.sum() > 0 and (off.label[dropped] > 0).all() and (on.label[dropped] == 0).all()
    assert (on.label[~dropped] == off.label[~dropped]).all()


def test_bad_files_are_named_errors(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, label=np.zeros(3, np.uint16))
    with pytest.raises(SensorDataError, match="not a semantic pseudo-label file"):
        load_semantic(path)


@pytest.mark.slow
def test_ray_backend_writes_the_local_backends_labels(tmp_path, semantickitti_dir):
    """Ray workers (a private loopback instance) run the semantic labeler like local workers: same files."""
    from sal_ros.pseudolabel.engine import run
    from sal_ros.pseudolabel.semantic_labeler import SemanticConfig

    cfg = SemanticConfig(scores="oracle", score_options={"noise": 1.0}, filter=FilterConfig(min_margin=0.1,
                                                                                            frame_agreement=1))
    local = run(semantickitti_dir, cfg, tmp_path / "local", progress=False)
    ray = run(semantickitti_dir, cfg, tmp_path / "ray", backend="ray", workers=1, progress=False)
    assert (local.done, ray.done, ray.workers, ray.failed) == (2, 2, 1, {})
    for key in ("00_000000", "00_000001"):
        a, b = load_semantic(tmp_path / "local" / f"{key}.npz"), load_semantic(tmp_path / "ray" / f"{key}.npz")
        assert np.array_equal(a.label, b.label) and np.array_equal(a.filtered, b.filtered)


def test_bad_filter_settings_are_refused_by_name(tmp_path, semantickitti_dir):
    with pytest.raises(ValueError, match="min_margin"):
        FilterConfig(min_margin=1.5)
    proc = sal_ros("pseudolabel", semantickitti_dir, "--semantic", "--scores", "oracle", "--frame-agreement", "-1",
                   "--out", tmp_path / "x", check=False)
    assert proc.returncode == 1 and "frame_agreement must be >= 0" in proc.stderr
