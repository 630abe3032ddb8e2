"""Vocabulary validation, YAML vocabularies, and the open_clip text encoder (tiny random config, offline)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sal_ros.model.checkpoint import ModelError
from sal_ros.model.vocabulary import (TINY_TEXT_ENCODER, TextEncoder, Vocabulary, VocabularyError, tiny_text_encoder,
                                      validate_prompts)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("prompts, reason", [
    ([], "empty"),
    ("car", "list of strings"),
    (None, "list of strings"),
    (["car", 3], "must be a string"),
    (["car", "  "], "empty"),
    (["car", "Road", "road "], "duplicates"),
    ([f"class {i}" for i in range(257)], "at most 256"),
    (["car", " ".join("7" * 80)], "tokens"),  # 159 characters, 80 BPE tokens
    (["x" * 201], "characters"),
])
def test_validate_prompts_rejects_with_reason(prompts, reason):
    with pytest.raises(VocabularyError, match=reason):
        validate_prompts(prompts)


def test_validate_prompts_accepts_and_strips():
    assert validate_prompts([" car", "traffic sign ", "Person"]) == ["car", "traffic sign", "Person"]
    assert Vocabulary.from_prompts(["car", "road"]).class_names == ("car", "road")


def test_semantickitti_vocabulary_file():
    from sal_ros.eval.labels import SEMANTICKITTI_CLASSES, SEMANTICKITTI_THINGS

    vocab = Vocabulary.from_yaml(REPO / "config" / "vocabulary_semantickitti.yaml")
    assert vocab.class_names == SEMANTICKITTI_CLASSES
    assert {c.name for c in vocab.classes if c.thing} == set(SEMANTICKITTI_THINGS)
    assert vocab.combine == "max" and all(len(c.descriptions) >= 3 for c in vocab.classes)


@pytest.mark.parametrize("data, reason", [
    ({"classes": []}, "non-empty"),
    ({"classes": [{"name": "car"}], "colour": 1}, "unknown keys"),
    ({"classes": [{"name": "car", "thing": "yes"}]}, "true or false"),
    ({"classes": [{"name": "car", "descriptions": "car"}]}, "list of strings"),
    ({"classes": [{"name": "car", "descriptions": []}]}, "no descriptions"),
    ({"classes": [{"name": "car"}, {"name": "CAR"}]}, "duplicates"),
    ({"classes": [{"name": "car"}], "combine": "median"}, "combine"),
    ({"classes": [{"name": "car"}], "templates": ["a photo"]}, "templates"),
])
def test_vocabulary_dict_errors(data, reason):
    with pytest.raises(VocabularyError, match=reason):
        Vocabulary.from_dict(data)


def test_vocabulary_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [name: car\n")
    with pytest.raises(VocabularyError, match="YAML"):
        Vocabulary.from_yaml(bad)
    with pytest.raises(OSError):
        Vocabulary.from_yaml(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def encoder():
    return tiny_text_encoder()


VOCAB = {"classes": [{"name": "car", "descriptions": ["car", "jeep", "van"], "thing": True},
                     {"name": "road", "descriptions": ["road", "street"], "thing": False},
                     {"name": "tree", "thing": False}]}


def test_mean_and_max_combination(encoder):
    mean = encoder.encode(Vocabulary.from_dict({**VOCAB, "combine": "mean"}))
    mx = encoder.encode(Vocabulary.from_dict({**VOCAB, "combine": "max"}))
    assert mean.embeddings.shape == (3, 512) and mean.row_class.tolist() == [0, 1, 2]
    assert mx.embeddings.shape == (6, 512) and mx.row_class.tolist() == [0, 0, 0, 1, 1, 2]
    assert mean.thing.tolist() == [True, False, False] and mean.class_names == ("car", "road", "tree")
    for te in (mean, mx):
        assert te.embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(te.embeddings, axis=1), 1.0, atol=1e-5)
    # mean = normalized average of the (template-averaged, normalized) description rows that max keeps
    for k in range(3):
        avg = mx.embeddings[mx.row_class == k].mean(0)
        np.testing.assert_allclose(mean.embeddings[k], avg / np.linalg.norm(avg), atol=1e-5)
    # a description row is the normalized mean over templates of normalized template embeddings
    vocab = Vocabulary.from_dict(VOCAB)
    rows = encoder.embed_texts([t.format("jeep") for t in vocab.templates]).mean(0)
    np.testing.assert_allclose(mx.embeddings[1], rows / np.linalg.norm(rows), atol=1e-5)
    assert np.asarray(mean).shape == (3, 512)
    with pytest.raises(VocabularyError, match="max"):
        np.asarray(mx)


def test_embeddings_are_cached_and_reproducible(encoder):
    vocab = Vocabulary.from_prompts(["car", "road"])
    first = encoder.encode(vocab, version=1)
    again = encoder.encode(Vocabulary.from_prompts(["car", "road"]), version=2)
    assert again.embeddings is first.embeddings and again.version == 2  # LRU hit on equal content
    other = encoder.encode(Vocabulary.from_prompts(["road", "car"]))
    np.testing.assert_allclose(other.embeddings, first.embeddings[::-1], atol=1e-6)
    # random weights come from a fixed seed: a second encoder (another process) embeds identically
    np.testing.assert_array_equal(tiny_text_encoder().encode(vocab).embeddings, first.embeddings)
    assert encoder.identity == f"{TINY_TEXT_ENCODER}/random-seed0" and encoder.embed_dim == 512


def test_encoder_errors(tmp_path, encoder):
    with pytest.raises(ModelError, match="unknown open_clip model"):
        TextEncoder("ViT-Q-99")
    with pytest.raises(ModelError, match="not found"):
        TextEncoder(TINY_TEXT_ENCODER, str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="unknown pretrained tag"):
        TextEncoder(TINY_TEXT_ENCODER, "laion_nonexistent")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read"):
        TextEncoder(TINY_TEXT_ENCODER, str(garbage))
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="does not fit"):
        TextEncoder(TINY_TEXT_ENCODER, str(wrong))
    with pytest.raises(ModelError, match="768-d"):
        encoder.check_token_dim(768)


def test_pretrained_tag_offline_names_the_remedy():
    """An offline robot (HF_HUB_OFFLINE=1, as the suite runs) asking for a tag that is not cached gets a
    ModelError that says what to do, not open_clip's download traceback, and nothing is fetched."""
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*local weights file"):
        TextEncoder("ViT-B-32", "openai")


def test_local_weights_file_is_loaded(tmp_path, encoder):
    import open_clip

    model = open_clip.create_model(TINY_TEXT_ENCODER, pretrained=None)
    with torch.no_grad():
        model.text_projection.mul_(-1.0)  # these weights embed every text as minus the seeded model's
        model.transformer.resblocks[0].mlp.c_fc.weight.copy_(encoder.model.transformer.resblocks[0].mlp.c_fc.weight)
    state = {k: v for k, v in model.state_dict().items()}
    path = tmp_path / "text.pt"
    torch.save({"state_dict": state}, path)
    loaded = TextEncoder(TINY_TEXT_ENCODER, str(path))
    assert loaded.identity == f"{TINY_TEXT_ENCODER}/{path}"
    ref = model.eval()
    tokens = loaded.tokenizer(["a photo of a car."])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(loaded.embed_texts(["a photo of a car."]), expected, atol=1e-5)


def test_tiny_text_encoder_leaves_no_folder_behind(tmp_path):
    """Registering the tiny encoder's open_clip config used to leave a sal_ros_clip_* folder in the temp dir of
    every process that built it (hundreds after a suite run)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TMPDIR=str(tmp_path))
    code = ("from sal_ros.model.vocabulary import tiny_text_encoder, Vocabulary\n"
            "enc = tiny_text_encoder()\n"
            "print(enc.encode(Vocabulary.from_prompts(['car', 'tree'])).embeddings.shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(2, " in proc.stdout
    assert list(tmp_path.glob("sal_ros_clip_*")) == []
