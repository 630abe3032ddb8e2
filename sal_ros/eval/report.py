"""Evaluation report: metrics.json, report.md (tables), confusion.png and per_class.png, written atomically."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write, write_json
from sal_ros.eval.panoptic import PanopticResult
from sal_ros.eval.confusion import ConfusionMatrix


def atomic_savefig(fig, path: str | Path, dpi: int = 120) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * float(x):.1f}"


def markdown_tables(result: PanopticResult, title: str = "Evaluation", meta: dict | None = None) -> str:
    s = result.summary
    lines = [f"# {title}", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [f"- scans: {result.num_scans}, labelled points: {result.num_points}", "",
              "| PQ | PQ† | SQ | RQ | PQ things | PQ stuff | mIoU | class-agnostic PQ | SQ | RQ |",
              "|---|---|---|---|---|---|---|---|---|---|",
              "| " + " | ".join(_pct(s[k]) for k in ("pq", "pq_dagger", "sq", "rq", "pq_things", "pq_stuff", "miou",
                                                    "agnostic_pq", "agnostic_sq", "agnostic_rq")) + " |", "",
              "Means over all classes, an absent class scoring 0 (semantic-kitti-api). Over the "
              f"{int(s['classes_present'])} classes present only: "
              + ", ".join(f"{name} {_pct(s[k + '_present'])}" for name, k in (
                  ("PQ", "pq"), ("PQ†", "pq_dagger"), ("SQ", "sq"), ("RQ", "rq"), ("mIoU", "miou"))) + ".", "",
              "| class | thing | PQ | SQ | RQ | IoU | TP | FP | FN |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result.per_class():
        lines.append(f"| {row['class']} | {'yes' if row['thing'] else ''} | {_pct(row['pq'])} | {_pct(row['sq'])} | "
                     f"{_pct(row['rq'])} | {_pct(row['iou'])} | {row['tp']} | {row['fp']} | {row['fn']} |")
    lines += ["", "Values in %. '–': class absent from ground truth and predictions (0 in the means above, left "
                  "out of the present-classes means)."]
    if result.agnostic_per_class():
        lines += ["", "Class-agnostic segments by ground-truth class: found / missed by the class-agnostic match "
                      "(IoU > 0.5, any predicted class), SQ of those found, and the unmatched predictions lying "
                      "mostly on the class. A stuff class is one segment per scan.", "",
                  "| ground-truth class | thing | found | missed | SQ | spurious |", "|---|---|---|---|---|---|"]
        for row in result.agnostic_per_class():
            lines.append(f"| {row['class']} | {'yes' if row['thing'] else ''} | {row['found']} | {row['missed']} | "
                         f"{_pct(row['sq'])} | {row['spurious']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: ConfusionMatrix, class_names, path: str | Path) -> Path:
    """Row-normalized (per ground-truth class) confusion; the first column is 'predicted no class'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = confusion.conf[:, 1:].T.astype(np.float64)  # rows: gt 1..C, cols: pred 0..C
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = conf / conf.sum(1, keepdims=True)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * n + 3, 0.45 * n + 2))
    im = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n + 1), ["(none)", *class_names], rotation=90)
    ax.set_yticks(range(n), list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of ground-truth points")
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def plot_per_class(result: PanopticResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.class_names)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(0.5 * n + 3, 4))
    ax.bar(x - 0.2, np.nan_to_num(result.pq) * 100, 0.4, label="PQ")
    ax.bar(x + 0.2, np.nan_to_num(result.iou) * 100, 0.4, label="IoU")
    ax.set_xticks(x, [f"{c}{'*' if t else ''}" for c, t in zip(result.class_names, result.things)], rotation=60,
                  ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"PQ {_pct(result.summary['pq'])}  mIoU {_pct(result.summary['miou'])}  (* thing)")
    ax.legend()
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def write_report(out_dir: str | Path, result: PanopticResult, confusion: ConfusionMatrix | None = None,
                 title: str = "Evaluation", meta: dict | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, per_class.png and (with ``confusion``) confusion.png into ``out_dir``."""
    out = Path(out_dir)
    data = {"title": title, "meta": meta or {}, **result.to_dict()}
    if confusion is not None:
        data["confusion"] = confusion.conf.tolist()
    paths = {"json": write_json(out / "metrics.json", data),
             "markdown": atomic_write(out / "report.md", markdown_tables(result, title, meta)),
             "per_class": plot_per_class(result, out / "per_class.png")}
    if confusion is not None:
        paths["confusion"] = plot_confusion(confusion, result.class_names, out / "confusion.png")
    return paths


def write_result(out: Path, result: dict, text_name: str, text: str, figure_name: str,
                 plot: Callable[[dict, Path], None]) -> None:
    """metrics.json (``result``; numpy scalars as floats), a text file and a figure of ``result`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", json.dumps(result, indent=1, default=float))
    atomic_write(out / text_name, text)
    plot(result, out / figure_name)
