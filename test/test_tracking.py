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
    """Static objects seen from a sensor moving 3 m per frame: in the sensor frame they jump past the gate."""
    world = [(20.0, 5.0), (30.0, -5.0)]
    ids_sensor, ids_fixed = set(), set()
    sensor_tracker, fixed_tracker = Tracker(), Tracker()
    for k in range(5):
        pose = np.eye(4)
        pose[0, 3] = 3.0 * k  # sensor -> world
        dets = [inst(j + 1, x - 3.0 * k, y) for j, (x, y) in enumerate(world)]
        ids_sensor |= {t.track_id for t in sensor_tracker.update(dets, k * 100_000_000).by_instance.values()}
        ids_fixed |= {t.track_id for t in fixed_tracker.update(dets, k * 100_000_000, pose).by_instance.values()}
    assert ids_fixed == {1, 2}
    assert len(ids_sensor) > 2


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


def test_lstq_hand_computed():
    """Two frames, one car tube t (8 points) and road. Frame 1: pred id 7 on 3 of t's points, id 8 on 1, and one
    of the two road points predicted car. Frame 2: pred id 8 on all 4 of t's points.
    S_assoc = 1/8 (3 * 3/8 + 5 * 5/8) = 34/64; IoU car = 8/9, road = 1/2, S_cls = 25/36;
    LSTQ = sqrt(34/64 * 25/36); one id switch (t matched to 7, then to 8)."""
    ev = LSTQEvaluator(num_classes=9, things=(1,))
    ev.add(pred_sem=[1, 1, 1, 1, 9, 1], pred_inst=[7, 7, 7, 8, 0, 0],
           gt_sem=[1, 1, 1, 1, 9, 9], gt_inst=[5, 5, 5, 5, 0, 0])
    ev.add(pred_sem=[1, 1, 1, 1], pred_inst=[8, 8, 8, 8], gt_sem=[1, 1, 1, 1], gt_inst=[5, 5, 5, 5])
    r = ev.compute()
    assert r.s_assoc == pytest.approx(34 / 64)
    assert r.s_cls == pytest.approx((8 / 9 + 1 / 2) / 2)
    assert r.lstq == pytest.approx(math.sqrt(34 / 64 * 25 / 36))
    assert (r.id_switches, r.gt_tubes, r.pred_tubes, r.frames) == (1, 1, 2, 2)


def test_lstq_ignores_unlabelled_points_and_stuff_instances():
    ev = LSTQEvaluator(num_classes=9, things=(1,))
    # the ignore point (gt 0) carries a stray predicted id; the road's gt instance id is not a tube
    ev.add(pred_sem=[1, 1, 9, 0], pred_inst=[3, 3, 0, 4], gt_sem=[1, 1, 9, 0], gt_inst=[2, 2, 6, 0])
    r = ev.compute()
    assert (r.lstq, r.gt_tubes, r.pred_tubes) == (pytest.approx(1.0), 1, 1)


def test_real_scans_with_ground_truth_instances_track_without_switches():
    """SemanticKITTI 00 scans 000000 -> 000001 (instance ids consistent over the sequence), ground truth as the
    segmentation with ids numbered afresh per frame, tracked in the world frame of poses.txt."""
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.eval.labels import get_label_set
    from sal_ros.eval.tracking import oracle_segmentation, semantickitti_lidar_poses, track_and_evaluate

    seq = require_data("semantickitti", "sequences", "00")
    frames = load_semantickitti(seq, images=False)
    assert len(frames) == 2
    label_set = get_label_set("semantickitti")
    poses = semantickitti_lidar_poses(seq)
    result = track_and_evaluate(frames, lambda f: oracle_segmentation(f, label_set), label_set, poses)
    assert result.gt_tubes >= 10
    assert result.id_switches == 0
    assert result.lstq == pytest.approx(1.0, abs=1e-12)
    # the same segmentations without the tracker (ids afresh per frame) are not consistent over time
    ev = LSTQEvaluator(label_set.num_classes, label_set.things)
    for f in frames:
        seg = oracle_segmentation(f, label_set)
        ev.add(seg.label, seg.instance, *label_set.split(f.gt_labels)[:1], np.asarray(f.gt_labels, np.int64) >> 16)
    untracked = ev.compute()
    assert untracked.s_assoc < 0.9 and untracked.id_switches > 0


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
    assert report["frames"] == 2 and report["gt_tubes"] == 14 and 0.0 <= report["lstq"] < 1.0
    assert report["meta"]["segmentation"] == str(checkpoint)
