"""Means over classes follow semantic-kitti-api (an absent class scores 0), the present-classes means are kept
under their own names (issue 14 item 12)."""
import json

import numpy as np
import pytest

from sal_ros.eval.panoptic import PanopticEvaluator
from sal_ros.eval.confusion import ConfusionMatrix


def test_an_absent_class_scores_zero_in_the_means_by_hand():
    # car 100 points predicted exactly, road exactly, bicycle (class 3) never occurs on either side
    gt_sem = np.r_[np.full(100, 1), np.full(100, 2)]
    gt_inst = np.r_[np.full(100, 5), np.zeros(100, int)]
    ev = PanopticEvaluator(3, things=(1, 3), min_points=10, class_names=("car", "road", "bicycle"))
    ev.add(gt_sem, gt_inst, gt_sem, gt_inst)
    r = ev.compute()
    assert np.isnan(r.pq[2]) and np.isnan(r.iou[2])  # per class: absent, not zero
    s = r.summary
    assert s["pq"] == pytest.approx(2 / 3) and s["miou"] == pytest.approx(2 / 3)
    assert s["pq_things"] == pytest.approx(1 / 2) and s["pq_stuff"] == 1.0
    assert s["pq_present"] == 1.0 and s["miou_present"] == 1.0 and s["pq_things_present"] == 1.0
    assert s["classes_present"] == 2
    data = r.to_dict()
    assert "semantic-kitti-api" in data["mean_convention"] and data["per_class"][2]["pq"] is None
    json.dumps(data)  # JSON-clean


def test_confusion_miou_conventions():
    cm = ConfusionMatrix(3)
    cm.add(np.array([1, 1, 2, 0]), np.array([1, 1, 2, 0]))  # class 3 absent, 0 is ignore
    assert cm.miou() == pytest.approx(2 / 3)
    assert cm.miou(present_only=True) == 1.0


def test_ground_truth_against_itself_on_the_real_scans(semantickitti_dir):
    """The issue's case: 19-class means of ground truth vs itself were 100 here, 63.2 in semantic-kitti-api.
    Reference here: the share of the 19 classes that occur in these 2 scans, counted independently."""
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.labels import semantickitti

    ls = semantickitti()
    ev = PanopticEvaluator.for_label_set(ls)
    present = set()
    for frame in load_semantickitti(semantickitti_dir / "sequences" / "00"):
        sem, inst = ls.split(frame.gt_labels)
        ev.add(sem, inst, sem, inst)
        present |= set(np.unique(sem[sem > 0]).tolist())
    s = ev.compute().summary
    assert 0 < len(present) < 19
    assert s["miou"] == pytest.approx(len(present) / 19) and s["miou_present"] == 1.0
    assert s["pq_present"] == 1.0 and s["pq"] < 0.7
