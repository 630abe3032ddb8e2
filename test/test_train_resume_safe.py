"""`sal-ros train --resume` reads train_state.pt without unpickling code: a state file planted in a run folder
cannot run anything as the user, and a genuine one still resumes (issue 14 item 1)."""
import re
from pathlib import Path

import torch

from sal_ros.cli import main as cli_main
from conftest import train_config

REPO = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this calls open(marker, "w"): any code would run the same way."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_train_state_runs_no_code_and_a_real_one_resumes(tmp_path, pseudolabel_dir, capsys):
    torch.set_num_threads(1)
    cfg = train_config(tmp_path, pseudolabel_dir, "run", 2, steps=2)
    assert cli_main(["train", "--config", str(cfg), "--stop-at", "1", "--no-progress"]) == 0
    state_path = tmp_path / "run" / "train_state.pt"
    # what the trainer writes loads with weights_only (optimizer, scheduler, RNG states, config)
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    genuine = state_path.read_bytes()
    marker = tmp_path / "pwned"
    state["rng"] = _Planted(marker)
    torch.save(state, state_path)
    capsys.readouterr()
    assert cli_main(["train", "--config", str(cfg), "--resume", "--no-progress"]) == 1
    assert not marker.exists(), "resume executed code from train_state.pt"
    err = capsys.readouterr().err
    assert "train_state.pt" in err and "not plain data" in err, err
    state_path.write_bytes(genuine)
    assert cli_main(["train", "--config", str(cfg), "--resume", "--no-progress"]) == 0
    assert (tmp_path / "run" / "model_step0000002.pt").is_file()


def test_no_loader_in_the_package_can_run_code_from_a_file():
    unsafe = re.compile(r"weights_only\s*=\s*False|import pickle|pickle\.load|yaml\.(unsafe_)?load\(|"
                        r"allow_pickle\s*=\s*True|yaml\.Loader|import dill|import cloudpickle")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sorted((REPO / "sal_ros").rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not found, found


def test_a_train_state_naming_a_model_outside_its_run_folder_is_refused(tmp_path, pseudolabel_dir, capsys):
    """Issue 24 item 13: ``model: ../elsewhere/model.pt`` in train_state.pt would load weights from outside the
    run (here a genuine checkpoint, so the old code resumed from it)."""
    import shutil

    torch.set_num_threads(1)
    cfg = train_config(tmp_path, pseudolabel_dir, "run", 2, steps=2)
    assert cli_main(["train", "--config", str(cfg), "--stop-at", "1", "--no-progress"]) == 0
    state_path = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "run" / state["model"], tmp_path / "elsewhere" / "model.pt")
    for planted in ("../elsewhere/model.pt", str(tmp_path / "elsewhere" / "model.pt")):
        torch.save({**state, "model": planted}, state_path)
        capsys.readouterr()
        assert cli_main(["train", "--config", str(cfg), "--resume", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "is not a file name in the run folder" in err and planted in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_pretrain_resume_refuses_a_planted_state_in_one_line(tmp_path, capsys):
    """Issue 24 item 13: `pretrain --resume` refused a planted state with a raw UnpicklingError traceback."""
    from conftest import require_data
    from test_pretrain import _config

    torch.set_num_threads(1)
    cfg = _config(tmp_path, require_data("semantickitti", "sequences", "00"), "run", steps=2)
    assert cli_main(["pretrain", "--config", str(cfg), "--stop-at", "1", "--no-progress"]) == 0
    state_path = tmp_path / "run" / "pretrain_state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "torch_rng": _Planted(marker)}, state_path)
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", str(cfg), "--resume", "--no-progress"]) == 1
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "pretrain_state.pt" in err and "not plain data" in err and len(err.strip().splitlines()) == 1, err
    torch.save({**state, "model": "../../model.pt"}, state_path)
    assert cli_main(["pretrain", "--config", str(cfg), "--resume", "--no-progress"]) == 1
    assert "is not a file name in the run folder" in capsys.readouterr().err
