"""Self-training (train/selftrain.py): a student's confident predictions outside the cameras become labels (an
object cut by the frustum edge keeps the teacher's id), rounds fine-tune from the round before, each cached."""
import json

import numpy as np
import pytest
import yaml
from conftest import REPO, require_data

from sal_ros.train.dataset import LabeledScan
from sal_ros.train.selftrain import SelfTrainConfig, relabel


def scan_with_cut_object() -> LabeledScan:
    """10 points: 0-3 inside the frustum (teacher instance 1 at 0-2, unlabelled 3), 4-9 outside."""
    inside = np.arange(10) < 4
    instance = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    return LabeledScan("00_000000", np.zeros((10, 3), np.float32), np.zeros(10, np.float32), instance,
                       np.array([[1.0, 0.0]], np.float32), inside)


def test_confident_points_outside_become_labels_and_a_cut_object_keeps_its_teacher_id():
    scan = scan_with_cut_object()
    # query 0: the teacher's object and its continuation outside (6, 7); query 1: a new object (4, 5);
    # query 2: point 8, too few points; point 9: query 1 but not confident; point 3: inside, stays unlabelled
    query = np.array([0, 0, 0, 1, 1, 1, 0, 0, 2, 1])
    score = np.array([0.9, 0.9, 0.9, 0.9, 0.8, 0.7, 0.95, 0.9, 0.9, 0.2])
    tokens = np.array([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
    out, counts = relabel(scan, query, score, tokens, SelfTrainConfig(threshold=0.5, min_points=2))
    assert out.instance.tolist() == [1, 1, 1, 0, 2, 2, 1, 1, 0, 0]
    np.testing.assert_allclose(out.tokens, [[1.0, 0.0], [0.6, 0.8]])  # the teacher's token kept, the new one added
    assert out.in_frustum.tolist() == [True] * 8 + [False, False]  # the crop now lets the new labels in
    assert counts == {"points": 4, "open_points": 6, "extended": 1, "created": 1}
    everywhere, _ = relabel(scan, query, score, tokens, SelfTrainConfig(threshold=0.5, min_points=1,
                                                                        outside_only=False))
    assert everywhere.instance[3] == 2 and everywhere.instance[8] == 3  # unlabelled inside too, and min_points 1


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="self_training"):
        SelfTrainConfig.from_dict({"rounds": 1, "threshold": 0.0})
    with pytest.raises(ValueError, match="unknown self_training settings"):
        SelfTrainConfig.from_dict({"round": 1})


def test_train_command_runs_rounds_on_real_scans_and_a_rerun_redoes_none(tmp_path, capsys):
    from sal_ros.cli import main
    from sal_ros.model.checkpoint import read_checkpoint

    seq = require_data("semantickitti_mini", "sequences", "10")
    cfg = yaml.safe_load((REPO / "config" / "train_oracle.yaml").read_text())
    cfg.update(sources=[{"frames": str(seq), "select": "10:0-1", "oracle": "semantickitti"}], device="cpu",
               out_dir=str(tmp_path / "run"), checkpoint_every=100,
               self_training={"rounds": 2, "steps": 2, "threshold": 0.01, "min_points": 1})
    cfg["optim"]["steps"] = 3
    cfg["data"]["max_points"] = 3000
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "self-training round 1:" in printed and "self-training round 2:" in printed
    rounds = [json.loads((tmp_path / "run" / f"round_{r}" / "done.json").read_text()) for r in (1, 2)]
    assert rounds[0]["from"] == str(tmp_path / "run" / "model_last.pt")
    assert rounds[1]["from"] == rounds[0]["checkpoint"]
    assert all(r["labels"]["points"] > 0 and r["steps"] == 2 for r in rounds)
    saved = read_checkpoint(rounds[1]["checkpoint"])
    assert saved["extra"]["step"] == 2 and saved["extra"]["train_config"]["data"]["franken_frustum"] == 1
    stamps = [(tmp_path / "run" / f"round_{r}" / "model_last.pt").stat().st_mtime_ns for r in (1, 2)]
    assert main(["train", "--config", str(path), "--resume", "--no-progress"]) == 0
    assert "self-training round 2:" in capsys.readouterr().out
    assert stamps == [(tmp_path / "run" / f"round_{r}" / "model_last.pt").stat().st_mtime_ns for r in (1, 2)]


def test_the_experiment_scores_each_self_training_round_as_a_model(tmp_path):
    from sal_ros.experiment import stages
    from sal_ros.experiment.config import load_experiment
    from sal_ros.experiment.run import round_name, score_self_training, self_training_rounds, student_name

    require_data("semantickitti_mini")
    cfg = load_experiment(REPO / "config" / "experiments" / "mini.yaml", quick=True)
    cfg.out_dir, cfg.train = tmp_path, "00:0"
    assert self_training_rounds(cfg) == 0  # the shipped recipe: none
    cfg.recipe["self_training"] = {"rounds": 1, "steps": 2, "threshold": 0.01, "min_points": 1}
    oracle = next(t for t in cfg.teachers if t.name == "oracle")
    stages.pseudolabel(cfg, oracle, cfg.train, progress=False)
    train_cfg = stages.train_config(cfg, stages.student_sources(cfg, oracle, cfg.train))
    name = student_name("oracle")
    results = {"models": {name: {"train": stages.train(cfg, train_cfg, progress=False), "tests": {}}}}
    score_self_training(cfg, results, name, train_cfg, progress=False)
    assert list(results["models"]) == [name, round_name(name, 1)]
    first = results["models"][round_name(name, 1)]
    assert first["train"]["from"] == results["models"][name]["train"]["checkpoint"]
    assert first["train"]["labels"]["points"] > 0 and first["train"]["frames"] == 1
    test = cfg.tests[0].name
    assert first["tests"][test]["frames"] == 2
    assert {"frustum", "full"} <= set(first["tests"][test])
    again = {"models": {name: results["models"][name]}}
    score_self_training(cfg, again, name, train_cfg, progress=False)  # cached: nothing trained again
    assert again["models"][round_name(name, 1)] == first
