"""Pseudo-label evaluation: metric on hand-made cases, oracle masks on a real scan, files vs on-the-fly."""
import numpy as np
import pytest
from conftest import require_data

from sal_ros.pseudolabel.engine import EngineConfig, run
from sal_ros.eval.pseudolabels import PseudoLabelScore, markdown_table
from sal_ros.pseudolabel.evaluate import evaluate_pseudolabels


def test_score_by_hand():
    # GT: thing A (60 pts, id 5), thing B (60 pts, id 6), stuff road (120 pts, id 40).
    gt_seg = np.r_[np.full(60, 5), np.full(60, 6), np.full(120, 40)]
    thing = np.r_[np.ones(120, bool), np.zeros(120, bool)]
    gt_cls = np.r_[np.ones(120), np.full(120, 9)].astype(np.int64)
    perfect = PseudoLabelScore()
    perfect.add(np.r_[np.full(60, 1), np.full(60, 2), np.full(120, 3)], gt_cls, gt_seg, thing, 50)
    s = perfect.summary()
    assert s["pq_all"] == pytest.approx(100) and s["pq_things"] == pytest.approx(100) and s["coverage"] == 100
    # A and B merged into one pseudo-instance, road unlabelled: no TP, one FP, three FN (all) / two FN (things).
    merged = PseudoLabelScore()
    merged.add(np.r_[np.full(120, 1), np.zeros(120, int)], gt_cls, gt_seg, thing, 50)
    s = merged.summary()
    assert (s["tp_all"], s["fp_all"], s["fn_all"]) == (0, 1, 3) and s["pq_all"] == 0
    assert (s["tp_things"], s["fp_things"], s["fn_things"]) == (0, 1, 2)
    assert s["coverage"] == pytest.approx(50) and s["thing_coverage"] == pytest.approx(100)
    # Road split in two halves: things still perfect, a stuff prediction never counts against things.
    split = PseudoLabelScore()
    split.add(np.r_[np.full(60, 1), np.full(60, 2), np.full(60, 3), np.full(60, 4)], gt_cls, gt_seg, thing, 50)
    s = split.summary()
    assert s["pq_things"] == pytest.approx(100) and (s["tp_all"], s["fp_all"], s["fn_all"]) == (2, 2, 1)


def test_oracle_and_files_on_real_scan(tmp_path):
    seq = require_data("semantickitti", "sequences", "00")
    res = evaluate_pseudolabels(seq, masks=("oracle", "slic"), variants=("naive", "occlusion + DBSCAN replace"),
                                max_frames=1, progress=False)
    rows = {(r["masks"], r["lifting"]): r for r in res["rows"]}
    oracle = rows[("oracle", "naive")]
    assert oracle["pq_all"] > 70 and oracle["pq_things"] > 70 and oracle["coverage"] > 95
    assert rows[("slic", "naive")]["pq_all"] < oracle["pq_all"]  # superpixels split objects
    assert "| oracle | naive |" in markdown_table(res)
    # Files written by a run score exactly like the same configuration evaluated on the fly.
    out = tmp_path / "pl"
    run(seq, EngineConfig(masks="slic", mask_options={"n_segments": 150}, tokens=False), out, max_frames=1,
        progress=False)
    files = evaluate_pseudolabels(seq, pseudolabels=out, max_frames=1, progress=False)["rows"][0]
    fly = rows[("slic", "occlusion + DBSCAN replace")]
    for key in ("pq_all", "pq_things", "coverage", "tp_all", "fp_all", "fn_all"):
        assert files[key] == pytest.approx(fly[key]), key
