"""Panoptic / semantic metrics on hand-computed cases, a straightforward reference loop, and the real labels."""
import numpy as np
import pytest

from sal_ros.core.errors import SensorDataError
from sal_ros.data.labels import nuscenes, semantickitti, vocabulary_lut
from sal_ros.eval.panoptic import PanopticEvaluator, class_agnostic_pq, found_by_class
from sal_ros.eval.confusion import ConfusionMatrix

CAR, ROAD = 1, 2


def _evaluate(pred_sem, pred_inst, gt_sem, gt_inst, min_points=10, num_classes=2, things=(CAR,)):
    ev = PanopticEvaluator(num_classes, things=things, min_points=min_points, class_names=("car", "road")[:num_classes])
    ev.add(np.asarray(pred_sem), np.asarray(pred_inst), np.asarray(gt_sem), np.asarray(gt_inst))
    return ev.compute()


def _scene():
    """Ground truth: car A 100 points, car B 50, road 200 (instance 0), 30 ignore points."""
    gt_sem = np.r_[np.full(150, CAR), np.full(200, ROAD), np.zeros(30)].astype(int)
    gt_inst = np.r_[np.full(100, 1), np.full(50, 2), np.zeros(230)].astype(int)
    return gt_sem, gt_inst


def test_known_case_by_hand():
    """Every number below is computed by hand.

    Prediction (point ranges refer to _scene):
      0-89 car #1 (90)      90-99 road (10)         -> car A (100): car #1 IoU 90/100 = 0.9   TP
      100-119 car #2 (20)   120-149 car #3 (30)     -> car B (50):  #2 IoU 0.4, #3 IoU 0.6     TP (#3), #2 FP
      150-339 road (190)    340-349 car #4 (10)     -> road (200): pred road 200 pts, inter 190, IoU 190/210
      350-379 (ignore) car #4                       -> removed, so #4 has 10 points: FP at min_points 10
    car:  TP 2, FP 2, FN 0; SQ = (0.9 + 0.6) / 2 = 0.75; RQ = 2 / (2 + 1) = 2/3; PQ = 0.5
    road: TP 1; SQ = RQ * SQ = 190/210 = 0.904762; PQ = 0.904762
    PQ = (0.5 + 0.904762) / 2 = 0.702381; PQ-dagger = mean(PQ car, IoU road) = 0.702381
    IoU car: gt 150, pred 150 (non-ignore), inter 140 -> 140/160 = 0.875; IoU road 0.904762; mIoU 0.889881
    class-agnostic: TP car A (0.9), car B (0.6), road (0.904762); FP #2, #4 ->
      SQ 0.801587, RQ 3/4, PQ 0.601190
    """
    gt_sem, gt_inst = _scene()
    pred_sem = np.r_[np.full(90, CAR), np.full(10, ROAD), np.full(50, CAR), np.full(190, ROAD), np.full(40, CAR)]
    pred_inst = np.r_[np.full(90, 1), np.zeros(10), np.full(20, 2), np.full(30, 3), np.zeros(190), np.full(40, 4)]
    r = _evaluate(pred_sem, pred_inst, gt_sem, gt_inst)
    assert r.tp.tolist() == [2, 1] and r.fp.tolist() == [2, 0] and r.fn.tolist() == [0, 0]
    np.testing.assert_allclose(r.sq, [0.75, 190 / 210])
    np.testing.assert_allclose(r.rq, [2 / 3, 1.0])
    np.testing.assert_allclose(r.pq, [0.5, 190 / 210])
    np.testing.assert_allclose(r.iou, [0.875, 190 / 210])
    assert r.summary["pq"] == pytest.approx(0.702381, abs=1e-6)
    assert r.summary["pq_dagger"] == pytest.approx(0.702381, abs=1e-6)
    assert r.summary["miou"] == pytest.approx(0.889881, abs=1e-6)
    assert r.agnostic["sq"] == pytest.approx(0.801587, abs=1e-6)
    assert r.agnostic["rq"] == pytest.approx(0.75)
    assert r.agnostic["pq"] == pytest.approx(0.601190, abs=1e-6)
    # Raising min_points to 11 drops #4 (10 points) from the false positives: RQ car = 2 / 2.5.
    r = _evaluate(pred_sem, pred_inst, gt_sem, gt_inst, min_points=11)
    assert r.fp.tolist() == [1, 0] and r.pq[0] == pytest.approx(0.75 * 0.8)


def test_perfect_prediction():
    gt_sem, gt_inst = _scene()
    r = _evaluate(gt_sem, gt_inst, gt_sem, gt_inst)
    assert r.summary["pq"] == 1.0 and r.summary["miou"] == 1.0 and r.agnostic["pq"] == 1.0
    assert r.tp.tolist() == [2, 1] and r.fp.sum() == 0 and r.fn.sum() == 0


def test_empty_prediction():
    gt_sem, gt_inst = _scene()
    r = _evaluate(np.zeros_like(gt_sem), np.zeros_like(gt_inst), gt_sem, gt_inst)
    assert r.tp.sum() == 0 and r.fp.sum() == 0 and r.fn.tolist() == [2, 1]
    assert r.pq.tolist() == [0.0, 0.0] and r.iou.tolist() == [0.0, 0.0]
    assert r.agnostic["pq"] == 0.0 and r.agnostic["fn"] == 3


def test_split_instance():
    """A 100-point car predicted as 60 + 40: the 60 part matches (IoU 0.6), the 40 part is a false positive."""
    gt_sem, gt_inst = np.full(100, CAR), np.full(100, 7)
    pred_inst = np.r_[np.full(60, 1), np.full(40, 2)]
    r = _evaluate(gt_sem, pred_inst, gt_sem, gt_inst)
    assert (r.tp[0], r.fp[0], r.fn[0]) == (1, 1, 0)
    assert r.pq[0] == pytest.approx(0.6 * (1 / 1.5))


def test_stuff_must_be_one_segment():
    """Road split into two predicted instances of 50 % each: IoU 0.5 is not > 0.5, so nothing matches."""
    gt_sem, gt_inst = np.full(100, ROAD), np.zeros(100, int)
    split = _evaluate(gt_sem, np.r_[np.full(50, 1), np.full(50, 2)], gt_sem, gt_inst)
    assert (split.tp[1], split.fp[1], split.fn[1]) == (0, 2, 1) and split.pq[1] == 0.0
    merged = _evaluate(gt_sem, np.zeros(100, int), gt_sem, gt_inst)
    assert merged.pq[1] == 1.0


def test_ignore_points_are_removed():
    """Predicted car points on ignore ground truth change nothing; ignore is not a class to predict."""
    gt_sem = np.r_[np.full(100, CAR), np.zeros(100, int)]
    gt_inst = np.r_[np.full(100, 3), np.zeros(100, int)]
    r = _evaluate(np.full(200, CAR), np.full(200, 1), gt_sem, gt_inst)
    assert r.pq[0] == 1.0 and r.iou[0] == 1.0 and r.num_points == 100
    assert np.isnan(r.pq[1]) and np.isnan(r.iou[1])  # road never occurs: 0 in the means, out of the present ones
    assert r.summary["pq_present"] == 1.0 and r.summary["pq"] == 0.5


def test_small_segments_filtered():
    gt_sem = np.r_[np.full(100, CAR), np.full(100, ROAD)]
    gt_inst = np.r_[np.full(100, 1), np.zeros(100, int)]
    pred_sem, pred_inst = gt_sem.copy(), gt_inst.copy()
    pred_inst[100:120], pred_sem[100:120] = 9, CAR  # a spurious 20-point car on the road
    assert _evaluate(pred_sem, pred_inst, gt_sem, gt_inst, min_points=50).fp[0] == 0
    assert _evaluate(pred_sem, pred_inst, gt_sem, gt_inst, min_points=10).fp[0] == 1
    # an unmatched 20-point ground-truth car is a false negative only when it is big enough
    gt_sem2, gt_inst2 = np.r_[gt_sem, np.full(20, CAR)], np.r_[gt_inst, np.full(20, 2)]
    p2, i2 = np.r_[gt_sem, np.full(20, ROAD)], np.r_[gt_inst, np.zeros(20, int)]
    assert _evaluate(p2, i2, gt_sem2, gt_inst2, min_points=50).fn[0] == 0
    assert _evaluate(p2, i2, gt_sem2, gt_inst2, min_points=10).fn[0] == 1


def _reference_counts(pred_sem, pred_inst, gt_sem, gt_inst, num_classes, min_points):
    """Plain per-class, per-segment loops written from the definition, to check the vectorized code."""
    keep = gt_sem != 0
    pred_sem, pred_inst, gt_sem, gt_inst = pred_sem[keep], pred_inst[keep], gt_sem[keep], gt_inst[keep]
    out = np.zeros((4, num_classes + 1))
    for cl in range(1, num_classes + 1):
        preds = {i: (pred_sem == cl) & (pred_inst == i) for i in np.unique(pred_inst[pred_sem == cl])}
        gts = {i: (gt_sem == cl) & (gt_inst == i) for i in np.unique(gt_inst[gt_sem == cl])}
        matched_p, matched_g = set(), set()
        for gi, gm in gts.items():
            for pi, pm in preds.items():
                iou = (gm & pm).sum() / (gm | pm).sum()
                if iou > 0.5:
                    out[0, cl] += 1
                    out[3, cl] += iou
                    matched_p.add(pi)
                    matched_g.add(gi)
        out[1, cl] = sum(1 for i, m in preds.items() if i not in matched_p and m.sum() >= min_points)
        out[2, cl] = sum(1 for i, m in gts.items() if i not in matched_g and m.sum() >= min_points)
    return out


def test_matches_reference_loop_on_random_scans():
    rng = np.random.default_rng(3)
    for _ in range(5):
        n, c = 3000, 4
        gt_sem = rng.integers(0, c + 1, n)
        gt_inst = np.where(gt_sem <= 2, rng.integers(0, 6, n), 0)
        # predictions: ground truth with blocks relabelled, so some segments match and some do not
        pred_sem, pred_inst = gt_sem.copy(), gt_inst.copy()
        for _ in range(8):
            lo = rng.integers(0, n - 400)
            sl = slice(lo, lo + rng.integers(50, 400))
            pred_sem[sl] = rng.integers(0, c + 1)
            pred_inst[sl] = rng.integers(0, 4)
        ev = PanopticEvaluator(c, things=(1, 2), min_points=30)
        ev.add(pred_sem, pred_inst, gt_sem, gt_inst)
        ref = _reference_counts(pred_sem, pred_inst, gt_sem, gt_inst, c, 30)
        got = np.stack([ev.counts.tp, ev.counts.fp, ev.counts.fn, ev.counts.iou_sum])
        np.testing.assert_allclose(got[:, 1:], ref[:, 1:])
        assert ref[0].sum() > 0 and ref[1].sum() > 0  # the case exercises both matches and misses


def test_accumulates_over_scans():
    gt_sem, gt_inst = _scene()
    ev = PanopticEvaluator(2, things=(CAR,), min_points=10)
    ev.add(gt_sem, gt_inst, gt_sem, gt_inst)
    ev.add(np.zeros_like(gt_sem), np.zeros_like(gt_inst), gt_sem, gt_inst)
    r = ev.compute()
    assert r.tp.tolist() == [2, 1] and r.fn.tolist() == [2, 1] and r.num_scans == 2
    assert r.pq[0] == pytest.approx(2 / (2 + 1))  # SQ 1, RQ 2 / (2 + 0 + 1)


def test_class_agnostic_ignores_classes():
    """Unlabelled query segments (class 0) still score class-agnostic PQ; reference id 0 is ignored."""
    ref = np.r_[np.full(100, 4), np.full(100, 9), np.zeros(50, int)]
    pred = np.r_[np.full(100, 1), np.full(100, 2), np.full(50, 3)]
    assert class_agnostic_pq(pred, ref, min_points=10)["pq"] == 1.0
    merged = class_agnostic_pq(np.r_[np.full(200, 1), np.zeros(50, int)], ref, min_points=10)
    assert merged["tp"] == 0 and merged["fn"] == 2 and merged["fp"] == 1


def test_class_agnostic_counts_per_ground_truth_class():
    """By hand: the car is found, the road is missed (its best prediction has IoU exactly 0.5) and the spurious
    prediction lying on it is counted under road, the tree is found by a segment classified as road. The per-class
    counts add up to the class-agnostic totals."""
    gs = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    gi = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    ps = np.array([1, 1, 1, 2, 2, 1, 1, 2, 2, 2])
    pi = np.array([5, 5, 5, 0, 0, 7, 7, 0, 0, 0])
    ev = PanopticEvaluator(3, things=(1,), min_points=1, class_names=("car", "road", "tree"))
    ev.add(ps, pi, gs, gi)
    r = ev.compute()
    rows = {row["class"]: row for row in r.agnostic_per_class()}
    assert {c: (x["found"], x["missed"], x["spurious"]) for c, x in rows.items()} == {
        "car": (1, 0, 0), "road": (0, 1, 1), "tree": (1, 0, 0)}
    assert rows["tree"]["sq"] == pytest.approx(3 / 5) and rows["road"]["sq"] is None
    assert (r.agnostic["tp"], r.agnostic["fp"], r.agnostic["fn"]) == (2, 1, 1)
    assert r.agnostic["sq"] == pytest.approx((1 + 3 / 5) / 2)
    assert found_by_class(r.agnostic_per_class()) == "car 1/1, road 0/1 (+1 spurious), tree 1/1"


def test_a_one_class_evaluator_takes_dataset_classes_for_class_agnostic_scores():
    """The demo scores class-agnostic PQ with a one-class evaluator and the dataset's class ids (up to 19)."""
    gs, gi = _scene()
    ev = PanopticEvaluator(1, min_points=10)
    ev.add_agnostic(gs, gi, gs * 9, gi)  # class ids 9 and 18
    r = ev.compute()
    assert (r.agnostic["tp"], r.agnostic["fp"], r.agnostic["fn"]) == (3, 0, 0)
    assert [(x["class"], x["found"]) for x in r.agnostic_per_class()] == [("1", 3)]


def test_class_agnostic_per_class_sums_to_the_totals_on_random_scans():
    rng = np.random.default_rng(5)
    ev = PanopticEvaluator(4, things=(1, 2), min_points=30)
    for _ in range(4):
        n = 3000
        gt_sem = rng.integers(0, 5, n)
        gt_inst = np.where(gt_sem <= 2, rng.integers(0, 6, n), 0)
        pred_sem, pred_inst = gt_sem.copy(), gt_inst.copy()
        for _ in range(8):
            lo = rng.integers(0, n - 400)
            sl = slice(lo, lo + rng.integers(50, 400))
            pred_sem[sl], pred_inst[sl] = rng.integers(0, 5), rng.integers(0, 4)
        ev.add(pred_sem, pred_inst, gt_sem, gt_inst)
    r = ev.compute()
    rows = r.agnostic_per_class()
    assert sum(x["found"] for x in rows) == r.agnostic["tp"] > 0
    assert sum(x["missed"] for x in rows) == r.agnostic["fn"] > 0
    assert sum(x["spurious"] for x in rows) == r.agnostic["fp"] > 0
    assert r.agnostic["sq"] == pytest.approx(
        sum(x["sq"] * x["found"] for x in rows if x["found"]) / r.agnostic["tp"])


def test_confusion_matrix_and_bad_input():
    cm = ConfusionMatrix(2)
    cm.add(np.array([1, 1, 2, 0, 2]), np.array([1, 2, 2, 2, 0]))
    # car: tp 1, fp 1 -> 1/2; road: tp 1, fn 2 (pred car, pred 0) -> 1/3; gt ignore dropped
    np.testing.assert_allclose(cm.iou()[1:], [0.5, 1 / 3])
    assert cm.accuracy() == pytest.approx(2 / 4)
    with pytest.raises(SensorDataError, match="class ids"):
        cm.add(np.array([5]), np.array([1]))
    with pytest.raises(SensorDataError, match="equally long"):
        PanopticEvaluator(2).add(np.zeros(3), np.zeros(3), np.zeros(4), np.zeros(4))


def test_label_sets():
    kitti = semantickitti()
    # raw 10 car, instance 3 | raw 252 moving-car | raw 60 lane-marking | raw 52 other-structure (ignore)
    raw = np.array([10 | 3 << 16, 252 | 3 << 16, 40, 60, 52], np.uint32)
    sem, seg = kitti.split(raw)
    assert sem.tolist() == [1, 1, 9, 9, 0]
    assert len(set(seg.tolist())) == 5  # whole label = segment id, as semantic-kitti-api
    assert kitti.num_classes == 19 and sorted(kitti.things) == list(range(1, 9)) and kitti.min_points == 50
    nus = nuscenes()
    sem, seg = nus.split(np.array([17 * 1000 + 5, 24 * 1000, 2 * 1000 + 1, 31 * 1000]))
    assert sem.tolist() == [nus.class_id("car"), nus.class_id("driveable_surface"), nus.class_id("pedestrian"), 0]
    assert nus.num_classes == 16 and len(nus.things) == 10 and nus.min_points == 15
    with pytest.raises(SensorDataError, match="unknown semantic"):
        kitti.split(np.array([400], np.uint32))


def test_vocabulary_lut():
    kitti = semantickitti()
    lut = vocabulary_lut(["car", "sedan", "Other Vehicle", "sky"], kitti, {"sedan": "car"})
    assert lut.tolist() == [0, 1, 1, 5, 0]
    with pytest.raises(KeyError, match="no class"):
        vocabulary_lut(["tree"], kitti, {"tree": "forest"})


def test_real_scan_and_yaml(semantickitti_dir):
    ls = semantickitti(semantickitti_dir / "semantic-kitti.yaml")
    assert ls.class_names == semantickitti().class_names
    raw = np.fromfile(semantickitti_dir / "sequences/00/labels/000000.label", np.uint32)
    sem, seg = ls.split(raw)
    ev = PanopticEvaluator.for_label_set(ls)
    ev.add(sem, seg, sem, seg)
    r = ev.compute()
    assert r.summary["pq_present"] == 1.0 and r.tp[ls.class_id("car") - 1] >= 1
    # dropping the thing instances (everything as stuff) must cost thing PQ but not stuff PQ
    ev = PanopticEvaluator.for_label_set(ls)
    ev.add(sem, np.where(ls.thing_mask[sem], 0, seg), sem, seg)
    r = ev.compute()
    assert r.pq[ls.class_id("car") - 1] == 0.0  # 13 cars as one segment: no car reaches IoU 0.5
    assert r.summary["pq_things_present"] < 1.0 and r.summary["pq_stuff_present"] == 1.0


def test_class_agnostic_with_labels():
    """Merged stuff (label 3, instance 0) is one segment when labels are given, no segment without them."""
    ref = np.r_[np.full(100, 4), np.full(100, 9)]
    inst = np.r_[np.full(100, 1), np.zeros(100, int)]
    sem = np.r_[np.full(100, 1), np.full(100, 3)]
    assert class_agnostic_pq(inst, ref, 10, pred_sem=sem)["pq"] == 1.0
    assert class_agnostic_pq(inst, ref, 10)["fn"] == 1
