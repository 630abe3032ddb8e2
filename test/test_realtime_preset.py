"""The ``realtime`` model preset (issue 25): it builds, trains a step, survives a checkpoint, and segments the real
scan through the node's Segmenter. Its speed and held-out quality are measured by benches (docs/performance.md),
never here."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_data
from sal_ros.model.config import ModelConfig
from sal_ros.model.checkpoint import save_checkpoint
from sal_ros.model.sal import SALModel
from sal_ros.model.segmenter import Segmenter
from sal_ros.model.text_encoder import tiny_text_encoder

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    return np.fromfile(path, np.float32).reshape(-1, 4)


def test_realtime_preset_trains_loads_and_segments_the_real_scan(tmp_path, scan):
    encoder = tiny_text_encoder()
    config = ModelConfig.preset("realtime", token_dim=encoder.embed_dim)
    assert config.input.voxel_size > ModelConfig.preset("tiny").input.voxel_size  # coarser than tiny: fewer voxels
    torch.manual_seed(0)
    model = SALModel(config)
    sub = scan[::8]
    model.train()
    layers = model(torch.from_numpy(sub[:, :3].copy()), torch.from_numpy(sub[:, 3].copy()))
    loss = sum(t.float().square().mean() for layer in layers for ts in layer.values() for t in ts)
    loss.backward()  # every layer is reached by a gradient: nothing built but left out of the graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01 * p.grad)  # weights that differ from any fresh init
    model.eval()

    path = save_checkpoint(tmp_path / "realtime.pt", model, text_encoder_identity=encoder)
    vocabulary = REPO / "config" / "vocabulary_semantickitti.yaml"
    loaded = Segmenter.from_files(path, vocabulary, text_encoder=encoder)
    assert loaded.model.config == config
    in_memory = Segmenter(model, "cpu", loaded.text_embeddings)
    points, intensity = np.ascontiguousarray(scan[:, :3]), np.ascontiguousarray(scan[:, 3])
    out = loaded.segment(points, intensity)
    assert len(out.label) == len(scan) == 124_668
    assert np.array_equal(out.label, in_memory.segment(points, intensity).label)  # the checkpoint is the model
    assert set(out.timings_ms) >= {"voxelize", "backbone", "decoder", "postprocess"}
    with torch.inference_mode():
        voxels = loaded.model.prepare(torch.from_numpy(points)).num_voxels[0]
    assert 5_000 < voxels < 20_000  # 0.5 m cells: ~11.0k voxels on this scan (tiny's 0.2 m: ~31.8k)
