"""Panoptic fusion and classification on hand-built predictions; the Segmenter facade on the real scan."""
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_summaries_describe_the_labels, require_data
from sal_ros.core.cloud_input import CloudRejected, SegmenterConfig
from sal_ros.core.panoptic import instance_summaries, panoptic_from_queries
from sal_ros.model.checkpoint import ModelError
from sal_ros.model.decoder import OBJECT
from sal_ros.model.inference import classify, fuse_queries
from sal_ros.model.segmenter import Segmenter
from sal_ros.model.text_encoder import tiny_text_encoder
from sal_ros.model.vocabulary import Vocabulary


def test_fuse_queries_multiplies_mask_and_objectness():
    mask = torch.tensor([[4.0, -4.0, 0.0], [4.0, 4.0, 0.0]])
    obj = torch.zeros(2, 2)
    obj[0, OBJECT], obj[1, OBJECT] = 3.0, -3.0  # query 0 confident object, query 1 not
    query, score = fuse_queries(mask, obj)
    p0, p1 = torch.sigmoid(torch.tensor(3.0)), torch.sigmoid(torch.tensor(-3.0))
    assert query.tolist() == [0, 1, 0]
    torch.testing.assert_close(score, torch.stack([torch.sigmoid(torch.tensor(4.0)) * p0,
                                                   torch.sigmoid(torch.tensor(4.0)) * p1, 0.5 * p0]))


def test_classify_max_and_mean_rows():
    e = torch.eye(4)
    tokens = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.0, 0.1, 0.2, 0.9], [0.0, 0.0, 1.0, 0.0]])
    # "max": class 0 has rows e0, e1; class 1 has e2; class 2 has e3
    cls, sim = classify(tokens, e, torch.tensor([0, 0, 1, 2]), 3)
    assert cls.tolist() == [0, 2, 1]
    torch.testing.assert_close(sim[0], 0.9 / tokens[0].norm())
    # one row per class ("mean" vocabularies): the row for class 0 is the mean direction of e0, e1
    mean0 = torch.nn.functional.normalize(e[0] + e[1], dim=0)
    cls, _ = classify(tokens, torch.stack([mean0, e[2], e[3]]), torch.arange(3), 3)
    assert cls.tolist() == [0, 2, 1]


def _fusion_case():
    """12 points, 5 queries: two cars (thing), two road queries (stuff), one weak tiny segment."""
    query = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 1])
    score = np.array([.9, .8, .7, .9, .9, .9, .6, .6, .7, .7, .9, .1], np.float32)
    query_class = np.array([0, 0, 1, 1, 0])  # classes: 0 car (thing), 1 road (stuff)
    thing = np.array([True, False])
    points = np.arange(36, dtype=np.float32).reshape(12, 3)
    return query, score, query_class, thing, points


def test_fusion_stuff_merges_things_split_threshold_and_min_points():
    query, score, query_class, thing, points = _fusion_case()
    seg = panoptic_from_queries(query, score, query_class, thing, points, ("car", "road"), score_threshold=0.5,
                                min_points=2, vocabulary_version=7)
    # point 11 (score 0.1) is below the threshold; query 4 keeps a single point (< min_points)
    assert seg.label.tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
    assert seg.label.dtype == np.uint16 and seg.instance.dtype == np.uint32 and seg.score.dtype == np.float32
    inst = seg.instance
    assert len(set(inst[:3])) == 1 and len(set(inst[3:6])) == 1 and inst[0] != inst[3] and inst[0] > 0
    assert (inst[6:] == 0).all()  # road queries 2 and 3 merged, instance 0; dropped points 0 too
    assert seg.score[10] == 0 and seg.score[11] == 0
    assert seg.vocabulary_version == 7 and seg.class_names == ("car", "road")
    assert sorted(i.num_points for i in seg.instances) == [3, 3]
    assert {i.class_name for i in seg.instances} == {"car"}
    first = next(i for i in seg.instances if i.instance_id == inst[0])
    assert first.score == pytest.approx(np.mean([.9, .8, .7]))
    # without a threshold and minimum, point 11 joins query 1's car and query 4 stays
    loose = panoptic_from_queries(query, score, query_class, thing, points, ("car", "road"))
    assert (loose.label > 0).all() and loose.instance[11] == loose.instance[3] and loose.instance[10] > 0


def test_instance_box_follows_the_principal_axis():
    rng = np.random.default_rng(0)
    yaw = np.deg2rad(30)
    local = np.stack([rng.uniform(-2.0, 2.0, 400), rng.uniform(-0.8, 0.8, 400), rng.uniform(0, 1.5, 400)], 1)
    local[:4, :2] = [[-2, -0.8], [2, 0.8], [-2, 0.8], [2, -0.8]]  # make the extent exact
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    pts = local.copy()
    pts[:, :2] = local[:, :2] @ rot.T + [10.0, -5.0]
    pts[:, 2] -= 1.7
    other = np.array([[0, 0, 0], [1, 0, 0]], float)
    points = np.concatenate([pts, other]).astype(np.float32)
    instance = np.array([3] * 400 + [8, 8], np.uint32)
    label = np.array([1] * 402, np.uint16)
    boxes = instance_summaries(points, instance, label, np.full(402, 0.5, np.float32), ("car",))
    car = next(b for b in boxes if b.instance_id == 3)
    angle = (car.box.yaw - yaw + np.pi / 2) % np.pi - np.pi / 2  # a box's yaw is defined modulo pi
    assert abs(angle) < 0.02  # PCA of a finite uniform sample: a few mrad off
    np.testing.assert_allclose(car.box.size, [4.0, 1.6, 1.5], atol=0.03)
    np.testing.assert_allclose(car.box.center, [10.0, -5.0, -1.7 + 0.75], atol=0.03)
    assert car.num_points == 400 and car.label == 1 and car.class_name == "car"
    two = next(b for b in boxes if b.instance_id == 8)
    np.testing.assert_allclose(two.box.size, [1.0, 0.0, 0.0], atol=1e-6)


# ------------------------------------------------------------------------------------------- Segmenter
@pytest.fixture(scope="module")
def scan():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    return np.fromfile(path, np.float32).reshape(-1, 4)


@pytest.fixture(scope="module")
def encoder():
    return tiny_text_encoder()


def test_segmenter_aligns_with_input_and_skips_nonfinite(scan, encoder):
    seg = Segmenter.from_checkpoint(None, "cpu", encoder, config=SegmenterConfig(score_threshold=0.0))
    with pytest.raises(ModelError, match="no vocabulary"):
        seg.segment(scan[:100, :3])
    seg.set_embeddings(encoder.encode(Vocabulary.from_prompts(["car", "road", "tree"]), version=3))
    pts = scan[:, :3].copy()
    bad = np.array([5, 77, 5000])
    pts[bad[0]] = np.nan
    pts[bad[1], 2] = np.inf
    pts[bad[2], 0] = -np.inf
    out = seg.segment(pts, scan[:, 3])
    assert len(out.label) == len(pts) and out.class_names == ("car", "road", "tree") and out.vocabulary_version == 3
    assert (out.label[bad] == 0).all() and (out.score[bad] == 0).all()
    valid = np.setdiff1d(np.arange(len(pts)), bad)
    assert (out.label[valid] > 0).all() and (out.label <= 3).all()  # no threshold, no minimum: all assigned
    assert set(out.timings_ms) == {"voxelize", "backbone", "decoder", "postprocess"}
    # a point budget: the model sees a subset, every other finite point takes its nearest neighbour's result
    seg.configure(replace(seg.config, max_points=40_000))
    sub = seg.segment(pts, scan[:, 3])
    assert (sub.label[bad] == 0).all() and (sub.label[valid] > 0).all()
    assert sum(i.num_points for i in sub.instances) == int((sub.instance > 0).sum())


def test_segmenter_rejects_wrong_token_dim(encoder):
    from sal_ros.model.config import ModelConfig
    from sal_ros.model.sal import SALModel

    seg = Segmenter(SALModel(ModelConfig.preset("tiny", token_dim=256)))
    with pytest.raises(ModelError, match="256"):
        seg.set_embeddings(encoder.encode(["car"]))


def test_vocabulary_swaps_atomically_while_segmenting(scan, encoder):
    """A swap that lands inside a call (made there on purpose, from the backbone's forward) leaves that call on
    the vocabulary it started with, names and labels alike; the next call takes the new one. A Segmenter that
    read its vocabulary again after the model (names of v2, classes of v1) fails here."""
    seg = Segmenter.from_checkpoint(None, "cpu", encoder)
    vocabs = [encoder.encode(["car", "road"], version=1), encoder.encode(["tree", "pole", "person", "bus"], version=2)]
    seg.set_embeddings(vocabs[0])
    landed = []

    def swap_mid_call(module, args):
        if not landed:
            seg.set_embeddings(vocabs[1])
            landed.append(seg.text_embeddings.version)

    handle = seg.model.backbone.register_forward_pre_hook(swap_mid_call)
    try:
        during = seg.segment(scan[:20000, :3])
    finally:
        handle.remove()
    assert landed == [2], "no swap landed during the call"
    assert (during.vocabulary_version, during.class_names) == (1, ("car", "road"))
    assert int(during.label.max()) <= 2 and {i.class_name for i in during.instances} <= {"car", "road"}
    after = seg.segment(scan[:20000, :3])
    assert (after.vocabulary_version, after.class_names) == (2, ("tree", "pole", "person", "bus"))
    assert {i.class_name for i in after.instances} <= set(after.class_names)
    # many swaps from another thread: every call stays on one vocabulary
    stop = threading.Event()

    def swapper():
        k = 0
        while not stop.wait(0.002):
            k += 1
            seg.set_embeddings(vocabs[k % 2])

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        results = [seg.segment(scan[:20000, :3]) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    for out in results:
        names = vocabs[out.vocabulary_version - 1].class_names
        assert out.class_names == names and int(out.label.max()) <= len(names)


def test_settings_swap_atomically_while_segmenting(scan, encoder):
    """A configure() that lands inside a call (from the backbone's forward) leaves that call on every setting it
    started with; the next call takes all the new ones. Settings set one by one, or read again after the model,
    give a result that matches neither."""
    old = SegmenterConfig(score_threshold=0.0, min_points=1, max_points=15_000)
    new = SegmenterConfig(score_threshold=0.5, min_points=200, max_points=0)
    seg = Segmenter.from_checkpoint(None, "cpu", encoder, config=old)
    seg.set_embeddings(encoder.encode(["car", "road", "tree"]))
    points = scan[:20000, :3]
    before = seg.segment(points)
    landed = []

    def configure_mid_call(module, args):
        if not landed:
            seg.configure(new)
            landed.append(seg.config)

    handle = seg.model.backbone.register_forward_pre_hook(configure_mid_call)
    try:
        during = seg.segment(points)
    finally:
        handle.remove()
    assert landed == [new], "no configure landed during the call"
    np.testing.assert_array_equal(during.label, before.label)
    np.testing.assert_array_equal(during.score, before.score)
    after = seg.segment(points)
    assert not np.array_equal(after.label, before.label)
    assert (after.score[after.label > 0] >= 0.5).all()
    assert all(i.num_points >= 200 for i in after.instances)


def test_max_points_reject_policy_refuses_the_cloud(scan, encoder):
    seg = Segmenter.from_checkpoint(None, "cpu", encoder,
                                    config=SegmenterConfig(max_points=1000, max_points_policy="reject"))
    seg.set_embeddings(encoder.encode(["car", "road"]))
    assert seg.admit(scan[:1000, :3]).rejected is False
    cloud = seg.admit(scan[:1001, :3])
    assert cloud.rejected and not cloud.subsampled
    with pytest.raises(CloudRejected, match="max_points=1000"):
        seg.segment(scan[:1001, :3])


def test_intensity_on_the_sensors_scale_is_rescaled_to_the_checkpoints(scan, encoder):
    """An 8-bit lidar with intensity_scale 255 gives the model what a 0..1 lidar gives it; NaN intensity is 0."""
    seg = Segmenter.from_checkpoint(None, "cpu", encoder)
    seg.set_embeddings(encoder.encode(["car", "road", "tree"]))
    points, intensity = scan[:20000, :3], scan[:20000, 3]
    reference = seg.segment(points, intensity)
    eight_bit = intensity * np.float32(255)
    assert seg.admit(points, eight_bit).intensity_overshoot() is not None  # the wrong scale is detectable
    seg.configure(replace(seg.config, intensity_scale=255.0))
    cloud = seg.admit(points, eight_bit)
    assert cloud.intensity_overshoot() is None
    np.testing.assert_allclose(cloud.intensity, intensity, rtol=1e-6)
    np.testing.assert_allclose(seg.run(cloud).score, reference.score, atol=1e-4)
    nan = eight_bit.copy()
    nan[:10] = np.nan
    assert (seg.admit(points, nan).intensity[:10] == 0).all()


def segment_sizes(out):
    """Points per published segment: a thing instance by its id, a stuff class (instance 0) by its label."""
    labeled = out.label > 0
    key = np.where(out.instance > 0, out.instance.astype(np.int64), -out.label.astype(np.int64))[labeled]
    keys, counts = np.unique(key, return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


def test_threshold_and_min_points_count_the_published_points_of_a_subsampled_cloud(scan, encoder):
    """Over max_points the model sees a subset; the threshold and min_points then apply to the whole cloud after
    the nearest-neighbour spread, so a segment's size is the size it is published with."""
    seg = Segmenter.from_checkpoint(None, "cpu", encoder,
                                    config=SegmenterConfig(score_threshold=0.0, max_points=30_000))
    seg.set_embeddings(encoder.encode(["car", "road", "tree"]))
    pts, intensity = scan[:, :3], scan[:, 3]
    loose = seg.segment(pts, intensity)  # no threshold, no minimum
    seg.configure(replace(seg.config, score_threshold=0.3))
    thresholded = seg.segment(pts, intensity)
    low = loose.score < 0.3
    assert low.any() and (~low).any()
    assert np.array_equal(thresholded.label, np.where(low, 0, loose.label))
    assert (thresholded.instance[low] == 0).all() and (thresholded.score[low] == 0).all()
    sizes = segment_sizes(thresholded)
    smallest = min(sizes.values())
    assert smallest > 1

    # every segment has that many published points (on the subset: ~1/4 of them)
    seg.configure(replace(seg.config, min_points=smallest))
    kept = seg.segment(pts, intensity)
    assert np.array_equal(kept.label, thresholded.label)
    seg.configure(replace(seg.config, min_points=smallest + 1))
    dropped = seg.segment(pts, intensity)
    gone = np.isin(np.where(kept.instance > 0, kept.instance.astype(np.int64), -kept.label.astype(np.int64)),
                   [k for k, size in segment_sizes(kept).items() if size == smallest]) & (kept.label > 0)
    assert gone.any() and (dropped.label[gone] == 0).all()
    assert np.array_equal(dropped.label[~gone], kept.label[~gone])
    for out in (loose, thresholded, kept, dropped):
        assert_summaries_describe_the_labels(pts, out)


def test_nan_model_outputs_are_refused_per_frame_and_named(scan, encoder):
    """NaN weights (made here at run time, past any check at load) used to label every point 0 and pass as a
    processed frame: the frame is refused with the outputs named, and the same Segmenter runs again once its
    weights are finite."""
    import torch

    from sal_ros.model.errors import NonFiniteOutputError

    seg = Segmenter.from_checkpoint(None, "cpu", encoder, config=SegmenterConfig(score_threshold=0.0))
    seg.set_embeddings(encoder.encode(["car", "road", "tree"]))
    params = dict(seg.model.named_parameters())
    name = next(n for n in params if "decoder" in n and n.endswith("weight"))
    saved = params[name].detach().clone()
    with torch.no_grad():
        params[name].fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="non-finite model outputs") as err:
        seg.segment(scan[:20000, :3], scan[:20000, 3])
    assert err.value.outputs
    with torch.no_grad():
        params[name].copy_(saved)
    assert (seg.segment(scan[:20000, :3], scan[:20000, 3]).label > 0).any()


def test_warm_up_runs_the_model_on_a_scan_of_realistic_size(encoder):
    from sal_ros.model.segmenter import warm_up

    seg = Segmenter.from_checkpoint(None, "cpu", encoder, config=SegmenterConfig(score_threshold=0.0, max_points=50_000))
    seg.set_embeddings(encoder.encode(["car", "road"]))
    xyz, intensity, out = warm_up(seg)
    assert len(xyz) == len(out.label) == 50_000  # capped by max_points, never rejected
    extent = np.linalg.norm(xyz[:, :2], axis=1)
    assert extent.max() > 30 and extent.min() < 10 and np.isfinite(xyz).all()  # rings from near to far
    assert (out.label > 0).all()
