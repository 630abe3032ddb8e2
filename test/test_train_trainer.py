"""Distillation training on the real SemanticKITTI frames with the tiny model: CLI run, exact resume,
two-process DDP on CPU (torchrun, gloo) against the single-process loss curve.

Pseudo-labels here are ground-truth instances restricted to the camera frustum (``ground_truth_scan``),
written through the pseudo-label file format, with random unit tokens: the engine's CLIP tokens would cost
minutes on CPU and the trainer does not care where tokens come from.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import torch  # noqa: E402
from conftest import TRAIN_STEPS, TRAIN_WARMUP, train_config

from sal_ros.cli import main as cli_main  # noqa: E402
from sal_ros.train.loop import read_metrics  # noqa: E402

STOP_AT = 4  # well past warm-up (TRAIN_WARMUP): the cosine decay's end must not move
# BatchNorm statistics are per process under DDP (SyncBatchNorm needs CUDA), so the curves drift apart slowly
DDP_STEPS = 4


def _weights(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("model", state.get("state_dict", state))


def _without_time(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in recs]


def test_cli_run_and_exact_resume(tmp_path, pseudolabel_dir):
    torch.set_num_threads(1)
    full = train_config(tmp_path, pseudolabel_dir, "full", 2)
    assert cli_main(["train", "--config", str(full), "--no-progress"]) == 0
    run = tmp_path / "full"
    assert {"model_last.pt", "model_step0000002.pt", "model_step0000006.pt", "train_state.pt", "metrics.jsonl",
            "curves.png"} <= {p.name for p in run.iterdir()}
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, TRAIN_STEPS + 1)) and all(np.isfinite(r["loss"]) for r in recs)
    lrs = [r["lr"] for r in recs]
    assert lrs[0] < lrs[1] and all(a > b for a, b in zip(lrs[TRAIN_WARMUP:], lrs[TRAIN_WARMUP + 1:]))  # warm-up, decay
    # a second run into the same folder without --resume is refused
    assert cli_main(["train", "--config", str(full), "--no-progress"]) == 1

    part = train_config(tmp_path, pseudolabel_dir, "part", 2)
    assert cli_main(["train", "--config", str(part), "--stop-at", str(STOP_AT), "--no-progress"]) == 0
    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == STOP_AT
    assert cli_main(["train", "--config", str(part), "--resume", "--no-progress"]) == 0
    a, b = _weights(run / "model_last.pt"), _weights(tmp_path / "part" / "model_last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert _without_time(resumed) == _without_time(recs)  # losses, lr, grad norms, batches: bit for bit


def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_clean_log(tmp_path, pseudolabel_dir):
    """Killed before any checkpoint, a run leaves metrics.jsonl lines but no train_state.pt; the restart begins at
    step 0 and used to append to those lines, so steps appeared twice and the curves were drawn over each other."""
    torch.set_num_threads(1)
    cfg = train_config(tmp_path, pseudolabel_dir, "killed", 2)
    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {k}, "loss": 9.0, "lr": 0.0}}\n' for k in (1, 2, 3)))
    assert cli_main(["train", "--config", str(cfg), "--stop-at", "2", "--no-progress"]) == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] != 9.0 for r in recs)


def test_resume_with_another_schedule_or_config_is_refused(tmp_path, pseudolabel_dir, capsys):
    torch.set_num_threads(1)
    cfg = train_config(tmp_path, pseudolabel_dir, "run", 2, steps=3)
    assert cli_main(["train", "--config", str(cfg), "--stop-at", "1", "--no-progress"]) == 0
    state = (tmp_path / "run" / "train_state.pt").read_bytes()
    capsys.readouterr()
    # the old way to stop early: a shorter schedule, then the full one
    assert cli_main(["train", "--config", str(cfg), "--steps", "5", "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "optim.steps: saved 3, now 5" in err and "--stop-at" in err
    changed = yaml.safe_load(cfg.read_text())
    changed["optim"]["lr"] *= 2
    changed["data"]["augment"]["rotate"] = False
    changed["checkpoint_every"] = 1  # not part of the trajectory: allowed to change
    cfg.write_text(yaml.safe_dump(changed))
    assert cli_main(["train", "--config", str(cfg), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "optim.lr: saved 0.001, now 0.002" in err and "data.augment.rotate: saved True, now False" in err
    assert "checkpoint_every" not in err
    assert (tmp_path / "run" / "train_state.pt").read_bytes() == state  # nothing trained, nothing written
    assert cli_main(["train", "--config", str(cfg), "--stop-at", "4", "--no-progress"]) == 1
    assert "--stop-at 4 is outside the schedule's steps 1..3" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, pseudolabel_dir):
    """torchrun, 2 CPU processes (gloo) with 1 sample each == 1 process with the same 2 samples."""
    single = train_config(tmp_path, pseudolabel_dir, "single", 2, steps=DDP_STEPS)
    ddp = train_config(tmp_path, pseudolabel_dir, "ddp", 1, steps=DDP_STEPS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert cli_main(["train", "--config", str(single), "--no-progress"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sal_ros.cli", "train", "--config", str(ddp), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = np.array([r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")])
    b = np.array([r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")])
    assert len(a) == len(b) == DDP_STEPS
    rel = np.abs(b - a) / np.abs(a)
    print(f"DDP vs single process over {DDP_STEPS} steps: max relative loss difference {rel.max():.2e}")
    assert rel.max() < 2e-3, (a, b)
