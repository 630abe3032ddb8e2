"""The tracker (core/tracking.py) and evaluation over time (eval/tracking.py): expected ids on a synthetic
sequence with crossing objects, a missed frame and an object leaving; ego motion from poses; LSTQ against a
hand-computed case; the real SemanticKITTI scans 000000 -> 000001 with ground-truth instances as segmentation."""
import math

import numpy as np
import pytest

from conftest import require_data
from sal_ros.core.tracking import Tracker, TrackerConfig, apply_tracks, box_iou_3d
from sal_ros.core.types import InstanceSummary, OrientedBox, Segmentation
from sal_ros.eval.tracking import LSTQEvaluator

CAR = (4.0, 1.8, 1.5)
NAMES = ("car", "truck")


def inst(instance_id, x, y, label=1, size=CAR, yaw=0.0):
    return InstanceSummary(instance_id, label, NAMES[label - 1], 0.9, 100,
                           OrientedBox(np.array([x, y, 0.0], np.float32), np.array(size, np.float32), yaw))


def test_box_iou_3d_hand_values():
    c, s = np.zeros(3), np.array([2.0, 2.0, 2.0])
    assert box_iou_3d(c, s, 0.0, c, s, 0.0) == pytest.approx(1.0)
    assert box_iou_3d(c, s, 0.0, c, s, math.pi / 2) == pytest.approx(1.0)  # a square turned by 90 deg
    assert box_iou_3d(c, s, 0.0, np.array([1.0, 0, 0]), s, 0.0) == pytest.approx(1 / 3)  # half overlap: 4 / 12
    assert box_iou_3d(c, s, 0.0, np.array([0, 0, 1.0]), s, 0.0) == pytest.approx(1 / 3)  # half in z
    assert box_iou_3d(c, s, 0.0, np.array([3.0, 0, 0]), s, 0.0) == 0.0
    # a 2x2 square and the same turned by 45 deg: octagon of area 8 (sqrt 2 - 1) = 3.3137
    inter = 8 * (math.sqrt(2) - 1)
    assert box_iou_3d(c, s, 0.0, c, s, math.pi / 4) == pytest.approx(inter / (8 - inter))


def synthetic_sequence():
    """Per frame the detections (shuffled, ids afresh) and the object each one is: A and B drive towards each
    other 2 m apart sideways and cross at frame 5; C stands still, is missed in frame 3 and reads as a truck in
    frame 6; D stands still and leaves after frame 2; E appears where D was at frame 8."""
    rng = np.random.default_rng(0)
    frames = []
    for k in range(10):
        objects = [("A", -5.0 + k, 1.0, 1), ("B", 5.0 - k, -1.0, 1)]
        if k != 3:
            objects.append(("C", 0.0, 10.0, 2 if k == 6 else 1))
        if k <= 2:
            objects.append(("D", 10.0, 10.0, 1))
        if k >= 8:
            objects.append(("E", 10.0, 10.0, 1))
        order = rng.permutation(len(objects))
        dets, truth = [], {}
        for new_id, j in enumerate(order, start=1):
            name, x, y, label = objects[j]
            dets.append(inst(new_id, x, y, label))
            truth[new_id] = name
        frames.append((dets, truth))
    return frames


def test_synthetic_sequence_keeps_expected_ids():
    tracker = Tracker(TrackerConfig(max_distance=2.0, max_misses=3))
    seen = {}  # object -> track ids it got
    ended, classes_of_c = [], []
    for k, (dets, truth) in enumerate(synthetic_sequence()):
        result = tracker.update(dets, stamp_ns=k * 100_000_000)
        ended += [(k, t) for t in result.ended]
        for det in dets:
            tracked = result.by_instance[det.instance_id]
            seen.setdefault(truth[det.instance_id], []).append(tracked.track_id)
            if truth[det.instance_id] == "C":
                classes_of_c.append(tracked.label)
    ids = {name: set(got) for name, got in seen.items()}
    assert all(len(got) == 1 for got in ids.values()), ids  # crossing and a missed frame keep every id
    first = {name: got.pop() for name, got in ids.items()}
    assert sorted(first[n] for n in "ABCD") == [1, 2, 3, 4]  # frame 0 starts four tracks
    assert first["E"] == 5  # a newcomer where D was, after D ended: a new id, never D's
    assert len(seen["C"]) == 9  # through the missed frame 3
    assert ended == [(6, first["D"])]  # D: unmatched in frames 3, 4, 5, 6 -> gone after max_misses = 3
    assert classes_of_c == [1] * 9  # the one 'truck' frame does not flip the smoothed class


def test_without_ego_motion_a_fast_sensor_breaks_tracks_and_poses_repair_them():
    """Static objects seen from a sensor driving 3 m per frame that stops for a frame (stop and go): in the sensor
    frame they move and stop, past the gate of what their tracks predict."""
    world = [(20.0, 5.0), (30.0, -5.0)]
    ids_sensor, ids_fixed = set(), set()
    sensor_tracker, fixed_tracker = Tracker(), Tracker()
    for k in range(5):
        pose = np.eye(4)
        pose[0, 3] = (0.0, 3.0, 6.0, 6.0, 9.0)[k]  # sensor -> world
        dets = [inst(j + 1, x - pose[0, 3], y) for j, (x, y) in enumerate(world)]
        ids_sensor |= {t.track_id for t in sensor_tracker.update(dets, k * 100_000_000).by_instance.values()}
        ids_fixed |= {t.track_id for t in fixed_tracker.update(dets, k * 100_000_000, pose).by_instance.values()}
    assert ids_fixed == {1, 2}
    assert len(ids_sensor) > 2


def test_a_new_track_catches_an_object_faster_than_the_gate():
    """A car at 25 m/s (2.5 m per 0.1 s frame, beyond the 2 m gate) from the frame it is first seen: the new track
    has no velocity yet, its gate grows by max_speed x dt, so the car keeps one id; without that (max_speed 0)
    it starts a new track every frame. A parked car 4 m beside the first position is never taken for it."""
    def ids(max_speed):
        tracker = Tracker(TrackerConfig(max_distance=2.0, max_speed=max_speed))
        got = []
        for k in range(6):
            result = tracker.update([inst(1, 2.5 * k, 0.0), inst(2, 0.0, 4.0)], k * 100_000_000)
            got.append((result.by_instance[1].track_id, result.by_instance[2].track_id))
        return got

    assert ids(30.0) == [(1, 2)] * 6
    assert [moving for moving, _ in ids(0.0)] == [1, 3, 4, 5, 6, 7]


def test_highway_sequence_tracks_without_switches():
    """semantickitti_mini 01 (highway), ground truth as the segmentation, ten frames: a car moving 2.2-2.4 m per
    frame in the world frame kept one id (9 switches with the plain 2 m gate)."""
    from sal_ros.data.datasets import load_semantickitti, semantickitti_poses
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation, track_and_evaluate

    seq = require_data("semantickitti_mini", "sequences", "01")
    label_set = get_label_set("semantickitti")
    frames = load_semantickitti(seq, images=False)
    result = track_and_evaluate(frames, lambda f: oracle_segmentation(f, label_set), label_set,
                                semantickitti_poses(seq))["all"]
    assert (result.frames, result.gt_tubes, result.id_switches, result.pred_tubes) == (10, 3, 0, 3)
    assert result.lstq == pytest.approx(1.0, abs=1e-12)


def test_vocabulary_change_clears_class_votes_but_keeps_ids():
    tracker = Tracker()
    for k in range(3):
        tracker.update([inst(1, 0.0, 0.0, label=1)], k * 100_000_000, vocabulary_version=1)
    result = tracker.update([inst(1, 0.0, 0.0, label=2)], 3 * 100_000_000, vocabulary_version=2)
    assert (result.by_instance[1].track_id, result.by_instance[1].label) == (1, 2)


def test_apply_tracks_rewrites_points_and_summaries():
    label = np.array([1, 1, 2, 2, 3, 0], np.uint16)
    instance = np.array([1, 1, 2, 2, 0, 0], np.uint32)
    seg = Segmentation(label=label, instance=instance, score=np.ones(6, np.float32),
                       class_names=("car", "truck", "road"), vocabulary_version=1,
                       instances=[inst(1, 0.0, 0.0, 1), inst(2, 10.0, 0.0, 2)])
    tracker = Tracker()
    tracker.update([inst(9, 10.0, 0.0, 1)], 0)  # track 1 (a car) where instance 2 is now
    apply_tracks(seg, tracker.update(seg.instances, 100_000_000))
    assert seg.instance.tolist() == [2, 2, 1, 1, 0, 0]
    assert seg.label.tolist() == [1, 1, 1, 1, 3, 0]  # instance 2 reads as a truck once; its track is a car
    assert [(i.instance_id, i.class_name) for i in seg.instances] == [(2, "car"), (1, "car")]


CAR_C, PERSON_C, ROAD_C = 1, 6, 9  # SemanticKITTI's 19 classes


def frame_of(*parts):
    """One frame from (n points, gt class, gt id, predicted class, predicted id) runs."""
    cols = np.concatenate([np.full((n, 4), (gs, gi, ps, pi), np.int64) for n, gs, gi, ps, pi in parts]).T
    gt_sem, gt_inst, pred_sem, pred_inst = cols
    return dict(pred_sem=pred_sem, pred_inst=pred_inst, gt_sem=gt_sem, gt_inst=gt_inst)


def test_lstq_reference_self_test():
    """4D-PLS eval_np.py's own case (min_points 1): a car with id 1, trucks with ids 1 and 2, 5 points each;
    predicted: car id 1 right, one id 2 over both trucks, the second truck's class wrong (car).
    Tubes car/1, truck/1, truck/2: 1 + 1/2 + 1/2 -> S_assoc 2/3; IoU car 5/10, truck 5/10 -> S_cls 1/2;
    LSTQ sqrt(1/3). The reference itself skips predicted id 1 (car tube 0 -> S_assoc 1/3): reproduced by the flag."""
    runs = [(5, 0, 0, 0, 0), (5, 1, 1, 1, 1), (5, 2, 1, 2, 2), (5, 2, 2, 1, 2)]
    ev = LSTQEvaluator(num_classes=2, min_points=1)
    ev.add(**frame_of(*runs))
    r = ev.compute()
    assert (r.s_assoc, r.s_cls, r.gt_tubes, r.pred_tubes) == (pytest.approx(2 / 3, abs=1e-12), 0.5, 3, 2)
    assert r.lstq == pytest.approx(math.sqrt(1 / 3), abs=1e-9)
    assert r.iou_per_class == [0.5, 0.5]
    quirk = LSTQEvaluator(num_classes=2, min_points=1, skip_prediction_id_1=True)
    quirk.add(**frame_of(*runs))
    assert quirk.compute().lstq == pytest.approx(math.sqrt(1 / 3 * 1 / 2), abs=1e-9)


def test_lstq_perfect_prediction_with_ids_shared_across_classes():
    """A car and a person both carry ground-truth id 1 (SemanticKITTI reuses ids across classes), 60 points each
    in two frames, predicted perfectly (ids 4 and 5). Two tubes, each matched whole: LSTQ 1 (keyed by id alone
    they were one tube of 240 points: S_assoc 1/2, LSTQ 0.707). The unlabelled points' stray class and id count
    nowhere."""
    ev = LSTQEvaluator(num_classes=19)
    for _ in range(2):
        ev.add(**frame_of((60, CAR_C, 1, CAR_C, 4), (60, PERSON_C, 1, PERSON_C, 5), (10, ROAD_C, 0, ROAD_C, 0),
                          (5, 0, 0, CAR_C, 7)))
    r = ev.compute()
    assert r.lstq == pytest.approx(1.0, abs=1e-9)
    assert (r.s_assoc, r.s_cls, r.gt_tubes, r.pred_tubes, r.id_switches) == (1.0, 1.0, 2, 2, 0)


def test_lstq_id_swap_and_min_points():
    """Car/1 and person/1, 60 points each per frame, swap predicted ids 10 and 20 between two frames; car/2 has 40
    points in frame 1 (at most 50: left out, its predicted id 10 too) and 80 in frame 2 (id 30).
    Pred 10 = 60 + 60 = 120 points, pred 20 = 120. Car/1 (120): 60 * 60/180 twice = 40, / 120 = 1/3; person/1
    the same; car/2 (80): 80 * 1 / 80 = 1. S_assoc = (1/3 + 1/3 + 1) / 3 = 5/9, S_cls 1, LSTQ sqrt(5/9);
    2 id switches."""
    ev = LSTQEvaluator(num_classes=19)
    ev.add(**frame_of((60, CAR_C, 1, CAR_C, 10), (60, PERSON_C, 1, PERSON_C, 20), (40, CAR_C, 2, CAR_C, 10)))
    ev.add(**frame_of((60, CAR_C, 1, CAR_C, 20), (60, PERSON_C, 1, PERSON_C, 10), (80, CAR_C, 2, CAR_C, 30)))
    r = ev.compute()
    assert r.s_assoc == pytest.approx(5 / 9, abs=1e-12)
    assert r.lstq == pytest.approx(math.sqrt(5 / 9), abs=1e-9)
    assert (r.s_cls, r.gt_tubes, r.pred_tubes, r.id_switches) == (1.0, 3, 3, 2)


def test_lstq_untracked_control_and_class_0_predictions():
    """Ids numbered afresh per frame, as a segmenter without a tracker gives them: car/1 60 then 100 points,
    person/1 80 and 80; frame 1 car -> 1, person -> 2; frame 2 person -> 1, car -> 2. Pred 1 = 60 + 80 = 140,
    pred 2 = 80 + 100 = 180. Car (160): 60 * 60/240 + 100 * 100/240 = 170/3, / 160 = 17/48; person (160):
    80 * 80/220 + 80 * 80/260 = 7680/143, / 160 = 48/143. Two of 10 road points predicted class 0: road IoU 8/10,
    and class 0 present with IoU 0 as in the reference: S_cls = (1 + 1 + 0.8 + 0) / 4 = 0.7
    (without class 0: 2.8 / 3)."""
    frames = [frame_of((60, CAR_C, 1, CAR_C, 1), (80, PERSON_C, 1, PERSON_C, 2), (8, ROAD_C, 0, ROAD_C, 0),
                       (2, ROAD_C, 0, 0, 0)),
              frame_of((100, CAR_C, 1, CAR_C, 2), (80, PERSON_C, 1, PERSON_C, 1))]
    s_assoc = (17 / 48 + 48 / 143) / 2
    for class0, s_cls in ((True, 0.7), (False, 2.8 / 3)):
        ev = LSTQEvaluator(num_classes=19, class0_in_s_cls=class0)
        for f in frames:
            ev.add(**f)
        r = ev.compute()
        assert r.s_assoc == pytest.approx(s_assoc, abs=1e-12)
        assert r.s_cls == pytest.approx(s_cls, abs=1e-12)
        assert r.lstq == pytest.approx(math.sqrt(s_assoc * s_cls), abs=1e-9)
        assert r.id_switches == 2


def test_lstq_pools_sequences_as_the_benchmark():
    """Tubes of two sequences are pooled (mean over all tubes), ids of one sequence never meet the other's: the
    same ids in sequence b are other objects. a: car/1 tracked (1); b: car/1 split over ids 1 and 2 (1/2)."""
    ev = LSTQEvaluator(num_classes=19)
    for seq, ids in (("a", (1, 1)), ("b", (1, 2))):
        for pid in ids:
            ev.add(**frame_of((60, CAR_C, 1, CAR_C, pid)), sequence=seq)
    r = ev.compute()
    assert (r.s_assoc, r.gt_tubes, r.pred_tubes, r.sequences) == (pytest.approx(0.75, abs=1e-12), 2, 3, 2)


def test_lstq_hand_computed():
    """Two frames, one car tube t (8 points) and road, every tube kept (min_points 0). Frame 1: pred id 7 on 3
    of t's points, id 8 on 1, and one of the two road points predicted car. Frame 2: pred id 8 on all 4 of t's
    points. S_assoc = 1/8 (3 * 3/8 + 5 * 5/8) = 34/64; IoU car = 8/9, road = 1/2, S_cls = 25/36;
    LSTQ = sqrt(34/64 * 25/36); one id switch (t matched to 7, then to 8)."""
    ev = LSTQEvaluator(num_classes=9, min_points=0)
    ev.add(pred_sem=[1, 1, 1, 1, 9, 1], pred_inst=[7, 7, 7, 8, 0, 0],
           gt_sem=[1, 1, 1, 1, 9, 9], gt_inst=[5, 5, 5, 5, 0, 0])
    ev.add(pred_sem=[1, 1, 1, 1], pred_inst=[8, 8, 8, 8], gt_sem=[1, 1, 1, 1], gt_inst=[5, 5, 5, 5])
    r = ev.compute()
    assert r.s_assoc == pytest.approx(34 / 64)
    assert r.s_cls == pytest.approx((8 / 9 + 1 / 2) / 2)
    assert r.lstq == pytest.approx(math.sqrt(34 / 64 * 25 / 36))
    assert (r.id_switches, r.gt_tubes, r.pred_tubes, r.frames) == (1, 1, 2, 2)


def test_lstq_ignores_unlabelled_points():
    ev = LSTQEvaluator(num_classes=9, min_points=0)
    # the ignore point (gt 0) carries a stray predicted id and class
    ev.add(pred_sem=[1, 1, 9, 1], pred_inst=[3, 3, 0, 4], gt_sem=[1, 1, 9, 0], gt_inst=[2, 2, 0, 0])
    r = ev.compute()
    assert (r.lstq, r.gt_tubes, r.pred_tubes) == (pytest.approx(1.0), 1, 1)


def reference_lstq(frames, num_classes, min_points=50):
    """LSTQ written out from the benchmark's definition, independently of LSTQEvaluator: ``frames`` are
    (sequence, pred_sem, pred_inst, gt_sem, gt_inst); per sequence the kept points of all frames are
    concatenated and every tube's overlaps read off with boolean masks."""
    conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    kept = {}
    for seq, ps, pi, gs, gi in frames:
        np.add.at(conf, (ps, gs), 1)
        lab = gs != 0
        tube = np.where(gi[lab] > 0, gs[lab] * 65536 + gi[lab], 0)
        pred = pi[lab]
        small = [t for t in set(tube[tube > 0].tolist()) if (tube == t).sum() <= min_points]
        keep = ~np.isin(tube, small)
        kept.setdefault(seq, []).append((pred[keep], tube[keep]))
    total, n_tubes = 0.0, 0
    for parts in kept.values():
        pred = np.concatenate([p for p, _ in parts])
        tube = np.concatenate([t for _, t in parts])
        for t in set(tube[tube > 0].tolist()):
            in_t = tube == t
            inner = 0.0
            for p in set(pred[in_t & (pred > 0)].tolist()):
                tpa = np.sum(in_t & (pred == p))
                inner += tpa * tpa / (in_t.sum() + np.sum(pred == p) - tpa)
            total += inner / in_t.sum()
            n_tubes += 1
    conf[:, 0] = 0
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    s_cls = np.sum(tp[union > 0] / union[union > 0]) / np.count_nonzero(union)
    return math.sqrt(total / n_tubes * s_cls)


def test_lstq_equals_the_reference_on_real_sequences():
    """semantickitti_mini 00 (14 objects, people) and 07 (parked rows; ids shared by cars and other classes),
    ten frames each: ground truth with ids numbered afresh per frame (untracked), 3 % of the labelled points'
    classes replaced at random (class 0 among them) and 2 % of the thing points' ids too; pooled as the
    benchmark pools sequences. Equal to the definition to 1e-9."""
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation

    label_set = get_label_set("semantickitti")
    rng = np.random.default_rng(3)
    frames = []
    for seq in ("00", "07"):
        for f in load_semantickitti(require_data("semantickitti_mini", "sequences", seq), images=False):
            seg = oracle_segmentation(f, label_set)
            gt_sem, _ = label_set.split(f.gt_labels)
            pred_sem, pred_inst = seg.label.astype(np.int64), seg.instance.astype(np.int64)
            flip = rng.random(len(pred_sem)) < 0.03
            pred_sem[flip] = rng.integers(0, 20, flip.sum())
            move = (pred_inst > 0) & (rng.random(len(pred_sem)) < 0.02)
            pred_inst[move] = rng.integers(1, 30, move.sum())
            frames.append((seq, pred_sem, pred_inst, gt_sem.astype(np.int64), np.asarray(f.gt_labels, np.int64) >> 16))
    ev = LSTQEvaluator(label_set.num_classes)
    for seq, *arrays in frames:
        ev.add(*arrays, sequence=seq)
    r = ev.compute()
    assert r.frames == 20 and r.gt_tubes > 30 and 0.1 < r.lstq < 0.99
    assert r.lstq == pytest.approx(reference_lstq(frames, label_set.num_classes), abs=1e-9)


def test_oracle_keeps_objects_sharing_an_id_apart():
    """Sequence 07 scan 000000 has ids that a car and another class share: the oracle segmentation gives them
    instances of their own (one instance per (class, id) with points), so each gt tube is one predicted id."""
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation, tube_keys

    label_set = get_label_set("semantickitti")
    frame = load_semantickitti(require_data("semantickitti_mini", "sequences", "07"), [0], images=False)[0]
    gt_sem, _ = label_set.split(frame.gt_labels)
    raw = np.asarray(frame.gt_labels, np.int64) >> 16
    keys = tube_keys(gt_sem, raw)
    thing = label_set.thing_mask[gt_sem] & (keys > 0)
    assert len(np.unique(keys[thing])) > len(np.unique(raw[thing]))  # the case exists in the data
    seg = oracle_segmentation(frame, label_set)
    pairs = set(zip(keys[thing].tolist(), seg.instance[thing].tolist()))
    assert len(pairs) == len({k for k, _ in pairs}) == len({i for _, i in pairs})


def test_real_scans_with_ground_truth_instances_track_without_switches():
    """SemanticKITTI 00 scans 000000 -> 000001 (instance ids consistent over the sequence), ground truth as the
    segmentation with ids numbered afresh per frame, tracked in the world frame of poses.txt."""
    from sal_ros.data.datasets import load_semantickitti, semantickitti_poses
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation, track_and_evaluate

    seq = require_data("semantickitti", "sequences", "00")
    frames = load_semantickitti(seq, images=False)
    assert len(frames) == 2
    label_set = get_label_set("semantickitti")
    result = track_and_evaluate(frames, lambda f: oracle_segmentation(f, label_set), label_set,
                                semantickitti_poses(seq))["all"]
    assert result.gt_tubes >= 10
    assert result.id_switches == 0
    assert result.lstq == pytest.approx(1.0, abs=1e-12)
    # the same segmentations without the tracker (ids afresh per frame) are not consistent over time
    ev = LSTQEvaluator(label_set.num_classes)
    for f in frames:
        seg = oracle_segmentation(f, label_set)
        ev.add(seg.label, seg.instance, *label_set.split(f.gt_labels)[:1], np.asarray(f.gt_labels, np.int64) >> 16)
    untracked = ev.compute()
    assert untracked.s_assoc < 0.9 and untracked.id_switches > 0


def test_poses_are_matched_to_scans_by_scan_number():
    """Scans 5-9 of semantickitti_mini 01 (highway, the car drives ~1 m per frame) tracked alone: every box centre in the world
    frame is where the run over scans 0-9 puts it (poses by list position would put scan 5 at scan 0's pose,
    metres off). A sequence with poses but none for a scan is an error, not a silent sensor-frame scan."""
    from sal_ros.core.errors import SensorDataError
    from sal_ros.data.datasets import load_semantickitti, semantickitti_poses
    from sal_ros.data.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation, track_and_evaluate

    seq = require_data("semantickitti_mini", "sequences", "01")
    label_set = get_label_set("semantickitti")
    poses = semantickitti_poses(seq)
    oracle = lambda f: oracle_segmentation(f, label_set)  # noqa: E731

    def centres(scans):
        trajectories = {}
        track_and_evaluate(load_semantickitti(seq, scans, images=False), oracle, label_set, poses,
                           trajectories=trajectories)
        out = {}
        for steps in trajectories.values():
            for key, x, y in steps:
                out.setdefault(key, []).append((x, y))
        return {key: sorted(xy) for key, xy in out.items()}

    part, whole = centres(range(5, 10)), centres(range(10))
    assert sorted(part) == [f"01_{i:06d}" for i in range(5, 10)]
    for key, xy in part.items():
        assert np.allclose(xy, whole[key], atol=1e-9), key
    assert np.linalg.norm(poses["01_000005"][:3, 3] - poses["01_000000"][:3, 3]) > 4.0  # the test can tell
    without_last = {k: v for k, v in poses.items() if k != "01_000009"}
    with pytest.raises(SensorDataError, match="no pose for scan 01_000009"):
        track_and_evaluate(load_semantickitti(seq, [8, 9], images=False), oracle, label_set, without_last)


def test_eval_tracking_command_writes_lstq_and_id_switches(tmp_path):
    import json

    from sal_ros.cli import main

    seq = require_data("semantickitti", "sequences", "00")
    assert main(["eval", "tracking", "--dataset", str(seq), "--oracle", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tracking.json").read_text())
    assert (report["lstq"], report["id_switches"], report["frames"]) == (1.0, 0, 2)
    assert report["meta"]["tracking_frame"] == "world (poses.txt)"
    assert "LSTQ 100.0" in (tmp_path / "tracking.md").read_text()
    assert (tmp_path / "tracks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the untracked control: the oracle's per-frame ids as they come
    assert main(["eval", "tracking", "--dataset", str(seq), "--oracle", "--no-tracker", "--out",
                 str(tmp_path / "untracked")]) == 0
    untracked = json.loads((tmp_path / "untracked" / "tracking.json").read_text())
    assert untracked["s_assoc"] < 0.9 and untracked["id_switches"] > 0 and untracked["s_cls"] == 1.0


def test_eval_tracking_command_over_several_sequences(tmp_path):
    """The mini root: each sequence tracked on its own, per-sequence rows and the pooled score (tubes of all
    sequences, ids of one sequence never linked to another's)."""
    import json

    from sal_ros.cli import main

    root = require_data("semantickitti_mini")
    assert main(["eval", "tracking", "--dataset", str(root), "--oracle", "--max-frames", "3",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tracking.json").read_text())
    per = report["per_sequence"]
    assert sorted(per) == ["00", "01", "02", "03", "05", "07", "09", "10"]
    assert report["frames"] == 24 and all(r["frames"] == 3 for r in per.values())
    assert report["gt_tubes"] == sum(r["gt_tubes"] for r in per.values())
    assert report["s_cls"] == 1.0 and report["sequences"] == 8
    assert "| 07 |" in (tmp_path / "tracking.md").read_text()


def test_instances_carry_their_querys_ranked_classes():
    """Query tokens against three class embeddings: softmax(100 x cosine) ranks each instance's classes."""
    import torch

    from sal_ros.core.panoptic import panoptic_from_queries
    from sal_ros.model.inference import class_similarity, rank_classes

    emb = torch.eye(3)
    tokens = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0]])  # query 0 ~ class 0, query 1 ~ class 2
    per_class = class_similarity(tokens, emb, torch.arange(3), 3)
    top, prob = rank_classes(per_class, k=2)
    assert top.tolist() == [[0, 1], [2, 1]]
    cos = torch.nn.functional.normalize(tokens, dim=-1)
    assert prob[0, 0] == pytest.approx(float((100 * cos[0]).softmax(0)[0]), rel=1e-5)
    query = np.array([0, 0, 1, 1, 1])
    points = np.arange(15, dtype=np.float32).reshape(5, 3)
    seg = panoptic_from_queries(query, np.ones(5, np.float32), per_class.argmax(1).numpy(), np.ones(3, bool), points,
                                ("car", "truck", "bus"), query_rank=(top, prob))
    assert [(i.label, [c for c, _ in i.class_scores]) for i in seg.instances] == [(1, [1, 2]), (3, [3, 2])]


def test_class_distribution_smoothed_over_a_track():
    """Votes are the instance's normalized top-class probabilities, blended with memory 0.5."""
    tracker = Tracker(TrackerConfig(class_memory=0.5))
    first = inst(1, 0.0, 0.0, label=1)
    first.class_scores = ((1, 0.6), (2, 0.2))  # -> votes car 0.75, truck 0.25
    tracker.update([first], 0)
    second = inst(1, 0.0, 0.0, label=2)
    second.class_scores = ((2, 0.9), (1, 0.1))  # -> car 0.1, truck 0.9; blended: car 0.425, truck 0.575
    tracked = tracker.update([second], 100_000_000).by_instance[1]
    assert tracked.label == 2
    assert [c for c, _ in tracked.classes] == [2, 1]
    assert [s for _, s in tracked.classes] == pytest.approx([0.575, 0.425])


def test_eval_tracking_with_a_checkpoint(tmp_path):
    """The same evaluation on a model's segmentation (tiny random-weight checkpoint: plumbing, not quality)."""
    import json

    from conftest import REPO, save_tiny_checkpoint
    from sal_ros.cli import main

    seq = require_data("semantickitti", "sequences", "00")
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    assert main(["eval", "tracking", "--dataset", str(seq), "--checkpoint", str(checkpoint), "--vocabulary",
                 str(REPO / "config" / "vocabulary_semantickitti_names.yaml"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "tracking.json").read_text())
    # 14 instances, 11 with more than 50 points in a frame (the benchmark's minimum)
    assert report["frames"] == 2 and report["gt_tubes"] == 11 and 0.0 <= report["lstq"] < 1.0
    assert report["meta"]["segmentation"] == str(checkpoint)
