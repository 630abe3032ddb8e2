"""report.md: both runs side by side, with what the numbers say."""
from __future__ import annotations

from sal_ros.demo.settings import LABEL_MIN_POINTS, ORACLE

STAGES = ("decode", "model.voxelize", "model.backbone", "model.decoder", "model.postprocess", "publish", "total")
RUN_TITLES = {"slic": "SLIC masks (weight-free)", "sam2": "SAM 2 masks", ORACLE: "oracle masks (stand-in for SAM)"}


def pq_cell(v: dict) -> str:
    return f"**{v['pq']}** (SQ {v['sq']}, RQ {v['rq']}; {v['tp']} / {v['fp']} / {v['fn']})"


def quality_table(runs: dict) -> list[str]:
    names = list(runs)
    rows = [f"| segments | {' | '.join(RUN_TITLES.get(n, n) for n in names)} |", "|---" * (len(names) + 1) + "|"]
    first = runs[names[0]]["class_agnostic_pq_vs_ground_truth"]
    for row in first:
        cells = [pq_cell(runs[n]["class_agnostic_pq_vs_ground_truth"][row]) for n in names]
        rows.append(f"| {row} vs ground truth | {' | '.join(cells)} |")
    cells = [pq_cell(runs[n]["student_vs_pseudo_labels"]) for n in names]
    rows.append(f"| student vs its own pseudo-labels (camera frustum) | {' | '.join(cells)} |")
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def online_table(runs: dict) -> list[str]:
    rows = ["| student of | clouds sent | answered | dropped | end-to-end latency median / max (ms) | "
            "in-node latency median (ms) | stage medians (ms) | training (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        on = run["online"]
        timings = on["node_timings_ms"]
        stage = " · ".join(f"{k} {timings[k]['median']:.0f}" for k in STAGES if timings.get(k, {}).get("median"))
        lat, in_node = on["end_to_end_ms"], timings.get("latency", {}).get("median")
        rows.append(f"| {RUN_TITLES.get(name, name)} | {on['clouds_sent']} | {on['clouds_answered']} | "
                    f"{on['dropped']} | {lat['median']} / {lat['max']} | {_ms(in_node)} | {stage or '-'} | "
                    f"{run['train_wall_s']} |")
    return rows


def how_to_read(runs: dict) -> str:
    masks = next(n for n in runs if n != ORACLE)
    text = ("How to read it. The last row is the distillation itself: does the lidar student reproduce what its 2D "
            "teacher lifted? The rows above compare with ground truth, and there the student can only be as good as "
            "its pseudo-labels. The oracle column replaces the 2D masks by the ground-truth segments rendered into "
            "the camera image (everything else is the same: CLIP tokens, lifting with the occlusion test, camera "
            "fusion, DBSCAN replace, training): it stands in for SAM and shows what lifting and distillation make "
            "of object-level masks. The students learn only inside the camera frustums (the only labelled points), "
            "so the full-scan row shows how far that carries to the 360-degree sweep.")
    if masks == "slic":
        text += (" The SLIC column is the run that needs no weights at all: superpixels are image regions, not "
                 "objects, so they match few ground-truth segments and score near 0 against ground truth, while "
                 "the student still learns them (last row). Give SAM 2 weights (`--masks sam2 --sam2-checkpoint "
                 "...`) for real object masks.")
    return text


def report_markdown(m: dict) -> str:
    runs = m["runs"]
    minutes = m["wall_s"] / 60
    return "\n".join([
        "# sal_ros demo report", "",
        f"**Weights.** {m['weights']}", "",
        f"Class-agnostic panoptic quality PQ (%) on {m['frames']} real SemanticKITTI scans, with SQ, RQ and "
        f"TP / FP / FN (segments of at least {LABEL_MIN_POINTS} points, SemanticKITTI convention):", "",
        *quality_table(runs), "",
        how_to_read(runs), "",
        "Online: each student in the segmenter node on a bag replay (real rclpy + Fast DDS on localhost, CPU):", "",
        *online_table(runs), "",
        f"Demo wall time: {m['wall_s']} s ({minutes:.1f} min); training {m['config']['steps']} steps per student.",
        "",
    ])
