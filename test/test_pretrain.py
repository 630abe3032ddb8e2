"""Label-free pretraining (sal_ros.pretrain: ScaLR, Seal), the WaffleIron backbone, teachers, the teacher cache,
the linear probe and `train` starting from a pretrained backbone, on the real SemanticKITTI frames."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sal_ros.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seq():
    from conftest import require_data

    return require_data("semantickitti", "sequences", "00")


@pytest.fixture(scope="module")
def frame(seq):
    from sal_ros.data.datasets import load_semantickitti

    return load_semantickitti(seq, [0])[0]


def _config(tmp_path: Path, seq: Path, name: str, objective: str = "scalr", steps: int = 4, **extra) -> Path:
    cfg = {"out_dir": name, "seed": 3, "objective": objective, "device": "cpu",
           "model": {"preset": "waffleiron_tiny", "waffle_depth": 2, "waffle_width": 16},
           "sources": [{"frames": str(seq)}], "teacher": {"kind": "random", "dim": 16, "patch": 8},
           "cache_dir": "cache", "checkpoint_every": 2,
           "optim": {"steps": steps, "warmup_steps": 1, "batch_size": 1, "lr": 0.01}, **extra}
    if objective == "seal":
        cfg["superpixels"] = {"kind": "slic", "n_segments": 60}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(path: Path) -> dict:
    from sal_ros.model.pretrained import read_backbone

    payload = read_backbone(path)  # weights_only=True inside
    return {**{f"backbone.{k}": v for k, v in payload["backbone"].items()},
            **{f"head.{k}": v for k, v in payload["head"].items()}}


# ------------------------------------------------------------------------------------------------ WaffleIron
def test_waffleiron_full_scan_forward_backward(frame):
    from sal_ros.model.sal import ModelConfig, SALModel

    assert frame.num_points == 124_668
    torch.manual_seed(0)
    model = SALModel(ModelConfig.preset("waffleiron_tiny"))
    assert type(model.backbone).__name__ == "WaffleIron"
    layers = model(torch.from_numpy(frame.points), torch.from_numpy(frame.intensity))
    masks = layers[-1]["masks"][0]
    assert masks.shape == (model.config.decoder.num_queries, frame.num_points)
    sum(layer["masks"][0].float().mean() + layer["tokens"][0].sum() for layer in layers).backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith("spatial")) > 0


def test_waffleiron_mixes_points_through_the_grid():
    """A point's feature depends on other points sharing its 2D cell (spatial mix), not only on itself."""
    from sal_ros.model.backbone import build_backbone
    from sal_ros.model.config import ModelConfig
    from sal_ros.model.sal import SALModel

    cfg = ModelConfig.preset("waffleiron_tiny", waffle_depth=3)
    torch.manual_seed(0)
    net = build_backbone(cfg).eval()
    holder = type("H", (), {"config": cfg, "point_features": SALModel.point_features})()

    def feature_of_first(points):
        vin = SALModel.prepare(holder, torch.tensor(points), None)
        with torch.no_grad():
            return net(vin.voxels)[1].feats[vin.point_to_voxel[0][0]]

    a = feature_of_first([[5.0, 5.0, 0.0], [5.3, 5.2, 3.0], [30.0, -20.0, 1.0]])
    b = feature_of_first([[5.0, 5.0, 0.0], [5.3, 5.2, -3.0], [30.0, -20.0, 1.0]])  # same bird's-eye cell, moved in z
    far = feature_of_first([[5.0, 5.0, 0.0], [5.3, 5.2, 3.0], [31.0, -20.0, 1.0]])  # a point in no shared cell
    assert not torch.allclose(a, b)
    assert torch.allclose(a, far)


def test_neighbour_pairs_are_the_3x3x3_voxel_neighbourhood_per_scan():
    from sal_ros.model.waffleiron import neighbour_pairs

    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, -1, -1, -1]])
    i, j = neighbour_pairs(coords)
    got = sorted(zip(i.tolist(), j.tolist()))
    want = sorted((a, b) for a in range(6) for b in range(6)
                  if coords[a, 0] == coords[b, 0] and int((coords[a, 1:] - coords[b, 1:]).abs().max()) <= 1)
    assert got == want and (3, 1) not in got and (0, 5) in got


def test_pool_to_stride_is_the_mean_over_coarse_cells():
    from sal_ros.model.sparse import SparseTensor
    from sal_ros.model.waffleiron import pool_to_stride

    g = torch.Generator().manual_seed(0)
    c = torch.unique(torch.cat([torch.randint(0, 2, (500, 1), generator=g),
                                torch.randint(-40, 40, (500, 3), generator=g)], 1), dim=0)
    x = SparseTensor(torch.randn(len(c), 3, generator=g), c.int())
    pooled = pool_to_stride(x, 8)
    coarse = c.clone()
    coarse[:, 1:] = torch.div(coarse[:, 1:], 8, rounding_mode="floor") * 8
    cells, inverse = torch.unique(coarse, dim=0, return_inverse=True)  # sorted [b, x, y, z]
    assert pooled.stride == 8 and torch.equal(pooled.coords.long(), cells)
    mean = torch.zeros(len(cells), 3).index_add_(0, inverse, x.feats) / torch.bincount(inverse)[:, None]
    assert torch.allclose(pooled.feats, mean)


def test_waffleiron_checkpoint_records_the_family_and_the_segmenter_runs_it(tmp_path, frame):
    from sal_ros.model.checkpoint import load_checkpoint, save_checkpoint
    from sal_ros.model.sal import ModelConfig, SALModel
    from sal_ros.model.segmenter import Segmenter
    from sal_ros.model.text_encoder import tiny_text_encoder

    torch.manual_seed(0)
    model = SALModel(ModelConfig.preset("waffleiron_tiny")).eval()
    encoder = tiny_text_encoder()
    path = save_checkpoint(tmp_path / "wi.pt", model, text_encoder_identity=encoder)
    loaded, meta = load_checkpoint(path)
    assert meta["model_config"].backbone == "waffleiron" and type(loaded.backbone).__name__ == "WaffleIron"
    p = torch.randn(500, 3) * 10
    with torch.no_grad():
        assert torch.equal(model(p)[-1]["masks"][0], loaded(p)[-1]["masks"][0])
    # the node's path: Segmenter from the checkpoint file, on the full scan
    segmenter = Segmenter.from_files(path, ["car", "road", "building"], text_encoder=encoder)
    seg = segmenter.segment(frame.points, frame.intensity)
    assert len(seg.label) == frame.num_points and seg.label.max() <= 3 and "backbone" in seg.timings_ms
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="pointnet")


# ------------------------------------------------------------------------------------------------ teachers, cache
def test_oracle_teacher_renders_the_ground_truth_class(frame):
    from sal_ros.data.labels import semantickitti
    from sal_ros.pretrain.teachers import OracleTeacher
    from sal_ros.pseudolabel.lifting import point_pixels

    labels = semantickitti()
    teacher = OracleTeacher(labels.lut, labels.num_classes, stride=4)
    fmap = teacher.feature_map(frame, "image_0")
    assert fmap.feats.shape == (94, 311, 20) and set(np.unique(fmap.feats)) == {0.0, 1.0}
    px = point_pixels(frame.points, frame.cameras["image_0"])
    vis = px.visible
    cls = labels.lut[frame.gt_labels[px.index[vis]] & 0xFFFF]
    read = fmap.at(px.v[vis], px.u[vis]).argmax(1)
    assert (read == cls).mean() > 0.9  # a point reads its own class unless a nearer point shares its cell


def test_random_and_dinov2_teachers(frame, tmp_path):
    from safetensors.torch import save_file

    from sal_ros.pretrain.teachers import DinoV2Teacher, RandomTeacher

    a = RandomTeacher(dim=8, seed=1).feature_map(frame, "image_0")
    assert a.feats.shape == (376 // 8, 1241 // 8, 8)
    assert np.array_equal(a.feats, RandomTeacher(dim=8, seed=1).feature_map(frame, "image_0").feats)
    assert not np.array_equal(a.feats, RandomTeacher(dim=8, seed=2).feature_map(frame, "image_0").feats)

    t = DinoV2Teacher("vit_small_patch14_dinov2", short_side=56, seed=0)
    f = t.feature_map(frame, "image_0")
    assert f.feats.shape == (4, 13, 384) and t.identity["weights"] is None
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in t.net.state_dict().items()}, str(path))
    loaded = DinoV2Teacher("vit_small_patch14_dinov2", weights=str(path), short_side=56, seed=5)
    assert np.allclose(loaded.feature_map(frame, "image_0").feats, f.feats, atol=1e-5)
    meta_layout = tmp_path / "dinov2_vits14_pretrain.pth"  # Meta's release layout carries a mask_token
    torch.save({**t.net.state_dict(), "mask_token": torch.zeros(1, 384)}, meta_layout)
    loaded = DinoV2Teacher("vit_small_patch14_dinov2", weights=str(meta_layout), short_side=56, seed=5)
    assert np.allclose(loaded.feature_map(frame, "image_0").feats, f.feats, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        DinoV2Teacher("vit_small_patch14_dinov2", weights=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_clip_teacher_is_the_dense_maskclip_path(frame):
    from sal_ros.pretrain.teachers import ClipTeacher
    from sal_ros.pseudolabel.masks import Masks

    teacher = ClipTeacher("ViT-B-16", None, short_side=64)
    fmap = teacher.feature_map(frame, "image_0")
    h, w = teacher.encoder.grid_for(376, 1241)
    assert fmap.feats.shape == (h, w, 512)
    # the mean over all patches is MaskCLIP's dense token of a whole-image mask (same encoder, method "dense")
    whole = Masks(np.ones((1, 376, 1241), bool), np.ones(1, np.float32))
    token = teacher.encoder.encode(frame.cameras["image_0"].image, whole)[0]
    mean = fmap.feats.reshape(-1, 512).mean(0)
    assert np.allclose(mean / np.linalg.norm(mean), token, atol=1e-4)


def test_cache_is_written_once_and_redone_on_other_settings(seq, tmp_path):
    from sal_ros.data.datasets import semantickitti_poses
    from sal_ros.data.sources import FrameSource
    from sal_ros.pretrain.cache import build_cache, load_entry
    from sal_ros.pretrain.teachers import RandomTeacher
    from sal_ros.pseudolabel.masks import SlicMasks

    source = FrameSource(seq)
    keys = source.keys()
    poses = semantickitti_poses(seq)
    assert set(poses) == set(keys) and not np.allclose(poses[keys[0]], poses[keys[1]])
    teacher = RandomTeacher(dim=4)
    stats = build_cache(source, keys, tmp_path, teacher, {"t": 1}, SlicMasks(40), poses=poses, progress=False)
    assert stats == {"frames": 2, "computed": 2, "reused": 0}
    entry = load_entry(tmp_path / f"{keys[0]}.npz")
    cam = entry["cameras"][0]
    assert 15_000 < len(cam["index"]) < 19_500  # visible points of image_0 (~19.3k project into it)
    assert cam["fmap"].shape[1] == 4 and cam["cell"].max() < len(cam["fmap"])
    assert cam["segment"].shape == cam["index"].shape and cam["segfeats"].shape[0] > cam["segment"].max()
    assert np.allclose(entry["meta"]["pose"], poses[keys[0]])
    assert build_cache(source, keys, tmp_path, teacher, {"t": 1}, SlicMasks(40), progress=False)["computed"] == 0
    assert build_cache(source, keys, tmp_path, teacher, {"t": 2}, SlicMasks(40), progress=False)["computed"] == 2


def test_cache_covers_every_camera_of_a_nuscenes_frame(tmp_path):
    from conftest import require_data

    from sal_ros.data.sources import FrameSource
    from sal_ros.pretrain.cache import build_cache, load_entry
    from sal_ros.pretrain.teachers import RandomTeacher

    source = FrameSource(require_data("nuscenes_mini"))
    (key,) = source.keys()
    build_cache(source, [key], tmp_path, RandomTeacher(dim=4, patch=16), {"t": 1}, progress=False)
    entry = load_entry(tmp_path / f"{key}.npz")
    assert len(entry["meta"]["cameras"]) == 6 and entry["meta"]["pose"] is None
    seen = np.concatenate([c["index"] for c in entry["cameras"]])
    assert all(len(c["index"]) > 500 for c in entry["cameras"]) and len(np.unique(seen)) > 0.3 * 34_688


# ------------------------------------------------------------------------------------------------ losses
def test_losses_fall_when_features_agree():
    import torch.nn.functional as F

    from sal_ros.pretrain.losses import info_nce, point_to_segment, scalr_loss, segment_mean

    t = torch.randn(50, 8)
    assert float(scalr_loss(F.normalize(t, dim=1), 3 * t)) < 1e-6
    assert float(scalr_loss(F.normalize(-t, dim=1), t)) == pytest.approx(2.0, abs=1e-5)
    a = torch.randn(20, 8)
    assert float(info_nce(a, a, 0.07)) < float(info_nce(a, torch.randn(20, 8), 0.07))
    seg = torch.tensor([0, 0, 1, 1])
    f = F.normalize(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]), dim=1)
    assert float(point_to_segment(f, seg, segment_mean(f, seg, 2))) == pytest.approx(0.0, abs=1e-6)


def test_rarity_weights_keep_rare_teacher_content_from_drowning():
    """One-hot teacher, 990 pairs of one class and 10 of another, the student wrong only on the rare ten: the plain
    per-pair mean barely sees it; power 1 gives both classes the same total weight, so it counts half the loss."""
    import torch.nn.functional as F

    from sal_ros.pretrain.losses import rarity_weights, scalr_loss

    targets = torch.zeros(1000, 4)
    targets[:990, 1] = 1.0
    targets[990:, 2] = 1.0
    w = rarity_weights(targets, 1.0)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[990:].sum()) == pytest.approx(float(w[:990].sum()), rel=1e-4)
    assert torch.allclose(rarity_weights(targets, 0.0), torch.ones(1000))
    assert float(rarity_weights(targets, 0.5)[995] / rarity_weights(targets, 0.5)[0]) == pytest.approx(99 ** 0.5, rel=1e-3)
    feats = targets.clone()
    feats[990:] = F.normalize(torch.tensor([0.0, 1.0, 0.0, 0.0]), dim=0)  # the rare ones taken for the common class
    assert float(scalr_loss(feats, targets)) == pytest.approx(0.01 * 2 ** 0.5, rel=1e-4)
    assert float(scalr_loss(feats, targets, w)) == pytest.approx(0.5 * 2 ** 0.5, rel=1e-4)


# ------------------------------------------------------------------------------------------------ pretrain CLI
@pytest.mark.parametrize("objective", ["scalr", "seal"])
def test_pretrain_stop_and_resume_equals_uninterrupted(seq, tmp_path, objective):
    from sal_ros.train.loop import read_metrics

    balance = {"pair_balance": 1.0} if objective == "scalr" else {}  # the weighted ScaLR path resumes exactly too
    full = _config(tmp_path, seq, "full", objective, **balance)
    assert cli_main(["pretrain", "--config", str(full), "--no-progress"]) == 0
    run = tmp_path / "full"
    assert {"backbone_last.pt", "backbone_step0000002.pt", "pretrain_state.pt", "metrics.jsonl", "curves.png"} <= \
        {p.name for p in run.iterdir()}
    torch.load(run / "pretrain_state.pt", weights_only=True)  # no pickle in the resume state
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in recs)
    if objective == "seal":
        assert {"loss_spatial", "loss_temporal", "loss_segment"} <= set(recs[0])
        assert any(r["loss_temporal"] > 0 for r in recs)  # scan 0 pairs with scan 1 through the poses
    assert cli_main(["pretrain", "--config", str(full), "--no-progress"]) == 1  # a run is there: refused

    part = _config(tmp_path, seq, "part", objective, **balance)
    assert cli_main(["pretrain", "--config", str(part), "--stop-at", "2", "--no-progress"]) == 0
    assert cli_main(["pretrain", "--config", str(part), "--resume", "--no-progress"]) == 0
    a, b = _weights(run / "backbone_last.pt"), _weights(tmp_path / "part" / "backbone_last.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first = _weights(run / "backbone_step0000002.pt")
    assert not all(torch.equal(a[k], first[k]) for k in a)  # it did train on


def test_pretrain_resume_restores_numpy_and_python_randomness(seq, tmp_path):
    """A step that also draws from numpy's and python's global generators (as an augmentation or a plug-in may):
    stopped at step 2 and resumed in a "new process" (global generators left elsewhere), the run still ends on
    the uninterrupted run's weights, because the state holds every RNG. Restoring only torch's RNG (pretrain
    before issue 23) fails here: steps 3-4 draw other numbers."""
    import random

    from sal_ros.pretrain.cli import prepare, resolve
    from sal_ros.pretrain.trainer import PretrainConfig, PretrainTrainer

    class GlobalDraws(PretrainTrainer):
        def losses(self, samples, frames, feats, gen):
            scale = 1.0 + np.random.random() + random.random()
            return {k: v * scale for k, v in super().losses(samples, frames, feats, gen).items()}

    def run(name: str, stop_at=None, resume=False) -> Path:
        cfg = PretrainConfig.from_yaml(_config(tmp_path, seq, name))
        resolve(cfg, tmp_path, None)
        data, teacher = prepare(cfg, progress=False)
        np.random.seed(12345)  # what a new process's global generators hold: not the run's
        random.seed(12345)
        trainer = GlobalDraws(cfg, data, teacher.dim, progress=False)
        if resume:
            assert trainer.resume() == 2
        trainer.fit(stop_at)
        return tmp_path / name / "backbone_last.pt"

    full = _weights(run("full"))
    run("part", stop_at=2)
    resumed = _weights(run("part", resume=True))
    assert full.keys() == resumed.keys() and len(full) > 10
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    state = torch.load(tmp_path / "part" / "pretrain_state.pt", weights_only=True)
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def test_pretrain_resume_with_another_config_is_refused(seq, tmp_path, capsys):
    cfg = _config(tmp_path, seq, "run", steps=2)
    assert cli_main(["pretrain", "--config", str(cfg), "--stop-at", "1", "--no-progress"]) == 0
    assert cli_main(["pretrain", "--config", str(cfg), "--steps", "5", "--resume", "--no-progress"]) == 1
    assert "optim.steps: saved 2, now 5" in capsys.readouterr().err
    bad = _config(tmp_path, seq, "bad", objective="seal")
    text = yaml.safe_load(bad.read_text())
    text.pop("superpixels")
    bad.write_text(yaml.safe_dump(text))
    assert cli_main(["pretrain", "--config", str(bad), "--no-progress"]) == 1
    assert "needs superpixels" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ probe, train
def test_linear_probe_separates_informative_features():
    from sal_ros.eval.probe import linear_probe

    rng = np.random.default_rng(0)
    y = rng.integers(1, 4, 3000)
    informative = np.eye(4)[y][:, 1:] + 0.1 * rng.normal(size=(3000, 3))
    predict, _ = linear_probe(informative, y, 3, 200, 1e-4, 0)
    assert (predict(informative) == y).mean() > 0.99
    noise = rng.normal(size=(3000, 3))
    predict, _ = linear_probe(noise, y, 3, 200, 1e-4, 0)
    assert (predict(noise) == y).mean() < 0.5


def test_linear_probe_is_solved_to_convergence_and_learns_a_rare_class():
    """A class of 20 points among 4000: the converged probe finds it, and two seeds reach the same optimum (the
    problem is convex: the probe is solved, not stopped at a step count); the L2 is chosen on held-out points."""
    from sal_ros.eval.probe import L2_GRID, linear_probe, select_l2

    rng = np.random.default_rng(1)
    y = np.where(np.arange(4000) < 20, 3, rng.integers(1, 3, 4000))
    x = rng.normal(size=(4000, 6)) + np.eye(6)[y] * 3.0
    recall, losses = [], []
    for seed in (0, 1):
        predict, loss = linear_probe(x, y, 3, 1000, 1e-5, seed)
        recall.append((predict(x[y == 3]) == 3).mean())
        losses.append(loss)
    assert min(recall) > 0.8 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    l2, scores = select_l2(x, y, 3, 1000, 0)
    assert set(scores) == set(L2_GRID) and l2 in L2_GRID and scores[l2] == max(scores.values())


@pytest.mark.slow
def test_probe_takes_the_backbone_of_a_sal_checkpoint(seq, tmp_path, capsys):
    import json

    from conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    assert cli_main(["eval", "probe", "--backbone", str(ckpt), "--dataset", str(seq), "--train-scans", "0",
                     "--eval-scans", "1", "--steps", "5", "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert result["kind"] == "SAL checkpoint backbone" and result["family"] == "minkunet"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["eval", "probe", "--backbone", str(tmp_path / "junk.pt"), "--dataset", str(seq),
                     "--train-scans", "0", "--eval-scans", "1", "--out", str(tmp_path / "q")]) == 1
    assert "not a readable" in capsys.readouterr().err


def test_probe_command_and_train_from_pretrained_backbone(seq, tmp_path):
    import json

    from sal_ros.model.pretrained import read_backbone
    from sal_ros.train.trainer import TrainConfig, build_model

    cfg = _config(tmp_path, seq, "pre", steps=2)
    assert cli_main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    backbone = tmp_path / "pre" / "backbone_last.pt"
    out = tmp_path / "probe"
    assert cli_main(["eval", "probe", "--backbone", str(backbone), "--dataset", str(seq), "--train-scans", "0",
                     "--eval-scans", "1", "--steps", "20", "--out", str(out)]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["family"] == "waffleiron" and result["points"] == "camera-visible"
    for row in ("pretrained", "random"):
        assert 0 < result[row]["miou"] <= result[row]["miou_present"] <= 1
        assert 15_000 < result[row]["eval_points"] < 19_500
    assert (out / "per_class.png").stat().st_size > 0 and "random init" in (out / "probe.md").read_text()

    model_cfg = {"preset": "waffleiron_tiny", "waffle_depth": 2, "waffle_width": 16}
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"model": {**model_cfg, "pretrained_backbone": "pre/backbone_last.pt"}}))
    tc = TrainConfig.from_yaml(train_yaml)
    assert tc.model["pretrained_backbone"] == str(backbone)
    model = build_model(tc.model)
    saved = read_backbone(backbone)["backbone"]
    assert all(torch.equal(v, saved[k]) for k, v in model.backbone.state_dict().items())
    train_yaml.write_text(yaml.safe_dump({"model": {**model_cfg, "waffle_cell": 0.5,
                                                    "pretrained_backbone": "pre/backbone_last.pt"}}))
    with pytest.raises(ValueError, match="waffleiron.cell: pretrained 1.0, model 0.5"):
        TrainConfig.from_yaml(train_yaml)
