"""`sal-ros eval model` as a command: a tiny random checkpoint over the SemanticKITTI sample, read as a dataset
folder and as the converted bag (the node's synchronizer path). Both give the same report, a rerun gives the same
numbers, and the report names the text encoder it ran with."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, require_data, save_tiny_checkpoint


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    seq = require_data("semantickitti", "sequences", "00")
    from sal_ros.data.convert import convert

    root = tmp_path_factory.mktemp("eval_model")
    convert(seq, root / "bag", progress=False)
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    return type("Rig", (), {"root": root, "seq": seq, "bag": root / "bag", "checkpoint": checkpoint})


def _eval(rig, out, *source):
    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "eval", "model", "--checkpoint", str(rig.checkpoint),
                           *source, "--vocabulary", str(REPO / "config" / "vocabulary_semantickitti.yaml"),
                           "--out", str(rig.root / out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((rig.root / out / "metrics.json").read_text())


def test_dataset_and_bag_give_the_same_deterministic_report(rig):
    proc, from_dataset = _eval(rig, "dataset", "--dataset", str(rig.seq))
    assert "class-agnostic PQ" in proc.stdout and "RANDOM weights" in proc.stderr
    for name in ("report.md", "metrics.json", "confusion.png", "per_class.png"):
        assert (rig.root / "dataset" / name).stat().st_size > 0, name
    assert from_dataset["num_scans"] == 2 and from_dataset["num_points"] > 200_000
    assert len(from_dataset["per_class"]) == 19 and len(from_dataset["confusion"]) >= 19
    assert {"pq", "pq_dagger", "miou", "agnostic_pq"} <= set(from_dataset["summary"])
    assert "RANDOM weights" in from_dataset["meta"]["text_encoder"]
    assert "RANDOM weights" in (rig.root / "dataset" / "report.md").read_text()

    _, again = _eval(rig, "again", "--dataset", str(rig.seq))
    _, from_bag = _eval(rig, "bag", "--bag", str(rig.bag))
    for other in (again, from_bag):
        assert other["summary"] == from_dataset["summary"] and other["confusion"] == from_dataset["confusion"]
