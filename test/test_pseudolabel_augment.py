"""Augmentation-based consolidation (augmentation.py): a mask source run on flipped / scaled / cropped copies of the
image, masks mapped back onto the original pixels and voted; a no-op for sources that do not read the image."""
import json

import numpy as np
import pytest
from conftest import require_data

from sal_ros.pseudolabel.augmentation import AugmentConfig, AugmentedMasks, augmentations, augmented
from sal_ros.pseudolabel.engine import EngineConfig, run
from sal_ros.pseudolabel.masks import Masks


class BrightMasks:
    """The bright pixels as one mask; with ``phantom`` also a box at the top-left corner of whatever it is given
    (an answer that depends on the framing, not on the scene)."""

    name = "bright"

    def __init__(self, phantom: bool = False) -> None:
        self.phantom, self.calls = phantom, 0

    def generate(self, image: np.ndarray) -> Masks:
        self.calls += 1
        masks = [image[..., 0] > 128]
        if self.phantom:
            box = np.zeros(masks[0].shape, bool)
            box[:20, :30] = True
            masks.append(box)
        return Masks(np.stack(masks), np.ones(len(masks), np.float32))


def scene() -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((120, 200, 3), np.uint8)
    img[40:90, 120:180] = 255
    img[20:35, 60:80] = 200
    return img, img[..., 0] > 128


def test_each_augmentation_maps_its_pixels_back_onto_where_they_came_from():
    h, w = 97, 173
    index = (np.arange(h)[:, None] * w + np.arange(w)[None, :]).astype(np.int64)
    for aug in augmentations(AugmentConfig(k=6, scale=(0.6, 1.4), crop=0.7, seed=3), h, w):
        back, seen = aug.invert_labels(aug.apply(index[..., None])[..., 0], (h, w))
        assert seen.sum() == (aug.r1 - aug.r0) * (aug.c1 - aug.c0) and np.all(back[~seen] == -1)
        rows, cols = np.divmod(back[seen], w)
        r_true, c_true = np.nonzero(seen)
        step = max((aug.r1 - aug.r0) / aug.out_hw[0], (aug.c1 - aug.c0) / aug.out_hw[1])
        assert np.abs(rows - r_true).max() <= step and np.abs(cols - c_true).max() <= step  # nearest, not mirrored


def test_an_answer_that_follows_the_framing_is_voted_out_and_the_object_kept():
    img, truth = scene()
    plain = BrightMasks(phantom=True).generate(img)
    assert len(plain) == 2  # the source alone keeps the phantom box
    # k=4, uncropped: all runs see the corner and two of the three augmented ones are mirrored: at most 2 votes of 4
    for config in (AugmentConfig(k=2, scale=(1.0, 1.0), crop=1.0), AugmentConfig(k=4, crop=1.0, seed=1)):
        source = BrightMasks(phantom=True)
        out = AugmentedMasks(source, config).generate(img)
        assert source.calls == config.k
        assert len(out) == 1
        iou = (out.masks[0] & truth).sum() / (out.masks[0] | truth).sum()
        assert iou > 0.97
        assert out.scores[0] == pytest.approx(1.0)


def test_a_pixel_takes_the_label_most_runs_give_it():
    img, truth = scene()

    class Shifting(BrightMasks):  # every other call the mask grows by 6 columns: a noisy border
        def generate(self, image):
            m = super().generate(image)
            if self.calls % 2 == 0:
                m = Masks(np.pad(m.masks, ((0, 0), (0, 0), (0, 6)))[:, :, 6:] | m.masks, m.scores)
            return m

    out = AugmentedMasks(Shifting(), AugmentConfig(k=3, scale=(1.0, 1.0), crop=1.0, flip=False)).generate(img)
    assert np.array_equal(out.masks[0], truth)  # 2 runs of 3 say the border pixels are not the object


def test_sources_that_cannot_vary_are_left_alone():
    from sal_ros.pseudolabel.geometric import GeometricMasks

    geometric = GeometricMasks()
    assert augmented(geometric, AugmentConfig(k=4)) is geometric  # reads the points, not the image
    bright = BrightMasks()
    assert augmented(bright, AugmentConfig(k=1)) is bright and augmented(bright, None) is bright  # off
    assert isinstance(augmented(bright, AugmentConfig(k=3)), AugmentedMasks)


def test_off_by_default_keeps_the_old_files_valid_and_on_is_another_configuration():
    import hashlib

    cfg = EngineConfig(masks="slic", tokens=False)
    old = cfg.to_dict()
    old.pop("device"), old.pop("augment")  # what the hash covered before augmentation existed
    assert cfg.config_hash() == hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:12]
    on = EngineConfig(masks="slic", tokens=False, augment=AugmentConfig(k=3).to_dict())
    assert on.config_hash() != cfg.config_hash()


def test_pseudolabel_command_votes_slic_over_augmentations_on_a_real_scan(tmp_path, capsys):
    from sal_ros.cli import main
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path

    seq = require_data("semantickitti_mini", "sequences", "10")
    args = ["pseudolabel", str(seq), "--masks", "slic", "--no-tokens", "--max-frames", "1", "--no-progress",
            "--out", str(tmp_path / "plain")]
    assert main(args) == 0
    plain = load_pseudolabels(pseudolabel_path(tmp_path / "plain", "10_000000"))
    voted_args = [*args[:-1], str(tmp_path / "voted"), "--augment", "3"]
    assert main(voted_args) == 0
    capsys.readouterr()
    voted = load_pseudolabels(pseudolabel_path(tmp_path / "voted", "10_000000"))
    assert voted.meta["config"]["augment"]["k"] == 3
    assert voted.meta["mask_source"]["augment"]["k"] == 3
    assert 0 < voted.num_instances and not np.array_equal(voted.instance, plain.instance)
    assert main(voted_args) == 0  # cached: a second run skips the finished scan
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1


def test_engine_run_refuses_files_voted_another_way(tmp_path):
    from sal_ros.core.errors import SensorDataError

    seq = require_data("semantickitti_mini", "sequences", "10")
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 40}, tokens=False,
                       augment=AugmentConfig(k=2).to_dict())
    assert run(seq, cfg, tmp_path, max_frames=1, progress=False).done == 1
    with pytest.raises(SensorDataError, match="another configuration"):
        run(seq, EngineConfig(masks="slic", mask_options={"n_segments": 40}, tokens=False), tmp_path,
            max_frames=1, progress=False)
