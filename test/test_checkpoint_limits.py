"""Checkpoints checked before any real module is built (issue 24 items 8, 9): a small file whose config claims a
huge model (20M queries, 5M classes, 100k decoder rounds) is refused from the meta-device build against the file's
tensor shapes, with memory flat; weights holding NaN or inf are refused by name."""
import os
import subprocess
import sys

import pytest
import torch

from sal_ros.model.config import ModelConfig
from sal_ros.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sal_ros.model.sal import SALModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, SALModel(ModelConfig.preset("tiny")).eval())
    return path, torch.load(path, weights_only=True)


def planted(tmp_path, payload, name, **config):
    """``payload`` with its stored config changed; the weights stay the tiny model's."""
    stored = ModelConfig.from_dict(payload["model_config"]).with_settings(config)
    torch.save({**payload, "model_config": stored.to_dict()}, tmp_path / name)
    return tmp_path / name


# In a child process so the figure is its own peak memory; building the claimed 20M-query model first (the old
# behaviour) costs 20M x 32 floats for the query embeddings alone (2.6 GB).
CHILD = """
import sys
from sal_ros.model.checkpoint import CheckpointError, load_checkpoint
from sal_ros.model.semantic_model import load_semantic_checkpoint
import sal_ros.model.sal  # imported before the measurement: its import is not the load
def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
with open("/proc/self/clear_refs", "w") as f:  # the peak so far (imports) is forgotten: the load's own counts
    f.write("5")
before = peak_kb()
try:
    (load_semantic_checkpoint if sys.argv[2] == "semantic" else load_checkpoint)(sys.argv[1])
    print("loaded")
except CheckpointError as exc:
    print((peak_kb() - before) // 1024, exc, sep="|")
"""


def load_in_child(path, kind="sal"):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), kind], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1]
    assert out != "loaded"
    grown_mb, text = out.split("|", 1)
    return int(grown_mb), text


def test_a_checkpoint_claiming_20m_queries_is_refused_before_building(tiny, tmp_path):
    path, payload = tiny
    grown_mb, text = load_in_child(planted(tmp_path, payload, "queries.pt", num_queries=20_000_000))
    assert "weights do not fit the model" in text and "(20000000, 32) vs" not in text, text
    assert "20000000" in text and str(tmp_path / "queries.pt") in text
    assert grown_mb < 100, f"memory grew by {grown_mb} MB: the claimed model was built"


@pytest.fixture
def semantic(tmp_path):
    from sal_ros.model.semantic_model import SemanticModel

    names = [f"class{i}" for i in range(4)]
    model = SemanticModel(ModelConfig.preset("tiny"), names)
    extra = {"train_config": {"objective": "semantic", "semantic": {"class_names": names}}}
    return torch.load(save_checkpoint(tmp_path / "sem.pt", model, extra=extra), weights_only=True)


def with_classes(payload, n):
    return {**payload, "extra": {"train_config": {"objective": "semantic", "semantic": {"class_names": ["c"] * n}}}}


def test_a_semantic_checkpoint_claiming_5m_classes_is_refused_before_reading_them(semantic, tmp_path):
    """The issue's file: 5M class names make a 25 MB pickle that the weights-only unpickler reads for ~20 s."""
    from sal_ros.model.semantic_model import load_semantic_checkpoint

    torch.save(with_classes(semantic, 5_000_000), tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match=r"classes\.pt: its pickled part .* is \d+ bytes, more than the limit"):
        load_semantic_checkpoint(tmp_path / "classes.pt")


def test_a_semantic_checkpoint_claiming_more_classes_than_its_head_is_refused_before_building(semantic, tmp_path):
    from sal_ros.model.semantic_model import load_semantic_checkpoint

    torch.save(with_classes(semantic, 1_000_000), tmp_path / "classes.pt")  # a 64 MB head if built
    grown_mb, text = load_in_child(tmp_path / "classes.pt", "semantic")
    assert "head.weight (4, 16) vs (1000000, 16)" in text, text
    assert grown_mb < 40, f"memory grew by {grown_mb} MB: the claimed head was built"


def test_a_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(tmp_path / "model.pt")


def test_a_checkpoint_claiming_far_more_layers_is_refused_while_building_on_meta(tiny, tmp_path):
    path, payload = tiny
    with pytest.raises(CheckpointError, match=r"more than \d+ tensors, the file holds \d+"):
        load_checkpoint(planted(tmp_path, payload, "rounds.pt", decoder_rounds=100_000))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tiny, tmp_path, bad):
    path, payload = tiny
    state = dict(payload["model"])
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[1] = bad
    torch.save({**payload, "model": state}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"1 weight tensor\\(s\\) hold NaN or inf \\({name}\\)"):
        load_checkpoint(tmp_path / "nan.pt")
    model = SALModel(ModelConfig.preset("tiny"))  # filled in place (resume): refused all the same
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_checkpoint(tmp_path / "nan.pt", model=model)


def test_a_sound_checkpoint_still_loads_exactly(tiny):
    path, payload = tiny
    model, _ = load_checkpoint(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["model"].items())


def test_a_refused_checkpoint_is_one_line_and_status_1_at_the_command_line(tiny, tmp_path, capsys):
    """`sal-ros eval model` did not catch CheckpointError: NaN weights ended in a traceback."""
    from pathlib import Path

    from sal_ros.cli import main as cli_main

    path, payload = tiny
    state = {k: v.clone() for k, v in payload["model"].items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save({**payload, "model": state}, tmp_path / "nan.pt")
    vocabulary = Path(__file__).resolve().parents[1] / "config" / "vocabulary_semantickitti.yaml"
    rc = cli_main(["eval", "model", "--checkpoint", str(tmp_path / "nan.pt"), "--vocabulary", str(vocabulary),
                   "--dataset", str(tmp_path), "--out", str(tmp_path / "eval"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "nan.pt" in err and "NaN or inf" in err and len(err.strip().splitlines()) == 1, err
