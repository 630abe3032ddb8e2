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


def write_reports(cfg, results: dict, suffix: str = "") -> None:
    """results{suffix}.json, table{suffix}.md and the PNGs (a scaling-only run: suffix _scaling)."""
    out = cfg.out_dir
    atomic_write(out / f"results{suffix}.json", json.dumps(results, indent=1, default=str))
    atomic_write(out / f"table{suffix}.md", markdown(cfg, results))
    if results["models"]:
        plot_bars(out, results)
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


def plot_bars(out: Path, results: dict) -> None:
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    models = list(results["models"])
    tests = [t["name"] for t in results["experiment"]["tests"]]
    for key, (region, metric, title) in METRICS.items():
        fig, ax = plt.subplots(figsize=(1.6 * len(models) + 2, 4))
        width = 0.8 / max(len(tests), 1)
        for j, test in enumerate(tests):
            vals = [results["models"][m]["tests"].get(test, {}).get(region, {}).get(metric, np.nan) for m in models]
            bars = ax.bar(np.arange(len(models)) + j * width, vals, width, label=f"test {test}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set(xticks=np.arange(len(models)) + width * (len(tests) - 1) / 2, ylabel="%", title=title, ylim=(0, 100))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            atomic_savefig(fig, out / f"bars_{key}.png")
        finally:
            plt.close(fig)


def plot_scaling(path: Path, scaling: list[dict]) -> None:
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    k = [s["sequences"] for s in scaling]
    for region, label in (("frustum", "camera frustum"), ("full", "whole scan")):
        ax.plot(k, [s[region]["agnostic_pq"] for s in scaling], "o-", label=f"class-agnostic PQ, {label}")
    ax.plot(k, [s["frustum"]["miou"] for s in scaling], "s--", label="mIoU, camera frustum")
    ax.set(xlabel="training sequences (10 scans each)", ylabel="%", xticks=k, ylim=(0, 100),
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


def plot_bev(path: Path, views: dict[str, Path], extent: float = 40.0) -> None:
    """Ground truth and each model's segments on the first scan of the chosen test set, seen from above."""
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    loaded = {m: dict(np.load(p, allow_pickle=False)) for m, p in views.items()}
    first = next(iter(loaded.values()))
    xy = first["xy"]
    near = (np.abs(xy[:, 0]) < extent) & (np.abs(xy[:, 1]) < extent)
    panels = [("ground truth", segment_colors(first["gt_sem"].astype(np.int64) * (1 << 32) + first["gt_seg"],
                                              first["gt_sem"] == 0))]
    panels += [(m, segment_colors(v["sem"].astype(np.int64) * (1 << 32) + v["inst"], v["sem"] == 0))
               for m, v in loaded.items()]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, rgb) in zip(axes.ravel(), panels):
        ax.scatter(-xy[near, 1], xy[near, 0], c=rgb[near] / 255.0, s=0.1, linewidths=0)
        ax.set(title=title, xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal")
        ax.set_facecolor("black")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"scan {first['key']}, from above (x forward = up, ±{extent:.0f} m); colours: segments")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        atomic_savefig(fig, path, dpi=80)
    finally:
        plt.close(fig)
