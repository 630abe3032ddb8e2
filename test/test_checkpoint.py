"""Checkpoints: exact round trip on the real scan, the Segmenter built from files, and every failure mode."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_data
from sal_ros.model.config import ModelConfig
from sal_ros.model.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from sal_ros.model.sal import SALModel
from sal_ros.model.segmenter import Segmenter
from sal_ros.model.text_encoder import tiny_text_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cloud():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    scan = np.fromfile(path, np.float32).reshape(-1, 4)[::10]
    return torch.from_numpy(scan[:, :3].copy()), torch.from_numpy(scan[:, 3].copy())


@pytest.fixture(scope="module")
def encoder():
    return tiny_text_encoder()


@pytest.fixture
def trained(cloud):
    """A tiny model whose weights and BatchNorm statistics differ from any fresh init."""
    torch.manual_seed(3)
    model = SALModel(ModelConfig.preset("tiny"))
    model.train()
    with torch.no_grad():
        model(*cloud)  # updates running statistics
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_round_trip_reproduces_outputs_exactly(tmp_path, trained, cloud, encoder):
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", trained, text_encoder_identity=encoder,
                           extra={"step": 12, "train_config": {"betas": (0.9, 0.99)}})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary files left behind
    loaded, meta = load_checkpoint(path, text_encoder=encoder)
    assert not loaded.training and loaded.config == trained.config
    assert meta["text_encoder"]["identity"] == encoder.identity and meta["extra"]["step"] == 12
    with torch.no_grad():
        a, b = trained(*cloud), loaded(*cloud)
    for la, lb in zip(a, b):
        for key in la:
            for ta, tb in zip(la[key], lb[key]):
                assert torch.equal(ta, tb), key
    # loading into an existing model (the trainer's resume path) fills it in place
    torch.manual_seed(99)
    fresh = SALModel(ModelConfig.preset("tiny"))
    same, _ = load_checkpoint(path, model=fresh)
    assert same is fresh and all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(),
                                                                     trained.state_dict().values()))


def test_segmenter_from_files_uses_the_recorded_text_encoder(tmp_path, trained, encoder):
    path = save_checkpoint(tmp_path / "model.pt", trained, text_encoder_identity=encoder)
    seg = Segmenter.from_files(path, REPO / "config" / "vocabulary_semantickitti.yaml")
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"),
                       np.float32).reshape(-1, 4)[:20000]
    out = seg.segment(scan[:, :3], scan[:, 3])
    assert len(out.class_names) == 19 and out.class_names[0] == "car"
    assert seg.text_embeddings.encoder == encoder.identity and seg.text_embeddings.embeddings.shape[0] > 19  # max
    assert int(out.label.max()) <= 19 and len(out.label) == 20000


def test_missing_and_corrupt_files(tmp_path, trained):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    path = save_checkpoint(tmp_path / "model.pt", trained)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)


class _Code:  # pickled code: weights_only loading must refuse it
    pass


def test_format_checks(tmp_path, trained):
    payload = torch.load(save_checkpoint(tmp_path / "ok.pt", trained), weights_only=True)

    def write(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    with pytest.raises(CheckpointError, match="not a sal_ros model checkpoint"):
        load_checkpoint(write("other.pt", {"state_dict": payload["model"]}))
    with pytest.raises(CheckpointError, match=f"version 99, this sal_ros reads {FORMAT_VERSION}"):
        load_checkpoint(write("future.pt", {**payload, "format_version": 99}))
    with pytest.raises(CheckpointError, match="lacks 'model_config'"):
        load_checkpoint(write("noconfig.pt", {k: v for k, v in payload.items() if k != "model_config"}))
    with pytest.raises(CheckpointError, match="unknown model settings"):
        load_checkpoint(write("badconfig.pt", {**payload, "model_config": {**payload["model_config"], "wings": 2}}))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(write("code.pt", {**payload, "extra": _Code()}))


def test_weight_mismatches(tmp_path, trained, encoder):
    payload = torch.load(save_checkpoint(tmp_path / "ok.pt", trained), weights_only=True)
    state = dict(payload["model"])
    dropped = next(iter(state))
    del state[dropped]
    torch.save({**payload, "model": state}, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match=f"missing \\(1\\): {dropped}"):
        load_checkpoint(tmp_path / "missing_key.pt")
    state = {**payload["model"], "decoder.extra_head.weight": torch.zeros(2)}
    torch.save({**payload, "model": state}, tmp_path / "unexpected.pt")
    with pytest.raises(CheckpointError, match="unexpected \\(1\\): decoder.extra_head.weight"):
        load_checkpoint(tmp_path / "unexpected.pt")
    wide = ModelConfig.from_dict(payload["model_config"]).with_settings({"hidden_dim": 64}).to_dict()  # not the weights' width
    torch.save({**payload, "model_config": wide}, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "shapes.pt")
    torch.manual_seed(0)
    small = SALModel(ModelConfig.preset("tiny", token_dim=256))
    path = save_checkpoint(tmp_path / "tok256.pt", small)
    with pytest.raises(CheckpointError, match="256-d tokens"):
        load_checkpoint(path, text_encoder=encoder)


def test_training_config_encoder_record_names_the_same_encoder(tmp_path):
    """A trainer records {"model", "pretrained": None}; the node's seeded random encoder must match it."""
    from sal_ros.model.checkpoint import _encoder_record
    from sal_ros.model.open_clip_models import encoder_identity

    record = _encoder_record({"model": "ViT-B-16", "pretrained": None})
    assert record["identity"] == encoder_identity("ViT-B-16", None) == "ViT-B-16/random-seed0"
    assert _encoder_record({"model": "ViT-B-16", "pretrained": ""})["identity"] == "ViT-B-16/random-seed0"
    assert _encoder_record({"model": "ViT-B-16", "pretrained": "openai"})["identity"] == "ViT-B-16/openai"
