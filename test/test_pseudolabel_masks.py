"""Mask sources (SLIC, SAM 2, SAM with random weights at small sizes) and SAL's flatten step."""
import numpy as np
import pytest

from sal_ros.pseudolabel.masks import (Masks, SlicMasks, as_rgb, flatten_masks, label_image,
                                       pairwise_intersections)


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_flatten_keeps_whole_object_over_parts():
    h, w = 40, 60
    car = _box(h, w, 10, 30, 5, 45)
    wheel = _box(h, w, 25, 30, 8, 14)  # inside the car
    window = _box(h, w, 12, 18, 20, 30)  # inside the car, scored higher than the car
    tree = _box(h, w, 0, 40, 46, 60)  # separate
    road_part = _box(h, w, 28, 40, 0, 60)  # overlaps the car a little, not a part of it
    masks = Masks(np.stack([wheel, car, window, tree, road_part]), [0.9, 0.8, 0.99, 0.7, 0.6])
    flat = flatten_masks(masks, min_overlap=0.8)
    kept = {m.tobytes() for m in flat.masks}
    assert car.tobytes() in kept and tree.tobytes() in kept and road_part.tobytes() in kept
    assert wheel.tobytes() not in kept and window.tobytes() not in kept
    assert len(flat) == 3 and flat.scores.dtype == np.float32
    # By score first, the window (0.99) survives and the car, which contains it, goes.
    by_score = {m.tobytes() for m in flatten_masks(masks, 0.8, order="score").masks}
    assert window.tobytes() in by_score and car.tobytes() not in by_score


def test_intersections_match_bruteforce():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 30, 50)) < 0.3
    expect = np.array([[np.sum(a & b) for b in masks] for a in masks])
    np.testing.assert_array_equal(pairwise_intersections(Masks(masks, np.ones(5))), expect)


def test_label_image_smaller_mask_wins():
    big, small = _box(10, 10, 0, 10, 0, 10), _box(10, 10, 2, 4, 2, 4)
    lab = label_image(Masks(np.stack([small, big]), [1, 1]))
    assert lab[3, 3] == 0 and lab[8, 8] == 1
    assert label_image(Masks.empty(4, 5)).min() == -1


def test_as_rgb_conversions():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb(grey).shape == (3, 4, 3)
    assert as_rgb(grey.astype(np.uint16) << 8)[..., 0].tolist() == grey.tolist()
    assert as_rgb(np.ones((2, 2), np.float32)).max() == 255
    from sal_ros.core.errors import SensorDataError

    with pytest.raises(SensorDataError):
        as_rgb(np.zeros((2, 2, 5), np.uint8))


def test_slic_on_real_image(semantickitti_dir):
    from PIL import Image

    path = sorted((semantickitti_dir / "sequences" / "00" / "image_0").glob("*.png"))[0]
    image = np.asarray(Image.open(path))
    masks = SlicMasks(n_segments=100).generate(image)
    assert masks.masks.shape[1:] == image.shape[:2] and masks.masks.dtype == bool
    assert 30 <= len(masks) <= 200
    # Superpixels partition the image: every pixel in exactly one mask.
    np.testing.assert_array_equal(masks.masks.sum(0), 1)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    img = np.full((96, 160, 3), 40, np.uint8)
    img[20:70, 30:90] = (200, 50, 50)
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


def _check(masks, image):
    assert isinstance(masks, Masks)
    assert masks.masks.ndim == 3 and masks.masks.shape[1:] == image.shape[:2]
    assert masks.masks.dtype == bool and masks.scores.shape == (len(masks),)


def test_sam2_random_weights_small(image):
    import torch

    from sal_ros.pseudolabel.masks import Sam2Masks

    torch.manual_seed(0)
    src = Sam2Masks("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", image_size=256, points_per_side=4,
                    pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masks = src.generate(image)
    _check(masks, image)
    assert len(masks) >= 1  # thresholds off: the random model still returns masks
    assert src.identity["image_size"] == 256


def test_sam2_loads_weights_from_a_checkpoint_file(image, tmp_path):
    # The user path (`--sam2-checkpoint FILE`): a file in the SAM 2 release format {"model": state_dict}.
    import torch

    from sal_ros.pseudolabel.masks import Sam2Masks

    kwargs = dict(device="cpu", image_size=256, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    torch.manual_seed(0)
    teacher = Sam2Masks("configs/sam2.1/sam2.1_hiera_t.yaml", None, **kwargs)
    ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": teacher.generator.predictor.model.state_dict()}, ckpt)
    torch.manual_seed(1)  # different random init: only the file can make the two agree
    loaded = Sam2Masks("configs/sam2.1/sam2.1_hiera_t.yaml", str(ckpt), **kwargs)
    a, b = teacher.generate(image), loaded.generate(image)
    assert len(a) >= 1 and np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)
    assert loaded.identity["checkpoint"] == str(ckpt)


def test_sam_random_weights_small(image):
    import torch

    from sal_ros.pseudolabel.masks import SamMasks

    torch.manual_seed(0)
    src = SamMasks("vit_b", None, device="cpu", image_size=128, points_per_side=2, pred_iou_thresh=0.0,
                   stability_score_thresh=0.0)
    masks = src.generate(image[..., 0])  # greyscale input is expanded to RGB
    _check(masks, image)
    with pytest.raises(ValueError, match="1024"):
        SamMasks("vit_b", "weights.pth", image_size=128)


def test_ids_at_agrees_with_label_image():
    rng = np.random.default_rng(3)
    masks = Masks(rng.random((6, 20, 30)) < 0.2, np.ones(6))
    rows, cols = rng.integers(0, 20, 200), rng.integers(0, 30, 200)
    np.testing.assert_array_equal(masks.ids_at(rows, cols), label_image(masks)[rows, cols])
    assert masks.bboxes()[0].tolist() == [
        np.flatnonzero(masks.masks[0].any(1))[0], np.flatnonzero(masks.masks[0].any(1))[-1] + 1,
        np.flatnonzero(masks.masks[0].any(0))[0], np.flatnonzero(masks.masks[0].any(0))[-1] + 1]
