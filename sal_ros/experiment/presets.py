"""``sal-ros experiment FILE --presets tiny,realtime,minkunet34 [--latency ...]``: the teachers' students trained once
per model preset (the recipe with ``model:`` set to the preset spec, each in its own cached run, the run
``--recipe-override '{model: {preset: ...}}'`` trains), scored on every test set and set against each preset's CPU
time per scan: presets.json, presets.md and presets.png (latency against held-out class-agnostic PQ, camera frustum
and whole scan), each PQ also as % of minkunet34's where it is one of the presets (issue 25's quality goal)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write
from sal_ros.experiment.config import ExperimentConfig, with_recipe_override
from sal_ros.experiment.report import REGION_TITLES, _f, _plt

REFERENCE = "minkunet34"
GOAL_MS = 50.0  # issue 25: the whole per-scan path on one core


def check_specs(specs: list[str]) -> list[dict]:
    """Each ``preset[:field=value...]`` as train-config model settings; ValueError names a bad one before anything
    trains."""
    from sal_ros.model.config import ModelConfig, preset_settings

    out = []
    for spec in specs:
        settings = preset_settings(spec)
        name, fields_ = settings["preset"], {k: v for k, v in settings.items() if k != "preset"}
        try:
            ModelConfig.preset(name, **fields_)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preset {spec!r}: {exc}") from None
        out.append(settings)
    return out


def parse_latency(text: str | None) -> dict[str, float]:
    """CPU ms per scan by preset spec: ``spec=ms,...`` (the last '=' separates: ``tiny:voxel_size=0.4=111.6``) or a
    ``sal-ros bench model`` JSON file (each CPU preset's median ``total_cpu``)."""
    if not text:
        return {}
    path = Path(text)
    if path.is_file():
        bench = json.loads(path.read_text())
        try:
            return {spec: float(row["median_ms"]["total_cpu"]) for spec, row in bench["models"]["cpu"].items()}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a `sal-ros bench model` result (missing {exc})") from None
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        spec, sep, ms = item.rpartition("=")
        try:
            out[spec] = float(ms)
        except ValueError:
            sep = ""
        if not sep or not spec:
            raise ValueError(f"latency {item!r}: expected preset=ms (e.g. tiny=154.8) or a bench model JSON file")
    return out


def compare_presets(cfg: ExperimentConfig, specs: list[str], latency: dict[str, float], progress: bool = True,
                    say=print) -> dict:
    """Per preset, ``run_experiment(parts=("students",))`` with that model (cached runs are found, not retrained);
    the rows and the reports written to ``cfg.out_dir``."""
    from sal_ros.experiment.run import run_experiment

    rows = []
    for spec, settings in zip(specs, check_specs(specs)):
        say(f"preset: {spec}")
        run_cfg = with_recipe_override(cfg, {"model": settings})
        results = run_experiment(run_cfg, progress=progress, say=say, parts=("students",))
        for model, r in results["models"].items():
            rows.append({"preset": spec, "model": model, "cpu_ms": latency.get(spec), "train": r["train"],
                         "tests": r["tests"], "environment": results["environment"]})
    out = {"experiment": {"train": cfg.train, "steps": cfg.steps, "tests": [t.name for t in cfg.tests],
                          "recipe": cfg.recipe}, "latency_source": latency, "rows": rows}
    atomic_write(cfg.out_dir / "presets.json", json.dumps(out, indent=1, default=str))
    atomic_write(cfg.out_dir / "presets.md", presets_markdown(out))
    plot_presets(cfg.out_dir / "presets.png", out)
    return out


def of_reference(out: dict, row: dict, test: str, region: str) -> float | None:
    """The row's class-agnostic PQ as % of minkunet34's student of the same teacher (None without one)."""
    ref = next((r for r in out["rows"] if r["preset"] == REFERENCE and r["model"] == row["model"]), None)
    if ref is None or not ref["tests"][test][region]["agnostic_pq"]:
        return None
    return 100 * row["tests"][test][region]["agnostic_pq"] / ref["tests"][test][region]["agnostic_pq"]


def _cell(score: dict) -> str:
    return (f"{_f(score['agnostic_pq'])} ({_f(score['agnostic_sq'])} / {_f(score['agnostic_rq'])}; "
            f"{score['agnostic_tp']} / {score['agnostic_fp']} / {score['agnostic_fn']})")


def presets_markdown(out: dict) -> str:
    exp = out["experiment"]
    lines = [f"# Presets: train {exp['train']}, {exp['steps'] or 'the recipe'} steps", "",
             "Class-agnostic PQ (SQ / RQ; TP / FP / FN) in %; `% of minkunet34` = PQ as % of minkunet34's student "
             "of the same teacher (frustum / whole scan). CPU ms: Segmenter CPU time per scan as given by --latency.",
             ""]
    for test in exp["tests"]:
        lines += [f"## Test set {test}", "",
                  "| preset | model | CPU ms per scan | frustum PQ | whole-scan PQ | % of minkunet34 | train wall s |",
                  "|---|---|---|---|---|---|---|"]
        for row in out["rows"]:
            t = row["tests"][test]
            pct = f"{_f(of_reference(out, row, test, 'frustum'))} / {_f(of_reference(out, row, test, 'full'))}"
            lines.append(f"| {row['preset']} | {row['model']} | {_f(row['cpu_ms'])} | {_cell(t['frustum'])} | "
                         f"{_cell(t['full'])} | {pct} | {_f(row['train'].get('train_wall_s'))} |")
        lines.append("")
    lines += ["Each row alone: `sal-ros train --config` on its config.yaml:", ""]
    lines += [f"- {row['preset']}, {row['model']}: {row['train'].get('config')}" for row in out["rows"]]
    return "\n".join(lines) + "\n"


def plot_presets(path: Path, out: dict) -> None:
    """CPU ms per scan (log) against held-out class-agnostic PQ, a panel per region: a marker per test set, a colour
    per preset (its mean over the test sets in the legend); 90 % of minkunet34's mean and the 50 ms goal as lines."""
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    tests, rows = out["experiment"]["tests"], out["rows"]
    timed = [r for r in rows if r["cpu_ms"]]
    markers = {"o": "circle", "s": "square", "^": "triangle", "D": "diamond", "v": "down triangle"}
    shapes = [list(markers)[j % len(markers)] for j in range(len(tests))]
    fig, axes = plt.subplots(1, len(REGION_TITLES), figsize=(6.5 * len(REGION_TITLES), 4.8), squeeze=False)
    for ax, (region, title) in zip(axes[0], REGION_TITLES.items()):
        for i, row in enumerate(timed):
            color = f"C{i % 10}"
            pqs = [row["tests"][t][region]["agnostic_pq"] for t in tests]
            who = row["preset"] if len({r["model"] for r in rows}) == 1 else f"{row['preset']}, {row['model']}"
            for j, pq in enumerate(pqs):
                ax.plot(row["cpu_ms"], pq, shapes[j], color=color, ms=8, mfc="none" if j else color,
                        label=None if j else f"{who}: {row['cpu_ms']:.0f} ms, mean PQ {np.mean(pqs):.1f}")
            if row["preset"] == REFERENCE:
                ax.axhline(0.9 * np.mean(pqs), color=color, ls=":", lw=1)
                ax.text(0.01, 0.9 * np.mean(pqs), "90 % of minkunet34 (mean)", fontsize=7, color=color, va="bottom",
                        transform=ax.get_yaxis_transform())
        ax.axvline(GOAL_MS, color="green", ls="--", lw=1)
        ax.text(GOAL_MS, 0.5, " 50 ms goal", rotation=90, fontsize=7, color="green", va="bottom",
                transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set(xlabel="Segmenter CPU ms per scan (1 thread)", ylabel=f"held-out class-agnostic PQ, {title}",
               ylim=(0, max([5.0] + [1.15 * r["tests"][t][region]["agnostic_pq"] for r in rows for t in tests])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
        ax.set_title(f"{title}: " + ", ".join(f"{markers[m]} test {t}" for m, t in zip(shapes, tests))
                     + " (first filled)", fontsize=8)
    untimed = sorted({r["preset"] for r in rows if not r["cpu_ms"]})
    fig.suptitle(f"presets: train {out['experiment']['train']}, {out['experiment']['steps']} steps, one seed"
                 + (f"; not timed, not drawn: {', '.join(untimed)}" if untimed else ""), fontsize=9)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=90)
    finally:
        plt.close(fig)
