"""Vocabulary validation, YAML vocabularies, and the open_clip text encoder (tiny random config, offline)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sal_ros.model.checkpoint import ModelError
from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER
from sal_ros.model.text_encoder import TextEncoder, tiny_text_encoder
from sal_ros.model.vocabulary import Vocabulary, VocabularyError, validate_prompts

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


def test_a_prompt_list_is_tokenized_once_per_template_when_parsed():
    """The parse checks each prompt against each template once (it was checked three times: as prompts, as class
    names, as descriptions)."""
    from sal_ros.model.vocabulary import DEFAULT_TEMPLATES, token_count

    prompts = ["parsed once car", "parsed once road", "parsed once tree"]
    token_count.cache_clear()
    vocabulary = Vocabulary.from_prompts(prompts)
    info = token_count.cache_info()
    assert info.hits + info.misses == len(prompts) * len(DEFAULT_TEMPLATES)
    assert vocabulary.class_names == tuple(prompts) and vocabulary.version == 0


def test_semantickitti_vocabulary_file():
    from sal_ros.data.labels import SEMANTICKITTI_CLASSES, SEMANTICKITTI_THINGS

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
    with pytest.raises(VocabularyError, match="missing.yaml: not found"):
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
    code = ("from sal_ros.model.text_encoder import tiny_text_encoder\n"
            "from sal_ros.model.vocabulary import Vocabulary\n"
            "enc = tiny_text_encoder()\n"
            "print(enc.encode(Vocabulary.from_prompts(['car', 'tree'])).embeddings.shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(2, " in proc.stdout
    assert list(tmp_path.glob("sal_ros_clip_*")) == []


# ------------------------------------------------------------------------------------------- bounds, caches
def test_vocabulary_file_bounds_are_checked_before_any_text_is_read(tmp_path):
    """A file of 50k descriptions took 18-34 s in the node's parameter callback and 152 s to embed: the counts
    are refused before a description is tokenized, the size before the file is read."""
    import time

    from sal_ros.model.vocabulary import VocabularyLimits

    many = tmp_path / "many.yaml"
    many.write_text("classes:\n  - name: car\n    descriptions: [" + ", ".join(f"car {i}" for i in range(50_000)) + "]\n")
    t0 = time.thread_time()
    with pytest.raises(VocabularyError, match="50000 descriptions, at most 1024"):
        Vocabulary.from_yaml(many, VocabularyLimits(max_file_bytes=1 << 20))
    assert time.thread_time() - t0 < 5.0  # CPU seconds (not wall): tokenizing 50k x 6 texts takes far more
    with pytest.raises(VocabularyError, match="more than the limit of 1000"):
        Vocabulary.from_yaml(many, VocabularyLimits(max_file_bytes=1000))
    templates = tmp_path / "templates.yaml"
    templates.write_text("templates: [" + ", ".join(f"'{{}} {i}'" for i in range(20)) + "]\nclasses: [{name: car}]\n")
    with pytest.raises(VocabularyError, match="20 templates, at most 16"):
        Vocabulary.from_yaml(templates)
    assert len(Vocabulary.from_yaml(templates, VocabularyLimits(max_templates=20)).templates) == 20
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(VocabularyError, match="folder.yaml: is a folder"):
        Vocabulary.from_yaml(folder)


def test_an_error_quoting_a_value_stays_short():
    """An aliased structure where a string belongs used to be quoted whole in the error (26 MB from 647 bytes)."""
    nested = [["x" * 100] * 100] * 100
    with pytest.raises(VocabularyError) as err:
        Vocabulary.from_dict({"classes": [{"name": "car", "descriptions": [nested]}]})
    assert len(str(err.value)) < 200


def test_embedding_the_tokens_up_to_the_end_token_matches_open_clip(encoder):
    """Cut to the longest text's end token, the causal text tower gives open_clip's full-context result."""
    texts = ["a photo of a car.", "x", "a lidar scan of a construction vehicle parked beside a wet road."]
    tokens = encoder.tokenizer(texts)
    with torch.inference_mode():
        full = encoder.model.encode_text(tokens)
        cut = encoder._encode_tokens(tokens)
    assert int((tokens != 0).sum(1).max()) < tokens.shape[1] // 3  # it did cut
    np.testing.assert_allclose(cut.numpy(), full.numpy(), atol=1e-5)


def test_text_rows_cached_in_memory_and_on_disk_per_encoder_weights(tmp_path):
    """A new vocabulary embeds only the texts no earlier one had; a restarted encoder reads them from disk, and
    only an encoder with the same weights does."""
    import open_clip

    calls = []

    def counting(enc):
        real = enc.embed_texts
        enc.embed_texts = lambda texts, batch=256: calls.append(len(texts)) or real(texts, batch)
        return enc

    cold = counting(TextEncoder(TINY_TEXT_ENCODER, None, cache_dir=tmp_path))
    first = cold.encode(Vocabulary.from_prompts(["car", "road"]))
    assert calls == [12]  # 2 prompts x 6 templates
    cold.encode(Vocabulary.from_prompts(["road", "car", "tree"]))
    assert calls == [12, 6]  # only tree's texts
    progress = []
    warm = counting(TextEncoder(TINY_TEXT_ENCODER, None, cache_dir=tmp_path))
    again = warm.encode(Vocabulary.from_prompts(["car", "road"]), progress=lambda d, t: progress.append((d, t)))
    assert calls == [12, 6] and progress == [(2, 2)]
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    shards = sorted((tmp_path).rglob("*.npz"))
    assert len(shards) == 2 and all(s.parent.name.startswith(f"{TINY_TEXT_ENCODER}-") for s in shards)
    shards[0].write_bytes(b"torn")  # a damaged shard is skipped, its rows embedded again
    weights = tmp_path / "other.pt"
    torch.save(open_clip.create_model(TINY_TEXT_ENCODER, pretrained=None).state_dict(), weights)  # unseeded
    other = counting(TextEncoder(TINY_TEXT_ENCODER, str(weights), cache_dir=tmp_path))
    assert other.fingerprint != cold.fingerprint
    assert not np.allclose(other.encode(Vocabulary.from_prompts(["car", "road"])).embeddings, first.embeddings)
    assert calls == [12, 6, 12]  # other weights: nothing read from the first encoder's rows
    restarted = counting(TextEncoder(TINY_TEXT_ENCODER, None, cache_dir=tmp_path))
    assert len(restarted.texts.skipped_shards) == 1
    readable = len(restarted.texts)
    assert readable in (6, 12)
    restarted.encode(Vocabulary.from_prompts(["car", "road", "tree"]))
    assert sum(calls[3:]) == 18 - readable  # the damaged shard's texts only
