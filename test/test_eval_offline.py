"""Zero-shot evaluation path: vocabulary labels -> dataset classes on the real SemanticKITTI frames."""
import numpy as np

from sal_ros.core.types import Segmentation
from sal_ros.data.labels import semantickitti
from sal_ros.eval.offline import evaluate_frames

# vocabulary order differs from the dataset's; "sedan" and "street" are synonyms; "sky" has no dataset class
VOCAB = ("street", "sedan", "sky", *[c for c in semantickitti().class_names if c not in ("road", "car")])
CLASS_MAP = {"street": "road", "sedan": "car"}


def _as_vocabulary_segmentation(frame, label_set, stuff_instances: bool) -> Segmentation:
    """What a perfect segmenter with VOCAB would output; stuff keeps per-class ids when stuff_instances."""
    sem, seg = label_set.split(frame.gt_labels)
    names = ["road" if n == "street" else "car" if n == "sedan" else n for n in VOCAB]
    to_vocab = np.zeros(label_set.num_classes + 1, np.int64)
    for k, name in enumerate(names, start=1):
        if name in label_set.class_names:
            to_vocab[label_set.class_id(name)] = k
    label = to_vocab[sem]
    instance = np.where(label_set.thing_mask[sem] | stuff_instances, np.unique(seg, return_inverse=True)[1] + 1, 0)
    return Segmentation(label.astype(np.uint16), instance.astype(np.uint32), np.ones(len(sem), np.float32),
                        class_names=VOCAB)


def test_perfect_zero_shot_output_scores_one(semantickitti_dir):
    from sal_ros.data.datasets import load_semantickitti

    frames = load_semantickitti(semantickitti_dir / "sequences" / "00")
    ls = semantickitti()
    # Stuff with instance ids (as a raw query output) is merged to one segment per class by the evaluation,
    # except where ground truth itself splits a class (road 40 vs lane-marking 60 are two GT segments).
    ev, stats = evaluate_frames(lambda f: _as_vocabulary_segmentation(f, ls, True), frames, ls, CLASS_MAP,
                                progress=False)
    r = ev.compute()
    merged, _ = evaluate_frames(lambda f: _as_vocabulary_segmentation(f, ls, False), frames, ls, CLASS_MAP,
                                progress=False)
    assert merged.compute().summary == r.summary
    assert stats["frames"] == 2 and stats["vocabulary_to_dataset"]["sedan"] == "car"
    assert stats["vocabulary_to_dataset"]["sky"] is None
    assert r.summary["miou_present"] == 1.0 and r.summary["pq_things_present"] == 1.0
    road = ls.class_id("road") - 1
    assert r.iou[road] == 1.0 and r.tp[road] >= 1
    assert r.summary["pq_present"] > 0.9


def test_frustum_only_scores_just_the_points_a_camera_sees(semantickitti_dir):
    """Wrong labels outside the camera frustum cost the whole-scan score, not the frustum score."""
    from sal_ros.core.camera import in_camera_frustum
    from sal_ros.data.datasets import load_semantickitti

    frames = list(load_semantickitti(semantickitti_dir / "sequences" / "00"))
    ls = semantickitti()

    def outside_wrong(frame):
        seg = _as_vocabulary_segmentation(frame, ls, False)
        seg.label[~in_camera_frustum(frame)] = VOCAB.index("sky") + 1
        return seg

    assert 19_000 < in_camera_frustum(frames[0]).sum() < 20_000  # 19,362 points project into image_0 (depth >= 1 m)
    frustum, _ = evaluate_frames(outside_wrong, frames, ls, CLASS_MAP, progress=False, frustum_only=True)
    scan, _ = evaluate_frames(outside_wrong, frames, ls, CLASS_MAP, progress=False)
    assert frustum.compute().summary["miou_present"] == 1.0
    assert scan.compute().summary["miou_present"] < 0.9
