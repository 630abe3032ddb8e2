"""Report files: JSON numbers equal the evaluator's, tables list every class, PNGs are real images."""
import json

import numpy as np
from PIL import Image

from sal_ros.data.labels import semantickitti
from sal_ros.eval.panoptic import PanopticEvaluator
from sal_ros.eval.report import write_report


def test_write_report(tmp_path):
    ls = semantickitti()
    rng = np.random.default_rng(0)
    gt_sem = rng.integers(0, 20, 5000)
    gt_inst = np.where(ls.thing_mask[gt_sem], rng.integers(1, 4, 5000), 0)
    pred_sem = np.where(rng.random(5000) < 0.8, gt_sem, 9)
    ev = PanopticEvaluator.for_label_set(ls, min_points=5)
    ev.add(pred_sem, np.where(ls.thing_mask[pred_sem], gt_inst, 0), gt_sem, gt_inst)
    result = ev.compute()
    paths = write_report(tmp_path / "r", result, ev.confusion, title="random", meta={"checkpoint": "x.pt"})
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["pq"] == result.summary["pq"] and data["meta"]["checkpoint"] == "x.pt"
    assert [row["class"] for row in data["per_class"]] == list(ls.class_names)
    assert np.array(data["confusion"]).sum() == 5000
    md = paths["markdown"].read_text()
    assert all(f"| {name} |" in md for name in ls.class_names) and f"{100 * result.summary['miou']:.1f}" in md
    for key in ("confusion", "per_class"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert not list((tmp_path / "r").glob(".*tmp"))  # no temp files left behind
