"""The pseudo-label file: round trip, atomic writes, validation errors."""
import json
import os
import zipfile

import numpy as np
import pytest

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import TMP_PREFIX
from sal_ros.data.pseudolabels import (PseudoLabels, load_pseudolabels, pseudolabel_path,
                                       save_pseudolabels)


def _labels(n=100, k=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    in_frustum = rng.random(n) < 0.6
    instance = np.where(in_frustum, rng.integers(0, k + 1, n), 0).astype(np.uint32)
    tokens = rng.normal(size=(k, d))
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    return PseudoLabels(instance, tokens, rng.random(k), np.array([1, 2, 3]), in_frustum,
                        {"camera_names": ["CAM_FRONT", "CAM_FRONT_LEFT"], "mask_source": {"source": "slic"}})


def test_round_trip(tmp_path):
    pl = _labels()
    path = save_pseudolabels(pseudolabel_path(tmp_path, "00_000000"), pl)
    assert path.name == "00_000000.npz"
    back = load_pseudolabels(path, num_points=100)
    np.testing.assert_array_equal(back.instance, pl.instance)
    np.testing.assert_array_equal(back.tokens, pl.tokens)
    assert back.tokens.dtype == np.float16 and back.instance.dtype == np.uint32
    np.testing.assert_array_equal(back.in_frustum, pl.in_frustum)
    assert back.meta["mask_source"] == {"source": "slic"} and back.meta["format_version"] == 1
    assert back.instance_cameras(3) == ["CAM_FRONT", "CAM_FRONT_LEFT"]
    assert back.instance_cameras(1) == ["CAM_FRONT"]
    assert 0 < back.coverage <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = save_pseudolabels(tmp_path / "a.npz", _labels(seed=1))
    before = path.read_bytes()

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_pseudolabels(path, _labels(seed=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no temp file left


@pytest.mark.parametrize("change, message", [
    (dict(instance=np.full(100, 9, np.uint32)), "instance id 9"),
    (dict(scores=np.zeros(2, np.float32)), "3 tokens but 2 scores"),
    (dict(in_frustum=np.ones(5, bool)), "in_frustum has 5"),
    (dict(tokens=np.zeros(3)), "tokens must be"),
])
def test_invalid_labels_rejected(change, message):
    pl = _labels()
    fields = dict(instance=pl.instance, tokens=pl.tokens, scores=pl.scores, cameras=pl.cameras,
                  in_frustum=pl.in_frustum)
    fields.update(change)
    with pytest.raises(SensorDataError, match=message):
        PseudoLabels(**fields)


def test_labels_outside_frustum_rejected():
    pl = _labels()
    bad = pl.in_frustum.copy()
    bad[np.flatnonzero(pl.instance)[0]] = False
    with pytest.raises(SensorDataError, match="outside every camera frustum"):
        PseudoLabels(pl.instance, pl.tokens, pl.scores, pl.cameras, bad)


def test_reader_errors_name_the_file(tmp_path):
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(SensorDataError, match="g.npz"):
        load_pseudolabels(garbage)
    other = tmp_path / "o.npz"
    np.savez(other, instance=np.zeros(3, np.uint32))
    with pytest.raises(SensorDataError, match="missing tokens"):
        load_pseudolabels(other)
    path = save_pseudolabels(tmp_path / "v.npz", _labels())
    with pytest.raises(SensorDataError, match="100 points, the frame has 7"):
        load_pseudolabels(path, num_points=7)
    # A future format version is refused rather than misread.
    with zipfile.ZipFile(path) as z:
        arrays = {n[:-4]: np.load(z.open(n)) for n in z.namelist()}
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(SensorDataError, match="version 99"):
        load_pseudolabels(tmp_path / "f.npz")
    with pytest.raises(FileNotFoundError):
        load_pseudolabels(tmp_path / "missing.npz")
    with pytest.raises(ValueError):
        pseudolabel_path(tmp_path, "../escape")
