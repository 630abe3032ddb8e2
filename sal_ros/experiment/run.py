"""One experiment end to end: per teacher, pseudo-label the training frames and distill a student (and its
self-training rounds, when the recipe has them); train the supervised references (ground truth of the same frames,
camera frustum and whole scan) and keep the untrained model as the floor; score every model on every test set;
the data-scaling curve. Results are rewritten after every scored model, so a stopped run leaves what it finished,
and a rerun resumes at the first missing stage."""
from __future__ import annotations

import os
import time
from pathlib import Path

from sal_ros.experiment import stages
from sal_ros.experiment.config import ExperimentConfig
from sal_ros.experiment.report import write_reports

UNTRAINED, SUP_FRUSTUM, SUP_FULL = "untrained", "supervised (frustum)", "supervised (full scan)"


def student_name(teacher: str) -> str:
    return f"student ({teacher})"


def round_name(model: str, r: int) -> str:
    return f"{model}, self-training round {r}"


def self_training_rounds(cfg: ExperimentConfig) -> int:
    from sal_ros.train.selftrain import SelfTrainConfig

    return SelfTrainConfig.from_dict(cfg.recipe.get("self_training")).rounds


def score_self_training(cfg: ExperimentConfig, results: dict, name: str, train_cfg: dict, progress: bool,
                        step=lambda what: None) -> None:
    """A student's self-training rounds (the recipe's ``self_training``), each scored on every test set as a
    model of its own, ``<student>, self-training round <r>``."""
    for info in stages.self_train(cfg, train_cfg, results["models"][name]["train"], progress):
        model_name = round_name(name, info["round"])
        step(f"train {model_name}")
        model = results["models"][model_name] = {"train": info, "tests": {}}
        for test in cfg.tests:
            model["tests"][test.name] = stages.evaluate(cfg, Path(info["checkpoint"]), test, progress, keep_view=False)
            step(f"eval {model_name} on {test.name}")


def check_held_out(cfg: ExperimentConfig) -> None:
    """Leave-sequences-out: a test set read from the training root shares no scan with the training frames."""
    from sal_ros.data.sources import keyed_frames

    train = set(keyed_frames(cfg.dataset, cfg.train).keys())
    for test in cfg.tests:
        if test.path == cfg.dataset:
            shared = train & set(keyed_frames(test.path, test.select).keys())
            if shared:
                raise ValueError(f"test set {test.name} shares {len(shared)} scans with the training frames "
                                 f"(e.g. {sorted(shared)[0]}): leave its sequences out of 'train'")


def environment() -> dict:
    import torch

    from sal_ros.model.runtime import cpu_model

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def run_experiment(cfg: ExperimentConfig, progress: bool = True, say=print, parts=("main", "scaling")) -> dict:
    """``parts``: main (teachers, references, test sets) and / or scaling, or students (main without the references
    and the untrained floor: a recipe search); two processes may run one each (the engine and the cached stages
    tolerate a second writer), each writing its own results file."""
    from tqdm import tqdm

    check_held_out(cfg)
    refs = "main" in parts
    main = refs or "students" in parts
    suffix = "" if refs else "_students" if main else "_scaling"
    results = {"experiment": {"dataset": str(cfg.dataset), "train": cfg.train, "steps": cfg.steps,
                              "tests": [{"name": t.name, "path": str(t.path), "select": t.select} for t in cfg.tests],
                              "token_noise": cfg.token_noise, "vocabulary": str(cfg.vocabulary),
                              "recipe": cfg.recipe},
               "environment": environment(), "pseudolabels": {}, "models": {}, "scaling": []}
    scaling = cfg.scaling if "scaling" in parts else None
    n_scaling = len(scaling.stages) if scaling else 0
    rounds = self_training_rounds(cfg)
    total = main * (2 * len(cfg.teachers) + (3 * refs + len(cfg.teachers) * (1 + rounds)) * (1 + len(cfg.tests))) \
        + (1 if scaling else 0) + 2 * n_scaling
    bar = tqdm(total=total, desc="experiment", unit="stage", disable=not progress, position=0)
    t0 = time.perf_counter()

    def step(what: str):
        bar.set_postfix_str(what)
        bar.update(1)

    teachers = {t.name: t for t in cfg.teachers}
    for teacher in cfg.teachers if main else []:
        say(f"pseudo-labels: {teacher.name} on {cfg.train}")
        results["pseudolabels"][teacher.name] = {"run": stages.pseudolabel(cfg, teacher, cfg.train, progress)}
        step(f"pseudolabel {teacher.name}")
        results["pseudolabels"][teacher.name]["quality"] = stages.pseudolabel_quality(cfg, teacher, cfg.train,
                                                                                      progress)
        step(f"quality {teacher.name}")
    if scaling:
        if scaling.teacher not in teachers:
            raise ValueError(f"scaling teacher {scaling.teacher!r} is not one of {sorted(teachers)}")
        stages.pseudolabel(cfg, teachers[scaling.teacher], scaling.selection(max(scaling.stages)), progress)
        step("pseudolabel scaling")

    references = {UNTRAINED: None,
                  SUP_FRUSTUM: stages.train_config(cfg, stages.supervised_sources(cfg, cfg.train, "frustum")),
                  # whole scans cannot be turned into frustum slots of a FrankenFrustum
                  SUP_FULL: stages.train_config(cfg, stages.supervised_sources(cfg, cfg.train, "full"),
                                                {"franken_frustum": 1})}
    runs = {**(references if refs else {}),
            **{student_name(t.name): stages.train_config(cfg, stages.student_sources(cfg, t, cfg.train))
               for t in cfg.teachers}}
    students = {student_name(t.name) for t in cfg.teachers}
    for name, train_cfg in runs.items() if main else []:
        say(f"model: {name}")
        info = stages.untrained(cfg) if train_cfg is None else stages.train(cfg, train_cfg, progress)
        model = results["models"][name] = {"train": info, "tests": {}}
        step(f"train {name}")
        for test in cfg.tests:
            model["tests"][test.name] = stages.evaluate(cfg, Path(info["checkpoint"]), test, progress,
                                                        keep_view=test.name == cfg.bev_test)
            step(f"eval {name} on {test.name}")
            write_reports(cfg, results, suffix=suffix, figures=False)
        if name in students:
            score_self_training(cfg, results, name, train_cfg, progress, step)
            write_reports(cfg, results, suffix=suffix, figures=False)
    if scaling:
        test = next(t for t in cfg.tests if t.name == scaling.test)
        for k in scaling.stages:
            select = scaling.selection(k)
            say(f"scaling: {k} sequences ({select})")
            info = stages.train(cfg, stages.train_config(cfg, stages.student_sources(cfg, teachers[scaling.teacher],
                                                                                   select)), progress)
            step(f"train scaling {k}")
            score = stages.evaluate(cfg, Path(info["checkpoint"]), test, progress, keep_view=False)
            # the score's own "test" (path and selection) would hide the test set's name the report shows
            results["scaling"].append({**score, "sequences": k, "select": select, "train": info, "test": test.name})
            step(f"eval scaling {k}")
            write_reports(cfg, results, suffix=suffix, figures=False)
    bar.close()
    results["environment"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    results["environment"]["wall_s"] = round(time.perf_counter() - t0, 1)
    write_reports(cfg, results, suffix=suffix)
    return results
