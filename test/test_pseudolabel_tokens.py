"""CLIP tokens per mask with a tiny random open_clip ViT (offline)."""
import json

import numpy as np
import pytest

import open_clip
import torch
from PIL import Image

from sal_ros.model.checkpoint import ModelError
from sal_ros.pseudolabel.clip_tokens import ClipTokenEncoder
from sal_ros.pseudolabel.masks import Masks

TINY = "sal-tiny-vit-test"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16,
                                           "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("clip") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)


def clip_pixels(image):
    """The image as open_clip's own eval preprocessing gives it to the model (64 px in, 64 px out: no resize)."""
    return open_clip.image_transform(64, is_train=False)(Image.fromarray(image))[None]


def clip_image_embedding(model, image):
    """CLIP's unit-norm image embedding by open_clip alone: the reference for a mask over the whole image."""
    with torch.inference_mode():
        ref = model.encode_image(clip_pixels(image))[0].numpy()
    return ref / np.linalg.norm(ref)


def maskclip_patch_features(model, image):
    """MaskCLIP's dense features from the definition (Zhou et al., ECCV 2022): the input of the last ViT block as
    open_clip's own forward computes it, then only that block's value path: ln_1, the value part of the packed
    in-projection, the output projection, ln_post and proj. (P, D), [CLS] left out."""
    blocks = model.visual.transformer.resblocks
    seen = []
    hook = blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model.encode_image(clip_pixels(image))
            attn, x = blocks[-1].attn, seen[0]
            d = x.shape[-1]
            v = torch.nn.functional.linear(blocks[-1].ln_1(x), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
            return (model.visual.ln_post(attn.out_proj(v)) @ model.visual.proj)[0, 1:].numpy()
    finally:
        hook.remove()


def _masks(h, w):
    full = np.ones((h, w), bool)
    left = np.zeros((h, w), bool)
    left[:, : w // 2] = True
    corner = np.zeros((h, w), bool)
    corner[:16, :16] = True  # exactly one patch at a 64-pixel input
    tiny = np.zeros((h, w), bool)
    tiny[40, 40] = True  # smaller than a patch
    return Masks(np.stack([full, left, corner, tiny, np.zeros((h, w), bool)]), np.ones(5))


def test_mask_attention_full_mask_equals_clip_image_embedding(model, image):
    """A mask token over the whole image sees exactly what [CLS] sees, so it must equal CLIP's image embedding."""
    enc = ClipTokenEncoder(TINY, model=model, method="mask_attention")
    tokens = enc.encode(image, _masks(64, 64))
    assert tokens.shape == (5, 32) and tokens.dtype == np.float32
    np.testing.assert_allclose(tokens[0], clip_image_embedding(model, image), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tokens[:4], axis=1), 1, atol=1e-5)
    assert np.all(tokens[4] == 0)  # empty mask -> zero token
    assert np.abs(tokens[1] - tokens[0]).max() > 1e-3  # other masks see other patches
    # Mask tokens never attend to each other: a token does not change when other masks come and go.
    alone = enc.encode(image, Masks(_masks(64, 64).masks[1:2], [1.0]))
    np.testing.assert_allclose(alone[0], tokens[1], atol=1e-5)


def test_mask_attention_last_layers_only(model, image):
    enc = ClipTokenEncoder(TINY, model=model, method="mask_attention", mask_layers=1)
    tokens = enc.encode(image, _masks(64, 64))
    np.testing.assert_allclose(tokens[0], clip_image_embedding(model, image), atol=1e-5)


def test_dense_single_patch_mask_equals_patch_feature(model, image):
    enc = ClipTokenEncoder(TINY, model=model, method="dense")
    tokens = enc.encode(image, _masks(64, 64))
    feats = maskclip_patch_features(model, image)  # the corner mask is exactly the first patch
    np.testing.assert_allclose(tokens[2], feats[0] / np.linalg.norm(feats[0]), atol=1e-5)
    left = feats.reshape(4, 4, -1)[:, :2].mean((0, 1))  # the left half: its 8 patches, each fully covered
    np.testing.assert_allclose(tokens[1], left / np.linalg.norm(left), atol=1e-5)


def test_wide_image_keeps_aspect_and_crops_work(model):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 255, (60, 200), dtype=np.uint8)  # greyscale, KITTI-like aspect
    enc = ClipTokenEncoder(TINY, model=model, method="mask_attention")
    assert enc.grid_for(60, 200) == (4, 13)
    masks = _masks(60, 200)
    tokens = enc.encode(wide, masks)
    assert tokens.shape == (5, 32) and np.all(np.isfinite(tokens))
    crops = ClipTokenEncoder(TINY, model=model, method="crop").encode(wide, masks)
    assert crops.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(crops[:4], axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="differ in size"):
        enc.encode(wide, _masks(64, 64))
    with pytest.raises(ValueError, match="unknown token method"):
        ClipTokenEncoder(TINY, model=model, method="bogus")


def test_weights_file_and_seeded_random_load_like_the_text_encoder(model, image, tmp_path):
    # One open_clip loader for both towers: a local file gives exactly its weights; no weights give the seeded
    # random model, the same in every worker process.
    torch.manual_seed(5)
    other = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": other.state_dict()}, path)
    masks = _masks(64, 64)
    expected = ClipTokenEncoder(TINY, model=other).encode(image, masks)
    np.testing.assert_allclose(ClipTokenEncoder(TINY, str(path)).encode(image, masks), expected, atol=1e-6)
    a, b = ClipTokenEncoder(TINY).encode(image, masks), ClipTokenEncoder(TINY).encode(image, masks)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, expected, atol=1e-3)  # the file's weights, not the seeded random ones
    text_only = {k: v for k, v in other.state_dict().items() if not k.startswith("visual.")}
    torch.save(text_only, tmp_path / "text_only.pt")
    with pytest.raises(ModelError, match="does not fit"):  # image tokens need the image tower
        ClipTokenEncoder(TINY, str(tmp_path / "text_only.pt"))


def test_unknown_model_or_tag_is_refused_by_name():
    with pytest.raises(ModelError, match="unknown open_clip model 'ViT-X-99'"):
        ClipTokenEncoder("ViT-X-99")
    with pytest.raises(ModelError, match="unknown pretrained tag 'no-such-tag'"):
        ClipTokenEncoder(TINY, "no-such-tag")
