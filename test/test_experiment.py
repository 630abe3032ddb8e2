"""``sal-ros experiment config/experiments/mini.yaml --quick`` end to end on real frames, with a renamed copy of a
sequence as the test set (a folder the project has never seen): the properties the protocol must have, not its
numbers (those are in docs/training.md)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cpu_seconds, require_data, wait_until

from sal_ros.experiment.config import load_experiment
from sal_ros.experiment.run import SUP_FRUSTUM, SUP_FULL, UNTRAINED, check_held_out, run_experiment, student_name
from sal_ros.train.loop import METRICS_FILE, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training and scoring
MINI_YAML = REPO / "config" / "experiments" / "mini.yaml"


def renamed_copy(mini, root, seq="07", new="42", scans=(0, 1)):
    """Scans of one sequence copied under another root and sequence name, as a user's own folder would be."""
    src, dst = mini / "sequences" / seq, root / "sequences" / new
    for sub, ext in (("velodyne", ".bin"), ("labels", ".label"), ("image_2", ".png")):
        (dst / sub).mkdir(parents=True)
        for i in scans:
            shutil.copy(src / sub / f"{i:06d}{ext}", dst / sub / f"{i:06d}{ext}")
    for name in ("calib.txt", "poses.txt", "times.txt"):
        shutil.copy(src / name, dst / name)
    return root


def quick_config(tmp_path, test_root):
    """The shipped file, its quick settings, with absolute paths and the renamed copy as the test set."""
    raw = yaml.safe_load(MINI_YAML.read_text())
    base = MINI_YAML.parent
    for key in ("dataset", "recipe", "vocabulary"):
        raw[key] = str((base / raw[key]).resolve())
    quick = raw["quick"]
    quick["out_dir"] = str(tmp_path / "out")
    quick["test"] = [{"name": "mine", "path": str(test_root), "select": "42"}]
    quick["scaling"]["test"] = quick["bev_test"] = "mine"
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_following_progress(cmd, log):
    """The command to its end, however slow a loaded machine makes it; fails only when it stops using CPU."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    wait_until(lambda: proc.poll() is not None, "the quick experiment", progress=lambda: int(cpu_seconds(proc.pid)),
               stall_s=300, poll_s=1)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.timeout(3600)  # about 30 CPU seconds (five 12-step tiny trainings); the wait follows progress
def test_the_quick_experiment_measures_what_the_protocol_claims(tmp_path):
    mini = require_data("semantickitti_mini")
    config = quick_config(tmp_path, renamed_copy(mini, tmp_path / "elsewhere"))
    cmd = [sys.executable, "-m", "sal_ros.cli", "experiment", str(config), "--quick", "--no-progress"]
    run_following_progress(cmd, tmp_path / "first.log")
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    quality = {t: r["quality"] for t, r in results["pseudolabels"].items()}
    assert set(quality) == {"oracle", "slic"}  # quick: null removed the geometric teacher
    assert quality["oracle"]["pq_all"] > quality["slic"]["pq_all"] + 30  # object masks vs superpixels
    models = results["models"]
    assert set(models) == {UNTRAINED, SUP_FRUSTUM, SUP_FULL, student_name("oracle"), student_name("slic")}
    scores = {m: r["tests"]["mine"] for m, r in models.items()}
    assert all(s["frames"] == 2 for s in scores.values())  # the renamed sequence 42 was read, both scans
    # a dozen steps halve every model's loss but do not yet score on unseen scenes (PQ 0 to 6 for the supervised
    # model depending on the step count, as for the untrained one): held-out quality is the full run's (docs)
    for name, model in models.items():
        if name != UNTRAINED:
            losses = [r["loss"] for r in read_metrics(Path(model["train"]["checkpoint"]).parent / METRICS_FILE)]
            assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], (name, losses)
    assert [s["sequences"] for s in results["scaling"]] == [1, 2]
    assert [s["train"]["frames"] for s in results["scaling"]] == [1, 2]
    assert all(s["test"] == "mine" and s["frames"] == 2 for s in results["scaling"])  # named, scored
    # two sequences of the scaling curve = the main oracle student's frames: trained once, shared
    assert results["scaling"][1]["train"]["checkpoint"] == models[student_name("oracle")]["train"]["checkpoint"]
    table = (out / "table.md").read_text()
    assert "| student (oracle) |" in table and "## Data scaling (test set mine)" in table and "select 42" in table
    # where the PQ is lost: the class-agnostic match per ground-truth class adds up to each model's totals
    for s in scores.values():
        for region in ("frustum", "full"):
            per = s[region]["agnostic_by_class"]
            assert per and sum(c["found"] + c["missed"] for c in per) == s[region]["agnostic_tp"] + s[region]["agnostic_fn"]
    assert "Ground-truth segments found / present in the camera frustum, by class" in table
    assert {p.name for p in out.glob("*.png")} == {"bev.png", "scaling.png", "bars.png"}
    # every stage is cached: a rerun (here in this process) trains, labels and scores nothing again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".pt", ".npz") or "eval" in p.parts}
    again = run_experiment(load_experiment(config, quick=True), progress=False, say=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["models"] == models and again["scaling"] == results["scaling"]


def test_a_test_set_sharing_scans_with_training_is_refused(tmp_path):
    require_data("semantickitti_mini")
    raw = yaml.safe_load(MINI_YAML.read_text())
    raw["test"] = [{"name": "leak", "path": raw["dataset"], "select": "05:3"}]
    raw.pop("scaling")
    path = MINI_YAML.parent / f".leak_{os.getpid()}.yaml"  # beside the shipped file: its relative paths hold
    try:
        path.write_text(yaml.safe_dump(raw))
        cfg = load_experiment(path)
    finally:
        path.unlink()
    with pytest.raises(ValueError, match="test set leak shares 1 scans with the training frames"):
        check_held_out(cfg)


def test_the_ray_backend_labels_as_the_local_one(tmp_path, monkeypatch):
    import numpy as np

    from conftest import ray_loopback

    from sal_ros.data.pseudolabels import load_pseudolabels
    from sal_ros.experiment import stages

    require_data("semantickitti_mini")
    ray_loopback(monkeypatch)
    files = {}
    for backend in ("local", "ray"):
        cfg = load_experiment(MINI_YAML)
        cfg.out_dir = tmp_path / backend
        cfg.pseudolabel = {"backend": backend, "workers": 2}
        oracle = next(t for t in cfg.teachers if t.name == "oracle")
        summary = stages.pseudolabel(cfg, oracle, "07:3-4", progress=False)
        assert summary["done"] == 2 and summary["workers"] == 2
        files[backend] = sorted(stages.pseudolabel_dir(cfg, oracle).glob("*.npz"))
    assert [p.name for p in files["ray"]] == [p.name for p in files["local"]] == ["07_000003.npz", "07_000004.npz"]
    for local, ray in zip(files["local"], files["ray"]):
        np.testing.assert_array_equal(load_pseudolabels(local).instance, load_pseudolabels(ray).instance)


def test_a_recipe_search_trains_only_the_students_of_the_overridden_recipe(tmp_path):
    from sal_ros.experiment.config import override_recipe

    mini = require_data("semantickitti_mini")
    cfg = load_experiment(quick_config(tmp_path, renamed_copy(mini, tmp_path / "elsewhere", scans=(0,))), quick=True)
    cfg.teachers = [t for t in cfg.teachers if t.name == "oracle"]
    cfg.steps, cfg.scaling = 2, None
    override_recipe(cfg, "{data: {franken_frustum: 2}, optim: {lr: 0.005}}")
    results = run_experiment(cfg, progress=False, say=lambda s: None, parts=("students",))
    assert list(results["models"]) == [student_name("oracle")]  # no references, no untrained floor
    trained = yaml.safe_load(Path(results["models"][student_name("oracle")]["train"]["config"]).read_text())
    assert trained["data"]["franken_frustum"] == 2 and trained["optim"]["lr"] == 0.005
    assert trained["data"]["max_points"] == 1500  # the quick recipe_overrides stay under the command's
    assert json.loads((cfg.out_dir / "results_students.json").read_text())["models"].keys() == results["models"].keys()
    assert not (cfg.out_dir / "results.json").exists()
    with pytest.raises(ValueError, match="expected a mapping"):
        override_recipe(cfg, "[1, 2]")


def test_presets_are_compared_by_their_students_and_cpu_time(tmp_path, capsys):
    import argparse

    from sal_ros.experiment import cli

    mini = require_data("semantickitti_mini")
    config = quick_config(tmp_path, renamed_copy(mini, tmp_path / "elsewhere", scans=(0,)))
    raw = yaml.safe_load(config.read_text())
    raw["quick"]["teachers"]["slic"] = None  # one teacher: the oracle's students
    config.write_text(yaml.safe_dump(raw))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)

    def run(*extra):
        return cli.main(parser.parse_args([str(config), "--quick", "--no-progress", "--steps", "2", *extra]))

    out = tmp_path / "out"
    for bad, says in ((["--presets", "tiny,tiny:voxel_size"], "expected field=value"),
                      (["--presets", "tiny,no_such_preset"], "no_such_preset"),
                      (["--presets", "tiny", "--latency", "tiny"], "expected preset=ms"),
                      (["--presets", "tiny", "--only", "main"], "students only"),
                      (["--presets", "tiny", "--seeds", "0,x"], "comma-separated integers"),
                      (["--presets", "tiny", "--seeds", "1,1"], "distinct"),
                      (["--presets", "tiny", "--reference", "realtime"], "not one of --presets"),
                      (["--presets", "tiny,realtime:widths=[16,24"], "unbalanced brackets")):
        assert run(*bad) == 1
        assert says in capsys.readouterr().err
    assert not (out / "train").exists()  # refused before anything trained
    assert run("--presets", "tiny,tiny:voxel_size=0.4", "--latency", "tiny=100,tiny:voxel_size=0.4=80",
               "--seeds", "0,1", "--reference", "tiny") == 0
    result = json.loads((out / "presets.json").read_text())
    assert [(r["preset"], r["seed"]) for r in result["rows"]] == [("tiny", 0), ("tiny", 1), ("tiny:voxel_size=0.4", 0),
                                                                   ("tiny:voxel_size=0.4", 1)]
    rows = {(r["preset"], r["seed"]): r for r in result["rows"]}
    assert all(r["model"] == student_name("oracle") and r["tests"]["mine"]["frames"] == 1 for r in rows.values())
    assert {k: r["cpu_ms"] for k, r in rows.items() if k[1] == 0} == {("tiny", 0): 100.0,
                                                                      ("tiny:voxel_size=0.4", 0): 80.0}
    coarse = rows[("tiny:voxel_size=0.4", 0)]["train"]
    assert yaml.safe_load(Path(coarse["config"]).read_text())["model"] == {"preset": "tiny", "voxel_size": 0.4}
    assert coarse["config"] != rows[("tiny", 0)]["train"]["config"]
    reseeded = yaml.safe_load(Path(rows[("tiny:voxel_size=0.4", 1)]["train"]["config"]).read_text())
    assert reseeded["seed"] == 1 and reseeded["model"] == {"preset": "tiny", "voxel_size": 0.4}
    for entry in result["presets"]:  # the summary is the seeds' own scores
        pqs = [rows[(entry["preset"], s)]["tests"]["mine"]["frustum"]["agnostic_pq"] for s in (0, 1)]
        assert entry["tests"]["mine"]["frustum"]["pqs"] == pqs
        assert entry["tests"]["mine"]["frustum"]["mean"] == pytest.approx(np.mean(pqs))
    table = (out / "presets.md").read_text()
    assert "seeds 0, 1" in table and "| % of tiny |" in table
    assert "| tiny:voxel_size=0.4 | student (oracle) | 80.0 |" in table
    # per ground-truth class, the segments found are the two seeds' counts added up
    found_row = next(line for line in table.splitlines() if line.startswith("| tiny:voxel_size=0.4, student (oracle) |"))
    seeds_found = sum(rows[("tiny:voxel_size=0.4", s)]["tests"]["mine"]["frustum"]["agnostic_tp"] for s in (0, 1))
    assert sum(int(cell.split("/")[0]) for cell in found_row.split("|")[2:-1] if "/" in cell) == seeds_found
    assert "summed over the seeds" in table
    assert (out / "presets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a preset's student is the run --recipe-override trains: found done, not trained again
    assert run("--only", "students", "--recipe-override", "{model: {preset: tiny, voxel_size: 0.4}}") == 0
    again = json.loads((out / "results_students.json").read_text())["models"][student_name("oracle")]["train"]
    assert again == coarse


def test_a_preset_scores_as_a_share_of_the_reference_of_the_same_teacher():
    from sal_ros.experiment.presets import of_reference, parse_latency, summarize

    def row(preset, model, pq, seed=0):
        return {"preset": preset, "model": model, "seed": seed, "cpu_ms": None, "train": {},
                "tests": {"02": {"frustum": {"agnostic_pq": pq}, "full": {"agnostic_pq": 0.0}}}}

    rows = [row("tiny", "student (oracle)", 16.0), row("tiny", "student (oracle)", 20.0, seed=1),
            row("minkunet34", "student (slic)", 10.0), row("minkunet34", "student (oracle)", 20.0)]
    out = {"presets": summarize(rows, ["02"])}
    tiny = out["presets"][0]
    assert tiny["seeds"] == [0, 1] and tiny["tests"]["02"]["frustum"]["sd"] == pytest.approx(np.std([16, 20], ddof=1))
    assert of_reference(out, tiny, "02", "frustum") == 90.0  # the mean over seeds against minkunet34's
    assert of_reference(out, tiny, "02", "full") is None  # the reference scores 0: no share
    assert of_reference(dict(out, reference="tiny"), out["presets"][2], "02", "frustum") == 100 * 20 / 18
    assert of_reference(out, summarize([row("tiny", "student (geometric)", 5.0)], ["02"])[0], "02", "frustum") is None
    assert parse_latency("tiny=154.8, realtime:voxel_size=0.4=104.1,realtime:widths=[16,24,32,48]=44.7") == {
        "tiny": 154.8, "realtime:voxel_size=0.4": 104.1, "realtime:widths=[16,24,32,48]": 44.7}
