"""``sal-ros experiment FILE --presets tiny,realtime,minkunet34 [--latency ...]``: the teachers' students trained once
per model preset (the recipe with ``model:`` set to the preset spec, each in its own cached run, the run
``--recipe-override '{model: {preset: ...}}'`` trains), scored on every test set and set against each preset's CPU
time per scan: presets.json, presets.md and presets.png (latency against held-out class-agnostic PQ, camera frustum
and whole scan), each PQ also as % of a reference preset's (minkunet34, issue 25's quality goal, or --reference);
``--seeds 0,1,2`` trains every preset once per seed and reports the mean ± sd over them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write
from sal_ros.experiment.config import ExperimentConfig, with_recipe_override
from sal_ros.experiment.report import REGION_TITLES, _f, _plt, found_table, summed_by_class

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
    from sal_ros.model.config import split_specs

    out = {}
    for item in split_specs(text):
        spec, sep, ms = item.rpartition("=")
        try:
            out[spec] = float(ms)
        except ValueError:
            sep = ""
        if not sep or not spec:
            raise ValueError(f"latency {item!r}: expected preset=ms (e.g. tiny=154.8) or a bench model JSON file")
    return out


def parse_seeds(text: str | None) -> list[int | None]:
    """``--seeds 0,1,2`` as ints; None (no option) keeps the recipe's own seed."""
    if not text:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def compare_presets(cfg: ExperimentConfig, specs: list[str], latency: dict[str, float], progress: bool = True,
                    say=print, seeds: list[int | None] = (None,), reference: str = REFERENCE) -> dict:
    """Per preset and seed, ``run_experiment(parts=("students",))`` with that model and seed (cached runs are found,
    not retrained; seed None is the recipe's own); the rows, their means over the seeds and the reports written to
    ``cfg.out_dir``."""
    from sal_ros.experiment.run import run_experiment

    rows = []
    for spec, settings in zip(specs, check_specs(specs)):
        for seed in seeds:
            say(f"preset: {spec}" + ("" if seed is None else f", seed {seed}"))
            over = {"model": settings} if seed is None else {"model": settings, "seed": seed}
            run_cfg = with_recipe_override(cfg, over)
            results = run_experiment(run_cfg, progress=progress, say=say, parts=("students",))
            for model, r in results["models"].items():
                rows.append({"preset": spec, "model": model, "seed": run_cfg.recipe.get("seed"),
                             "cpu_ms": latency.get(spec), "train": r["train"], "tests": r["tests"],
                             "environment": results["environment"]})
    tests = [t.name for t in cfg.tests]
    out = {"experiment": {"train": cfg.train, "steps": cfg.steps, "tests": tests, "recipe": cfg.recipe},
           "reference": reference, "seeds": list(dict.fromkeys(r["seed"] for r in rows)), "latency_source": latency,
           "presets": summarize(rows, tests), "rows": rows}
    atomic_write(cfg.out_dir / "presets.json", json.dumps(out, indent=1, default=str))
    atomic_write(cfg.out_dir / "presets.md", presets_markdown(out))
    plot_presets(cfg.out_dir / "presets.png", out)
    return out


def summarize(rows: list[dict], tests: list[str]) -> list[dict]:
    """One entry per (preset, model): per test set and region the class-agnostic PQ of every seed, their mean and
    sample standard deviation (None from one seed), in the rows' order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["model"]), []).append(row)
    out = []
    for (preset, model), group in groups.items():
        scores = {}
        for test in tests:
            scores[test] = {}
            for region in REGION_TITLES:
                pqs = [float(r["tests"][test][region]["agnostic_pq"]) for r in group]
                scores[test][region] = {"pqs": pqs, "mean": float(np.mean(pqs)),
                                        "sd": float(np.std(pqs, ddof=1)) if len(pqs) > 1 else None}
        walls = [r["train"].get("train_wall_s") for r in group if r["train"].get("train_wall_s") is not None]
        out.append({"preset": preset, "model": model, "seeds": [r["seed"] for r in group],
                    "cpu_ms": group[0]["cpu_ms"], "tests": scores,
                    "train_wall_s": float(np.mean(walls)) if walls else None})
    return out


def of_reference(out: dict, entry: dict, test: str, region: str) -> float | None:
    """The entry's mean class-agnostic PQ as % of the reference preset's (minkunet34 unless ``--reference``) student
    of the same teacher, over the same seeds' runs (None without one or where the reference scores 0)."""
    ref = next((e for e in out["presets"] if e["preset"] == out.get("reference", REFERENCE)
                and e["model"] == entry["model"]), None)
    if ref is None or not ref["tests"][test][region]["mean"]:
        return None
    return 100 * entry["tests"][test][region]["mean"] / ref["tests"][test][region]["mean"]


def _spread(score: dict) -> str:
    if score["sd"] is None:
        return _f(score["mean"])
    return f"{_f(score['mean'])} ± {_f(score['sd'])} ({', '.join(_f(v) for v in score['pqs'])})"


def _cell(score: dict) -> str:
    return (f"{_f(score['agnostic_pq'])} ({_f(score['agnostic_sq'])} / {_f(score['agnostic_rq'])}; "
            f"{score['agnostic_tp']} / {score['agnostic_fp']} / {score['agnostic_fn']})")


def presets_markdown(out: dict) -> str:
    exp, ref = out["experiment"], out.get("reference", REFERENCE)
    seeds = ", ".join(str(s) for s in out.get("seeds", [])) or "the recipe's"
    lines = [f"# Presets: train {exp['train']}, {exp['steps'] or 'the recipe'} steps, seeds {seeds}", "",
             f"Class-agnostic PQ in %: the mean over the seeds ± their standard deviation (each seed's PQ); `% of "
             f"{ref}` = mean PQ as % of {ref}'s student of the same teacher (frustum / whole scan). CPU ms: "
             "Segmenter CPU time per scan as given by --latency.", ""]
    for test in exp["tests"]:
        lines += [f"## Test set {test}", "",
                  f"| preset | model | CPU ms per scan | frustum PQ | whole-scan PQ | % of {ref} | train wall s |",
                  "|---|---|---|---|---|---|---|"]
        for e in out["presets"]:
            t = e["tests"][test]
            pct = f"{_f(of_reference(out, e, test, 'frustum'))} / {_f(of_reference(out, e, test, 'full'))}"
            lines.append(f"| {e['preset']} | {e['model']} | {_f(e['cpu_ms'])} | {_spread(t['frustum'])} | "
                         f"{_spread(t['full'])} | {pct} | {_f(e['train_wall_s'])} |")
        found = {f"{e['preset']}, {e['model']}": summed_by_class(
            [r["tests"][test]["frustum"].get("agnostic_by_class", []) for r in out["rows"]
             if (r["preset"], r["model"]) == (e["preset"], e["model"])]) for e in out["presets"]}
        lines += [*found_table(found, note=", summed over the seeds" if len(out.get("seeds", [])) > 1 else ""), ""]
    lines += ["Each run (PQ (SQ / RQ; TP / FP / FN), frustum then whole scan, per test set) and its "
              "`sal-ros train --config` file:", ""]
    for row in out["rows"]:
        scores = "; ".join(f"{t}: {_cell(row['tests'][t]['frustum'])}, {_cell(row['tests'][t]['full'])}"
                           for t in exp["tests"])
        lines.append(f"- {row['preset']}, {row['model']}, seed {row['seed']}: {scores}; {row['train'].get('config')}")
    return "\n".join(lines) + "\n"


def plot_presets(path: Path, out: dict) -> None:
    """CPU ms per scan (log) against held-out class-agnostic PQ, a panel per region: a marker per test set at the
    mean over the seeds (bars: ± one standard deviation), a colour per preset (its mean over the test sets in the
    legend); 90 % of the reference's mean and the 50 ms goal as lines."""
    from sal_ros.eval.report import atomic_savefig

    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    tests, entries = out["experiment"]["tests"], out["presets"]
    ref = out.get("reference", REFERENCE)
    timed = [e for e in entries if e["cpu_ms"]]
    markers = {"o": "circle", "s": "square", "^": "triangle", "D": "diamond", "v": "down triangle"}
    shapes = [list(markers)[j % len(markers)] for j in range(len(tests))]
    fig, axes = plt.subplots(1, len(REGION_TITLES), figsize=(6.5 * len(REGION_TITLES), 5.2 + 0.2 * len(timed)),
                             squeeze=False)
    for ax, (region, title) in zip(axes[0], REGION_TITLES.items()):
        for i, e in enumerate(timed):
            color = f"C{i % 10}"
            means = [e["tests"][t][region]["mean"] for t in tests]
            who = e["preset"] if len({x["model"] for x in entries}) == 1 else f"{e['preset']}, {e['model']}"
            for j, t in enumerate(tests):
                score = e["tests"][t][region]
                ax.errorbar(e["cpu_ms"] * (1 + 0.02 * j), score["mean"], yerr=score["sd"] or 0, fmt=shapes[j],
                            color=color, ms=8, mfc="none" if j else color, capsize=3,
                            label=None if j else f"{who}: {e['cpu_ms']:.0f} ms, mean PQ {np.mean(means):.1f}")
            if e["preset"] == ref:
                ax.axhline(0.9 * np.mean(means), color=color, ls=":", lw=1)
                ax.text(0.01, 0.9 * np.mean(means), f"90 % of {ref} (mean)", fontsize=7, color=color,
                        va="bottom", transform=ax.get_yaxis_transform())
        ax.axvline(GOAL_MS, color="green", ls="--", lw=1)
        ax.text(GOAL_MS, 0.5, " 50 ms goal", rotation=90, fontsize=7, color="green", va="bottom",
                transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 40, 100: not 4x10^1
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "2345" else ""))
        top = [1.15 * (s["mean"] + (s["sd"] or 0)) for e in entries for s in (e["tests"][t][region] for t in tests)]
        ax.set(xlabel="Segmenter CPU ms per scan (1 thread)", ylabel=f"held-out class-agnostic PQ, {title}",
               ylim=(0, max([5.0] + top)))
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: " + ", ".join(f"{markers[m]} test {t}" for m, t in zip(shapes, tests))
                     + " (first filled)", fontsize=8)
    untimed = sorted({e["preset"] for e in entries if not e["cpu_ms"]})
    n_seeds = len(out.get("seeds") or [None])
    seeds = "one seed" if n_seeds == 1 else f"mean ± sd of {n_seeds} seeds"
    fig.suptitle(f"presets: train {out['experiment']['train']}, {out['experiment']['steps']} steps, {seeds}"
                 + (f"; not timed, not drawn: {', '.join(untimed)}" if untimed else ""), fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_rows = -(-len(labels) // 2)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 1))  # the legend below both panels, off the data
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    try:
        atomic_savefig(fig, path, dpi=90)
    finally:
        plt.close(fig)
