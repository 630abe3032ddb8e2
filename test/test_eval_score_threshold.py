"""`sal-ros eval model` scores what the node would publish: the Segmenter runs with the node's default
score_threshold unless --score-threshold says otherwise, and the report records the threshold it used."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, require_data, save_tiny_checkpoint


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    seq = require_data("semantickitti", "sequences", "00")

    root = tmp_path_factory.mktemp("eval_threshold")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    return type("Rig", (), {"root": root, "seq": seq, "checkpoint": checkpoint})


def _eval(rig, out, *extra):
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "eval", "model", "--checkpoint", str(rig.checkpoint),
                           "--dataset", str(rig.seq), "--max-frames", "1", "--no-progress",
                           "--vocabulary", str(REPO / "config" / "vocabulary_semantickitti.yaml"),
                           "--out", str(rig.root / out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((rig.root / out / "metrics.json").read_text())


def test_eval_model_uses_the_nodes_score_threshold_by_default(rig):
    from sal_ros.nodes import params as P

    node_default = next(s.default for s in P.SEGMENTER_PARAMS if s.name == "score_threshold")
    default = _eval(rig, "default")
    assert default["meta"]["score_threshold"] == node_default > 0
    loose = _eval(rig, "loose", "--score-threshold", "0")
    assert loose["meta"]["score_threshold"] == 0.0
    assert loose["confusion"] != default["confusion"]  # the threshold reaches the model's output


def test_eval_model_refuses_a_threshold_outside_0_1(rig, tmp_path):
    vocabulary = REPO / "config" / "vocabulary_semantickitti.yaml"
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "eval", "model", "--checkpoint", str(rig.checkpoint),
                           "--dataset", str(rig.seq), "--vocabulary", str(vocabulary), "--out", str(tmp_path / "out"),
                           "--score-threshold", "1.5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--score-threshold must be in [0, 1]" in proc.stderr, proc.stderr[-2000:]
