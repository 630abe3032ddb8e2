"""Oracle parts of the pseudo-label path on real mini frames: the ``oracle`` mask source through the engine (with a
selection), oracle tokens (the text embedding of each pseudo-instance's majority ground-truth class, with noise),
and the supervised reference's full-scan region."""
import numpy as np
import pytest
from conftest import require_data

from sal_ros.data.labels import get_label_set
from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path
from sal_ros.data.sources import iter_source_frames
from sal_ros.pseudolabel.engine import EngineConfig, run
from sal_ros.pseudolabel.oracle import class_text_tokens, majority_class
from sal_ros.train.dataset import load_scans

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training and scoring
ENCODER = {"model": "sal-tiny-text", "pretrained": None}  # a one-layer random tower: milliseconds, 512-d


@pytest.fixture(scope="module")
def oracle_labels(tmp_path_factory):
    mini = require_data("semantickitti_mini")
    out = tmp_path_factory.mktemp("pl")
    summary = run(mini, EngineConfig(masks="oracle", tokens=False), out, select="07:3", progress=False)
    return mini, out, summary


def test_the_oracle_mask_source_labels_only_the_selected_frames(oracle_labels):
    mini, out, summary = oracle_labels
    assert summary.done == 1 and not summary.failed and sorted(p.name for p in out.glob("*.npz")) == ["07_000003.npz"]
    frame = next(iter_source_frames(mini, select="07:3"))
    pl = load_pseudolabels(pseudolabel_path(out, frame.key), frame.num_points)
    assert pl.meta["mask_source"]["source"] == "oracle" and pl.tokens.shape[1] == 0  # tokens off: no CLIP tower
    label_set = get_label_set("semantickitti")
    cls, seg = label_set.split(frame.gt_labels)
    inst = pl.instance.astype(np.int64)
    # each ground-truth car in view is (nearly) one pseudo-instance
    cars = [s for s in np.unique(seg[(cls == 1) & pl.in_frustum]) if ((seg == s) & pl.in_frustum).sum() >= 200]
    assert len(cars) >= 2
    for s in cars:
        pts = (seg == s) & pl.in_frustum & (inst > 0)
        assert np.bincount(inst[pts]).max() / pts.sum() > 0.8


def test_oracle_tokens_name_the_majority_class_through_the_text_encoder(oracle_labels):
    mini, out, _ = oracle_labels
    source = {"frames": str(mini), "select": "07:3", "pseudolabels": str(out), "oracle_tokens": "semantickitti"}
    clean = load_scans([source], text_encoder=ENCODER)[0]
    label_set = get_label_set("semantickitti")
    class_tokens = class_text_tokens(label_set.class_names, ENCODER)
    frame = next(iter_source_frames(mini, select="07:3"))
    cls = label_set.split(frame.gt_labels)[0]
    assert clean.tokens.shape == (clean.instance.max(), 512)
    for k in range(1, clean.instance.max() + 1):
        counts = np.bincount(cls[(clean.instance == k) & (cls > 0)], minlength=20)
        np.testing.assert_array_equal(clean.tokens[k - 1], class_tokens[counts.argmax() - 1])
    pl = load_pseudolabels(pseudolabel_path(out, frame.key), frame.num_points)
    # same segmentation (ids renumbered only where an instance covers ignore-class points alone)
    assert ((clean.instance > 0) == (pl.instance > 0)).mean() > 0.99
    noisy = load_scans([{**source, "token_noise": 0.5}], text_encoder=ENCODER)[0]
    again = load_scans([{**source, "token_noise": 0.5}], text_encoder=ENCODER)[0]
    np.testing.assert_array_equal(noisy.tokens, again.tokens)  # seeded per frame
    cos = (noisy.tokens * clean.tokens).sum(1)
    np.testing.assert_allclose(np.linalg.norm(noisy.tokens, axis=1), 1, atol=1e-5)
    assert 0.8 < cos.mean() < 0.97  # |noise| = 0.5 of a unit token: cos ~ 1 / sqrt(1.25) = 0.89


def test_majority_class_ignores_unlabelled_points():
    inst = np.array([1, 1, 1, 2, 2, 3, 0])
    cls = np.array([5, 5, 9, 0, 7, 0, 3])
    np.testing.assert_array_equal(majority_class(inst, cls, 3), [5, 7, 0])


def test_the_supervised_reference_labels_the_frustum_or_the_full_scan():
    mini = require_data("semantickitti_mini")
    source = {"frames": str(mini), "select": "05:0", "oracle": "semantickitti"}
    frustum = load_scans([source], text_encoder=ENCODER)[0]
    full = load_scans([{**source, "region": "full"}], text_encoder=ENCODER)[0]
    assert full.in_frustum.all() and frustum.in_frustum.mean() < 0.25
    assert (frustum.instance[~frustum.in_frustum] == 0).all()
    outside = ~frustum.in_frustum
    assert (full.instance[outside] > 0).mean() > 0.9  # labelled everywhere but on ignore-class points
    with pytest.raises(ValueError, match="frustum or full"):
        load_scans([{**source, "region": "360"}], text_encoder=ENCODER)
