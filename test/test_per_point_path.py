"""The per-point stages of the Segmenter (issue 25): fusion once per voxel gives the bits of
the per-point definition, grouped instance summaries its values within float64 rounding. Their speed is measured by `sal-ros bench model` (docs/performance.md)."""
import math

import numpy as np
import pytest
import torch

from conftest import require_data
from sal_ros.core.cloud_input import SegmenterConfig
from sal_ros.core.panoptic import instance_summaries, panoptic_from_queries
from sal_ros.model.inference import class_similarity, fuse_queries, rank_classes
from sal_ros.model.sal import ModelConfig, SALModel
from sal_ros.model.segmenter import Segmenter
from sal_ros.model.text_encoder import tiny_text_encoder
from sal_ros.model.vocabulary import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_segmentation(a, b):
    for field in ("label", "instance", "score"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field
    assert len(a.instances) == len(b.instances)
    for x, y in zip(a.instances, b.instances):
        assert (x.instance_id, x.label, x.class_name, x.score, x.num_points, x.box.yaw, x.class_scores) == \
               (y.instance_id, y.label, y.class_name, y.score, y.num_points, y.box.yaw, y.class_scores)
        assert np.array_equal(x.box.center, y.box.center) and np.array_equal(x.box.size, y.box.size)


def _per_point_reference(query, score, query_class, thing, threshold, min_points):
    """Label and instance of every point by the definition: a point joins its query's segment (the query for a
    thing, its class for stuff) when it reaches the threshold and the segment keeps ``min_points`` such points;
    instances numbered by thing query, ascending."""
    cls = query_class[query]
    segment = np.where(thing[cls], query, len(query_class) + cls)
    keep = score >= threshold
    sizes = {s: int(np.count_nonzero(keep & (segment == s))) for s in np.unique(segment)}
    keep &= np.array([sizes[s] >= min_points for s in segment], bool)
    label = np.where(keep, cls + 1, 0)
    thing_queries = sorted(set(query[keep & thing[cls]].tolist()))
    number = {q: j + 1 for j, q in enumerate(thing_queries)}
    instance = np.array([number[q] if k and thing[c] else 0 for q, k, c in zip(query, keep, cls)])
    return label, instance, thing_queries


def test_fusion_per_cell_is_the_fusion_of_the_cells_points():
    """Cells (voxels) of 1 to 40 points: fusing once per cell and spreading through point_to_cell gives every
    array and summary of fusing each point, and both follow the definition (threshold, min_points counted in
    points, not cells; instances by ascending thing query; top classes of the instance's query)."""
    rng = np.random.default_rng(5)
    cells, queries, classes = 400, 12, 4
    point_to_cell = np.repeat(np.arange(cells), rng.integers(1, 40, cells))
    rng.shuffle(point_to_cell)
    points = rng.normal(size=(len(point_to_cell), 3)).astype(np.float32) * 20
    query = rng.integers(0, queries, cells)
    score = rng.random(cells).astype(np.float32)
    query_class = rng.integers(0, classes, queries)
    thing = np.array([True, False, True, False])
    rank = (rng.integers(0, classes, (queries, 3)), rng.random((queries, 3)).astype(np.float32))
    names = ("car", "road", "person", "building")
    for threshold, min_points in ((0.0, 1), (0.4, 1), (0.3, 300), (0.95, 1)):
        per_point = panoptic_from_queries(query[point_to_cell], score[point_to_cell], query_class, thing, points,
                                          names, threshold, min_points, 3, rank)
        per_cell = panoptic_from_queries(query, score, query_class, thing, points, names, threshold, min_points, 3,
                                         rank, point_to_cell=point_to_cell)
        _same_segmentation(per_point, per_cell)
        label, instance, thing_queries = _per_point_reference(query[point_to_cell], score[point_to_cell],
                                                              query_class, thing, threshold, min_points)
        assert np.array_equal(per_cell.label, label) and np.array_equal(per_cell.instance, instance)
        assert [i.class_scores[0][0] for i in per_cell.instances] == [int(rank[0][q, 0]) + 1 for q in thing_queries]
    assert 0 < len(per_cell.instances) or min_points > 1


def _summary_by_definition(points, rows, score):
    """One instance at a time, every mean from the exactly rounded sum (``math.fsum``)."""
    def mean(values):
        return math.fsum(values.tolist()) / len(values)

    p = points[rows].astype(np.float64)
    mx, my = mean(p[:, 0]), mean(p[:, 1])
    dx, dy = p[:, 0] - mx, p[:, 1] - my
    cov = (mean(dx * dx), mean(dy * dy), mean(dx * dy))
    return mx, my, dx, dy, p[:, 2], cov, mean(score[rows].astype(np.float64))


def test_grouped_instance_summaries_are_the_per_instance_sums_and_extents():
    """Grouped sums may round differently from exact ones, never by more than float64 noise: means within 1e-12
    relative, yaws within 1e-9 rad, boxes within 1e-6 relative (their float32 rounding)."""
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"),
                       np.float32).reshape(-1, 4)[::10]
    cell = np.floor(scan[:, :2] / 6.0).astype(np.int64)
    instance = (np.unique(cell[:, 0] * 1000 + cell[:, 1], return_inverse=True)[1].reshape(-1) % 29).astype(np.uint32)
    label = (instance % 3 + 1).astype(np.uint16)
    score = np.random.default_rng(1).random(len(scan)).astype(np.float32)
    summaries = instance_summaries(scan[:, :3], instance, label, score, ("car", "person", "bike"))
    ids = sorted(set(instance[instance > 0].tolist()))
    assert [s.instance_id for s in summaries] == ids
    per = [_summary_by_definition(scan[:, :3], np.flatnonzero(instance == i), score) for i in ids]
    cxx, cyy, cxy = (np.array([p[5][j] for p in per]) for j in range(3))
    yaws = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
    for s, (mx, my, dx, dy, z, _, mean_score), yaw, i in zip(summaries, per, yaws, ids):
        c, n = np.cos(yaw), np.sin(yaw)
        local = np.stack([c * dx + n * dy, -n * dx + c * dy, z], 1)
        lo, hi = local.min(0), local.max(0)
        mid = (lo + hi) / 2
        center = np.array([mx + c * mid[0] - n * mid[1], my + n * mid[0] + c * mid[1], mid[2]], np.float32)
        first = np.flatnonzero(instance == i)[0]
        assert (s.label, s.num_points) == (label[first], np.count_nonzero(instance == i))
        assert s.score == pytest.approx(mean_score, rel=1e-12) and s.box.yaw == pytest.approx(yaw, abs=1e-9)
        np.testing.assert_allclose(s.box.center, center, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.box.size, (hi - lo).astype(np.float32), rtol=1e-6, atol=1e-6)


def test_segmenter_on_the_real_scan_is_the_per_point_fusion_of_its_model():
    """Seeded model, real scan (124,668 points): the Segmenter's labels, instances, scores and summaries are those
    of fusing every point from its voxel's best query, also under a threshold and min_points and on a cloud with
    dropped points."""
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"),
                       np.float32).reshape(-1, 4)
    encoder = tiny_text_encoder()
    embeddings = encoder.encode(Vocabulary.from_yaml("config/vocabulary_semantickitti.yaml"))
    torch.manual_seed(0)
    model = SALModel(ModelConfig.preset("realtime", token_dim=encoder.embed_dim)).eval()
    points, intensity = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    with torch.inference_mode():
        vin = model.prepare(torch.from_numpy(points), torch.from_numpy(intensity))
        pred = model.decode(model.backbone(vin.voxels), 1, all_layers=False)[-1]
        query_v, score_v = fuse_queries(pred.masks[0], pred.objectness[0])
        per_class = class_similarity(pred.tokens[0], torch.from_numpy(embeddings.embeddings),
                                     torch.from_numpy(embeddings.row_class), embeddings.num_classes)
    p2v = vin.point_to_voxel[0]
    query, score = query_v[p2v].numpy(), score_v[p2v].numpy()
    for threshold, min_points in ((0.0, 1), (0.3, 200)):
        segmenter = Segmenter(model, "cpu", embeddings, SegmenterConfig(score_threshold=threshold,
                                                                        min_points=min_points))
        out = segmenter.segment(points, intensity)
        expected = panoptic_from_queries(query, score, per_class.argmax(1).numpy(), embeddings.thing, points,
                                         embeddings.class_names, threshold, min_points, embeddings.version,
                                         rank_classes(per_class))
        _same_segmentation(out, expected)
        assert len(out.instances) > 0 and (out.label > 0).any()
    bad = points.copy()
    bad[[3, 50_000]] = np.nan
    kept = np.setdiff1d(np.arange(len(points)), [3, 50_000])
    out = segmenter.segment(bad, intensity)
    assert (out.label[[3, 50_000]] == 0).all() and out.dropped_points["nonfinite"] == 2
    assert out.label[kept].dtype == np.uint16 and out.instance.dtype == np.uint32 and out.score.dtype == np.float32


def test_one_cloud_is_prepared_as_the_first_of_a_batch():
    """A single cloud (inference: no concatenation, no batch column) gets the voxels, features and point map it
    gets as the first cloud of a batch, and its point features are the columns' definition."""
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"),
                       np.float32).reshape(-1, 4)[::4]
    points, intensity = torch.from_numpy(scan[:, :3].copy()), torch.from_numpy(scan[:, 3].copy())
    intensity[7] = float("nan")
    for in_channels in (4, 5):
        model = SALModel(ModelConfig.preset("realtime", in_channels=in_channels)).eval()
        cfg = model.config.input
        columns = [points / cfg.coord_scale, (torch.nan_to_num(intensity) / cfg.intensity_scale)[:, None]]
        features = model.point_features(points, intensity)
        assert torch.equal(features[:, :4], torch.cat(columns, 1))
        if in_channels == 5:  # the range, within float32 rounding of the exact one
            exact = (points.double().norm(dim=1) / cfg.coord_scale).float()
            torch.testing.assert_close(features[:, 4], exact, rtol=3e-7, atol=0)
        one = model.prepare(points, intensity)
        batch = model.prepare([points, points[:5000] + 100.0], [intensity, intensity[:5000]])
        n = one.num_voxels[0]
        assert one.num_voxels == batch.num_voxels[:1] and one.batch_size == 1
        assert torch.equal(one.voxels.coords, batch.voxels.coords[:n])
        assert torch.equal(one.voxels.feats, batch.voxels.feats[:n])
        assert torch.equal(one.point_to_voxel[0], batch.point_to_voxel[0])


@pytest.mark.parametrize("spread_m", [50.0, 4000.0])
def test_cpu_voxelize_sorts_narrow_and_wide_key_ranges_as_the_generic_path(monkeypatch, spread_m):
    """Keys below 2**31 go through torch's stable int32 sort, wider ranges (4 km at 2 cm: ~2**46 cells) through
    the int64 radix passes; both give the generic path's voxels, order, means and point map."""
    from sal_ros.model.sparse import voxelization

    g = torch.Generator().manual_seed(11)
    pts = torch.rand(30000, 3, generator=g) * torch.tensor([spread_m, spread_m, 8.0]) - spread_m / 2
    pts[1::3] = pts[::3]  # voxels of several points
    feats = torch.randn(30000, 5, generator=g)
    got, got_p2v = voxelization.voxelize(pts, None, 0.02, feats)
    monkeypatch.setattr(voxelization, "_voxelize_cpu_applies", lambda *args: False)
    ref, ref_p2v = voxelization.voxelize(pts, None, 0.02, feats)
    assert torch.equal(got.coords, ref.coords) and torch.equal(got.feats, ref.feats) and torch.equal(got_p2v, ref_p2v)
    assert len(got) < 30000


def test_intensity_is_copied_only_when_it_must_be():
    """Finite, writable intensities reach the model as they are (no per-frame copy); non-finite values become 0
    in a copy (the caller's array untouched), and read-only buffers are copied (torch refuses to share them)."""
    from sal_ros.core.cloud_input import model_intensity

    clean = np.linspace(0, 1, 50, dtype=np.float32)
    assert np.shares_memory(model_intensity(clean, 50, 0.0, 1.0), clean)
    dirty = clean.copy()
    dirty[[3, 7, 9]] = (np.nan, np.inf, -np.inf)
    fixed = model_intensity(dirty, 50, 0.0, 1.0)
    assert not np.shares_memory(fixed, dirty) and np.isnan(dirty[3]) and fixed[[3, 7, 9]].tolist() == [0.0, 0.0, 0.0]
    frozen = clean.copy()
    frozen.flags.writeable = False
    shared = model_intensity(frozen, 50, 0.0, 1.0)
    assert shared.flags.writeable and np.array_equal(shared, clean)
