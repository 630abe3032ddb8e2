"""The shipped oracle zero-shot run (config/train_oracle.yaml + config/vocabulary_semantickitti_names.yaml,
docs/training.md): the vocabulary embeds each class exactly as the oracle tokenized its pseudo-instances, and
the documented train + eval commands run on the real frames (2 steps here; the 600-step numbers are in the doc).
"""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO, require_data

CONFIG = REPO / "config" / "train_oracle.yaml"
VOCABULARY = REPO / "config" / "vocabulary_semantickitti_names.yaml"


def test_names_vocabulary_embeds_like_the_oracle_tokens():
    from sal_ros.data.labels import get_label_set
    from sal_ros.model.text_encoder import TextEncoder
    from sal_ros.model.vocabulary import Vocabulary
    from sal_ros.train.dataset import class_text_tokens
    from sal_ros.train.trainer import TrainConfig

    label_set = get_label_set("semantickitti")
    vocab = Vocabulary.from_yaml(VOCABULARY)
    assert vocab.class_names == tuple(label_set.class_names)
    assert vocab.things == [bool(t) for t in label_set.thing_mask[1:]]
    encoder = TrainConfig.from_yaml(CONFIG).text_encoder
    rows = np.asarray(TextEncoder(encoder["model"], encoder["pretrained"]).encode(vocab))
    tokens = class_text_tokens(label_set.class_names, encoder)
    assert rows.shape == tokens.shape == (19, 512)
    np.testing.assert_allclose(rows, tokens, atol=1e-6)


def test_documented_oracle_commands_run(tmp_path):
    seq = require_data("semantickitti", "sequences", "00")
    run = [sys.executable, "-m", "sal_ros.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # OpenMP barriers crawl when other processes hold the cores
    train = subprocess.run([*run, "train", "--config", str(CONFIG), "--out", str(tmp_path / "train"),
                            "--stop-at", "2", "--device", "cpu", "--no-progress"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "done: 2 steps of 600" in train.stdout
    evaluate = subprocess.run([*run, "eval", "model", "--checkpoint", str(tmp_path / "train" / "model_last.pt"),
                               "--dataset", str(seq), "--vocabulary", str(VOCABULARY), "--out", str(tmp_path / "eval"),
                               "--frustum-only", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_scans"] == 2 and len(metrics["per_class"]) == 19
