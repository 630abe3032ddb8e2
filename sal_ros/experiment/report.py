"""What an experiment leaves for people: results.json, table.md, a bar chart per metric, the scaling curve and a
bird's-eye view of one test scan per model (PNGs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write
from sal_ros.core.palette import segment_colors

METRICS = {  # key in results: (region, metric, title)
    "agnostic_pq_frustum": ("frustum", "agnostic_pq", "class-agnostic PQ, camera frustum"),
    "agnostic_pq_full": ("full", "agnostic_pq", "class-agnostic PQ, whole scan"),
    "pq_frustum": ("frustum", "pq", "semantic PQ (19 classes), camera frustum"),
    "miou_frustum": ("frustum", "miou", "mIoU (19 classes), camera frustum"),
    "pq_full": ("full", "pq", "semantic PQ (19 classes), whole scan"),
    "miou_full": ("full", "miou", "mIoU (19 classes), whole scan"),
}
REGION_TITLES = {"frustum": "camera frustum", "full": "whole scan"}
SUPERVISED = {"frustum": "supervised (frustum)", "full": "supervised (full scan)"}


def ratio(results: dict, model: str, test: str, region: str) -> float | None:
    """Class-agnostic PQ of ``model`` as % of the supervised reference of that region (SAL's 91 %)."""
    ref = results["models"].get(SUPERVISED[region], {}).get("tests", {}).get(test)
    own = results["models"][model]["tests"].get(test)
    if not ref or not own or not ref[region]["agnostic_pq"]:
        return None
    return 100 * own[region]["agnostic_pq"] / ref[region]["agnostic_pq"]


def _f(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def markdown(cfg, results: dict) -> str:
    exp, env = results["experiment"], results["environment"]
    lines = [f"# Experiment: train {exp['train']} of {exp['dataset']}", "",
             f"Steps {exp['steps'] or exp['recipe'].get('optim', {}).get('steps')}, recipe model "
             f"{exp['recipe'].get('model')}, oracle-token noise {exp['token_noise']}; CPU {env['cpu_model']}, "
             f"{env['torch_threads']} torch threads, load average {env['load_average_start']} at the start"
             + (f", {env['load_average_end']} at the end, {env['wall_s']} s wall" if "wall_s" in env else "") + ".",
             "", "Values in %. PQ / SQ / RQ class-agnostic unless marked semantic (19 classes, absent classes 0, "
             "semantic-kitti-api); ratio = class-agnostic PQ as % of the supervised reference of the same region.", ""]
    lines += ["## Pseudo-labels on the training frames", "",
              "| teacher | PQ | SQ | RQ | TP / FP / FN | coverage | instances per scan |", "|---|---|---|---|---|---|---|"]
    for name, pl in results["pseudolabels"].items():
        q = pl.get("quality")
        if q:
            lines.append(f"| {name} | {_f(q['pq_all'])} | {_f(q['sq_all'])} | {_f(q['rq_all'])} | {q['tp_all']} / "
                         f"{q['fp_all']} / {q['fn_all']} | {_f(q['coverage'])} | {q['instances_per_scan']:.1f} |")
    for test in exp["tests"]:
        name = test["name"]
        lines += ["", f"## Test set {name} ({test['path']}, select {test['select']})", "",
                  "| model | frustum PQ | SQ | RQ | full PQ | SQ | RQ | semantic PQ frustum | mIoU frustum | "
                  "semantic PQ full | mIoU full | % of supervised frustum / full | frames trained |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, r in results["models"].items():
            t = r["tests"].get(name)
            if not t:
                continue
            fr, fu = t["frustum"], t["full"]
            pct = f"{_f(ratio(results, model, name, 'frustum'))} / {_f(ratio(results, model, name, 'full'))}"
            lines.append(f"| {model} | {_f(fr['agnostic_pq'])} | {_f(fr['agnostic_sq'])} | {_f(fr['agnostic_rq'])} | "
                         f"{_f(fu['agnostic_pq'])} | {_f(fu['agnostic_sq'])} | {_f(fu['agnostic_rq'])} | "
                         f"{_f(fr['pq'])} | {_f(fr['miou'])} | {_f(fu['pq'])} | {_f(fu['miou'])} | {pct} | "
                         f"{r['train'].get('frames', 0)} |")
        lines += found_table({m: r["tests"][name]["frustum"].get("agnostic_by_class", [])
                              for m, r in results["models"].items() if name in r["tests"]})
    if results["scaling"]:
        lines += ["", f"## Data scaling (test set {results['scaling'][0]['test']})", "",
                  "| training sequences | selection | frames | frustum PQ | full PQ | mIoU frustum |",
                  "|---|---|---|---|---|---|"]
        for s in results["scaling"]:
            lines.append(f"| {s['sequences']} | {s['select']} | {s['train']['frames']} | "
                         f"{_f(s['frustum']['agnostic_pq'])} | {_f(s['full']['agnostic_pq'])} | "
                         f"{_f(s['frustum']['miou'])} |")
    lines += ["", "## Each row alone", "",
              "A model: `sal-ros train --config <config.yaml below>`, then `sal-ros eval model --checkpoint "
              "<its folder>/model_last.pt --dataset <test path> --select <test select> --vocabulary "
              f"{exp['vocabulary']} --out <dir> [--frustum-only]`.", ""]
    for model, r in results["models"].items():
        lines.append(f"- {model}: {r['train'].get('config', '(untrained: the recipe model at its seed)')}")
    for s in results["scaling"]:
        lines.append(f"- scaling, {s['sequences']} sequences: {s['train']['config']}")
    return "\n".join(lines) + "\n"


def found_table(per_model: dict[str, list[dict]], region: str = "frustum", note: str = "") -> list[str]:
    """Which ground-truth segments each model finds (its ``agnostic_by_class`` rows: the class-agnostic match per
    ground-truth class): where the PQ is lost, e.g. cars found and every stuff region missed."""
    rows = {m: {c["class"]: c for c in per} for m, per in per_model.items()}
    classes = sorted({c for per in rows.values() for c in per},
                     key=lambda c: (-max(per[c]["found"] + per[c]["missed"] for per in rows.values() if c in per), c))
    if not classes:
        return []

    def cell(c: dict) -> str:
        return f"{c['found']}/{c['found'] + c['missed']}" + (f" +{c['spurious']}" if c["spurious"] else "")

    lines = ["", f"Ground-truth segments found / present in the {REGION_TITLES[region]}, by class (class-agnostic "
                 "match, IoU > 0.5; a stuff class is one segment per scan; a segment under min_points counts only "
                 f"when found; +N: unmatched predictions lying mostly on the class){note}:", "",
             "| model | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for model, per in rows.items():
        lines.append(f"| {model} | " + " | ".join(cell(per[c]) if c in per else "–" for c in classes) + " |")
    return lines


def summed_by_class(lists: list[list[dict]]) -> list[dict]:
    """``agnostic_by_class`` rows of several runs (e.g. seeds) added up per class."""
    total: dict[str, dict] = {}
    for per in lists:
        for c in per:
            t = total.setdefault(c["class"], {"class": c["class"], "found": 0, "missed": 0, "spurious": 0})
            for k in ("found", "missed", "spurious"):
                t[k] += c[k]
    return list(total.values())


def write_reports(cfg, results: dict, suffix: str = "", figures: bool = True) -> None:
    """results{suffix}.json, table{suffix}.md and, with ``figures``, the PNGs (a scaling-only run: suffix _scaling).
    The PNGs take seconds (a bird's-eye scatter of whole scans): drawn once at the end, not after every model."""
    out = cfg.out_dir
    atomic_write(out / f"results{suffix}.json", json.dumps(results, indent=1, default=str))
    atomic_write(out / f"table{suffix}.md", markdown(cfg, results))
    if not figures:
        return
    if results["models"]:
        plot_bars(out / "bars.png", results)
    if results["scaling"]:
        plot_scaling(out / "scaling.png", results["scaling"])
    views = {m: _view_file(r, cfg.bev_test) for m, r in results["models"].items()}
    views = {m: v for m, v in views.items() if v is not None}
    if views:
        plot_bev(out / "bev.png", views)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: Path, results: dict) -> None:
    """One bar chart per metric (a panel each, one PNG): every model on every test set."""
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    models = list(results["models"])
    tests = [t["name"] for t in results["experiment"]["tests"]]
    cols = 2
    rows = -(-len(METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (1.3 * len(models) + 2), 3.6 * rows), squeeze=False)
    width = 0.8 / max(len(tests), 1)
    for ax, (region, metric, title) in zip(axes.ravel(), METRICS.values()):
        for j, test in enumerate(tests):
            vals = [results["models"][m]["tests"].get(test, {}).get(region, {}).get(metric, np.nan) for m in models]
            bars = ax.bar(np.arange(len(models)) + j * width, vals, width, label=f"test {test}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set(xticks=np.arange(len(models)) + width * (len(tests) - 1) / 2, ylabel="%", ylim=(0, 100))
        ax.set_title(title, fontsize=9)
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=80)
    finally:
        plt.close(fig)


def plot_scaling(path: Path, scaling: list[dict]) -> None:
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    k = [s["sequences"] for s in scaling]
    for region, label in REGION_TITLES.items():
        ax.plot(k, [s[region]["agnostic_pq"] for s in scaling], "o-", label=f"class-agnostic PQ, {label}")
    ax.plot(k, [s["frustum"]["miou"] for s in scaling], "s--", label="mIoU, camera frustum")
    frames = ", ".join(str(s["train"]["frames"]) for s in scaling)
    ax.set(xlabel=f"training sequences ({frames} frames)", ylabel="%", xticks=k, ylim=(0, 100),
           title=f"data scaling, test set {scaling[0]['test']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def _view_file(model_results: dict, test: str) -> Path | None:
    folder = Path(model_results["train"]["checkpoint"]).parent / "eval"
    found = sorted(folder.glob(f"{test}-*.npz")) if folder.is_dir() else []
    return found[-1] if found else None


def bev_image(xy: np.ndarray, rgb: np.ndarray, extent: float, pixel: float = 0.2) -> np.ndarray:
    """The points' colours on a black grid seen from above (x forward = up, y left = left): an image, which draws in
    milliseconds where a scatter of a whole scan per panel takes seconds."""
    n = int(round(2 * extent / pixel))
    row = ((extent - xy[:, 0]) / pixel).astype(np.int64)
    col = ((extent - xy[:, 1]) / pixel).astype(np.int64)
    ok = (row >= 0) & (row < n) & (col >= 0) & (col < n)
    image = np.zeros((n, n, 3), np.uint8)
    image[row[ok], col[ok]] = rgb[ok]
    return image


def plot_bev(path: Path, views: dict[str, Path], extent: float = 40.0) -> None:
    """Ground truth and each model's segments on the first scan of the chosen test set, seen from above."""
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    loaded = {m: dict(np.load(p, allow_pickle=False)) for m, p in views.items()}
    first = next(iter(loaded.values()))
    xy = first["xy"]
    panels = [("ground truth", segment_colors(first["gt_sem"].astype(np.int64) * (1 << 32) + first["gt_seg"],
                                              first["gt_sem"] == 0))]
    panels += [(m, segment_colors(v["sem"].astype(np.int64) * (1 << 32) + v["inst"], v["sem"] == 0))
               for m, v in loaded.items()]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, rgb) in zip(axes.ravel(), panels):
        ax.imshow(bev_image(xy, rgb, extent), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"scan {first['key']}, from above (x forward = up, ±{extent:.0f} m); colours: segments", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    try:
        atomic_savefig(fig, path, dpi=80)
    finally:
        plt.close(fig)
