"""ModelConfig nested per component (issue 23): checkpoints and backbone files of the first layout (format 1, one
flat record) load into the same model, and YAML ``model:`` sections take the flat names and the sections alike."""
import numpy as np
import pytest
import torch
import yaml

from conftest import require_data
from sal_ros.model.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from sal_ros.model.config import PRESETS, SECTIONS, ModelConfig
from sal_ros.model.pretrained import CheckpointError, check_compatible, load_backbone_into, read_backbone
from sal_ros.model.sal import SALModel

# The tiny preset as the first layout stored it: a format-1 checkpoint's "model_config", written out by hand.
FLAT_TINY = {
    "in_channels": 5, "voxel_size": 0.2, "coord_scale": 50.0, "intensity_scale": 1.0, "stem_width": 16,
    "widths": [16, 24, 32, 48], "blocks": [1, 1, 1, 1], "decoder_widths": [32, 24, 16, 16],
    "decoder_blocks": [1, 1, 1, 1], "num_queries": 32, "hidden_dim": 32, "mask_dim": 32, "decoder_rounds": 1,
    "attention_strides": [16, 8], "heads": 4, "ffn_dim": 64, "dropout": 0.0, "token_dim": 512, "max_keys": 0,
    "backbone": "minkunet", "waffle_depth": 48, "waffle_width": 256, "waffle_cell": 0.5,
    "waffle_extent": [64.0, 64.0, 8.0], "waffle_layer_scale": 0.1,
}


@pytest.fixture(scope="module")
def scan():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    points = np.fromfile(path, np.float32).reshape(-1, 4)
    return torch.from_numpy(points[:, :3].copy()), torch.from_numpy(points[:, 3].copy())


@pytest.fixture(scope="module")
def model():
    """The tiny model with BatchNorm statistics and weights unlike any fresh init."""
    torch.manual_seed(5)
    net = SALModel(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else t + 0.01 * torch.randn_like(t))
    return net.eval()


def test_a_format_1_checkpoint_loads_into_the_same_model(tmp_path, model, scan):
    old = {"format": "sal_ros.model", "format_version": 1, "model_config": FLAT_TINY, "token_dim": 512,
           "text_encoder": None, "model": model.state_dict(), "extra": {"step": 3}, "torch_version": "2.4.0"}
    torch.save(old, tmp_path / "old.pt")
    loaded, meta = load_checkpoint(tmp_path / "old.pt")
    assert meta["model_config"] == PRESETS["tiny"] and meta["token_dim"] == 512 and meta["extra"] == {"step": 3}
    payload = read_checkpoint(tmp_path / "old.pt")  # migrated on read
    assert payload["format_version"] == FORMAT_VERSION == 2 and payload["model_config"] == PRESETS["tiny"].to_dict()
    with torch.no_grad():
        a, b = model(*scan)[-1], loaded(*scan)[-1]
    assert all(torch.equal(x, y) for key in a for x, y in zip(a[key], b[key]))
    # written again, it is the nested layout, and reads back to the same config
    saved = torch.load(save_checkpoint(tmp_path / "new.pt", loaded), weights_only=True)
    assert saved["format_version"] == 2 and set(saved["model_config"]) == {"backbone", *SECTIONS}
    assert saved["model_config"]["decoder"]["num_queries"] == 32 and "num_queries" not in saved["model_config"]
    assert load_checkpoint(tmp_path / "new.pt")[1]["model_config"] == PRESETS["tiny"]
    torch.save({**old, "model_config": {**FLAT_TINY, "decoder": {"num_queries": 8}}}, tmp_path / "twice.pt")
    with pytest.raises(CheckpointError, match="decoder.num_queries given twice"):
        load_checkpoint(tmp_path / "twice.pt")


def test_a_format_1_backbone_file_fits_the_models_it_fitted(tmp_path, model):
    old = {"format": "sal_ros.backbone", "format_version": 1, "model_config": FLAT_TINY,
           "backbone": model.backbone.state_dict(), "head": {}, "extra": {}, "torch_version": "2.4.0"}
    torch.save(old, tmp_path / "backbone.pt")
    assert read_backbone(tmp_path / "backbone.pt")["model_config"]["minkunet"]["widths"] == [16, 24, 32, 48]
    other_decoder = SALModel(ModelConfig.preset("tiny", num_queries=16, max_keys=100))  # decoder settings may differ
    load_backbone_into(tmp_path / "backbone.pt", other_decoder.backbone, other_decoder.config)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in other_decoder.backbone.state_dict().items())
    with pytest.raises(CheckpointError, match=r"input.voxel_size: pretrained 0.2, model 0.3"):
        check_compatible(PRESETS["tiny"], ModelConfig.preset("tiny", voxel_size=0.3))


def test_flat_names_and_sections_give_one_config():
    flat = ModelConfig.preset("tiny", voxel_size=0.3, num_queries=16, decoder_rounds=2, waffle_depth=8, max_keys=9)
    nested = ModelConfig.preset("tiny", input={"voxel_size": 0.3}, decoder={"num_queries": 16, "rounds": 2},
                                waffleiron={"depth": 8}, training={"max_keys": 9})
    assert flat == nested and flat.minkunet == PRESETS["tiny"].minkunet and flat.decoder.heads == 4
    assert (flat.input.voxel_size, flat.decoder.rounds, flat.waffleiron.depth, flat.training.max_keys) == (0.3, 2, 8, 9)
    for name, config in PRESETS.items():
        assert ModelConfig.from_dict(config.to_dict()) == config, name
    with pytest.raises(ValueError, match=r"decoder.num_queries given twice \(num_queries and decoder.num_queries\)"):
        ModelConfig.preset("tiny", num_queries=16, decoder={"num_queries": 8})
    with pytest.raises(ValueError, match=r"unknown model settings \['wings'\]"):
        ModelConfig.preset("tiny", wings=2)
    with pytest.raises(ValueError, match=r"unknown model decoder settings \['wings'\]"):
        ModelConfig.preset("tiny", decoder={"wings": 2})
    with pytest.raises(ValueError, match="'decoder' must be a mapping"):
        ModelConfig.preset("tiny", decoder=16)
    with pytest.raises(ValueError, match="hidden_dim 30 must be divisible by heads 4"):
        ModelConfig.preset("tiny", decoder={"hidden_dim": 30})


def test_training_yaml_takes_either_shape(tmp_path):
    from sal_ros.train.trainer import TrainConfig, build_model

    shapes = {"flat": {"preset": "tiny", "num_queries": 16, "widths": [16, 24, 32, 40]},
              "nested": {"preset": "tiny", "decoder": {"num_queries": 16}, "minkunet": {"widths": [16, 24, 32, 40]}}}
    configs = []
    for name, model_cfg in shapes.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"model": model_cfg}))
        configs.append(build_model(TrainConfig.from_yaml(tmp_path / f"{name}.yaml").model).config)
    assert configs[0] == configs[1] and configs[0].decoder.num_queries == 16
    assert configs[0].minkunet.widths == (16, 24, 32, 40)
