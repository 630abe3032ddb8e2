"""The experiment file (config/experiments/mini.yaml): what to train on, what to test on, which teachers.

Paths are relative to the file's folder. A test set is any SemanticKITTI-format folder plus a selection
(``{name: "10", path: ..., select: "10"}``), so sequences the project never saw need no code. ``quick:`` holds
the overrides ``--quick`` applies (few steps, few frames).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sal_ros.core.settings import known_settings
from sal_ros.core.yamlfile import load_yaml


@dataclass(frozen=True)
class TestSet:
    name: str
    path: Path
    select: str | None = None


@dataclass(frozen=True)
class Teacher:
    name: str
    engine: dict  # sal_ros.pseudolabel.engine.EngineConfig settings (masks, mask_options, ...)


@dataclass
class Scaling:
    """The data-scaling curve: the ``teacher``'s student on the first k ``sequences`` (``scans`` of each), for k in
    ``stages``, scored on the test set named ``test``."""

    teacher: str = "oracle"
    sequences: list = field(default_factory=list)
    scans: str = ""  # e.g. "0-9"; empty = every scan
    stages: list = field(default_factory=lambda: [1, 2, 4, 7])
    test: str = ""

    def selection(self, k: int) -> str:
        seqs = ",".join(str(s) for s in self.sequences[:k])
        return f"{seqs}:{self.scans}" if self.scans else seqs


@dataclass
class ExperimentConfig:
    out_dir: Path
    dataset: Path  # the training frames' SemanticKITTI root
    train: str  # selection of the training frames (e.g. "00,01,03,05,07,09")
    tests: list[TestSet]
    teachers: list[Teacher]
    recipe: dict  # a train config (model, data, loss, optim, seed, text_encoder); sources are the experiment's
    vocabulary: Path
    label_set: str = "semantickitti"
    steps: int | None = None  # overrides the recipe's optim.steps
    token_noise: float = 0.0
    scaling: Scaling | None = None
    pseudolabel: dict = field(default_factory=dict)  # backend (local | ray), workers, ray_address
    bev_test: str = ""  # the test set whose first scan is drawn from above (default: the first)
    device: str = "cpu"


def load_experiment(path: str | Path, quick: bool = False) -> ExperimentConfig:
    path = Path(path)
    raw = load_yaml(path, "experiment config") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    raw = copy.deepcopy(raw)
    overrides = raw.pop("quick", None) or {}
    if quick:
        raw = _merged(raw, overrides)
    base = path.parent
    known = {"out_dir", "dataset", "train", "test", "teachers", "recipe", "vocabulary", "label_set", "steps",
             "token_noise", "scaling", "pseudolabel", "bev_test", "device", "recipe_overrides"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown experiment settings {sorted(unknown)}; known: {sorted(known)}")
    for key in ("out_dir", "dataset", "train", "test", "teachers", "recipe", "vocabulary"):
        if key not in raw:
            raise ValueError(f"{path}: missing {key!r}")
    recipe_path = base / raw["recipe"]
    recipe = load_yaml(recipe_path, "train config") or {}
    recipe = _merged(recipe, raw.get("recipe_overrides", {}))
    tests = [TestSet(str(t["name"]), (base / t["path"]).resolve(), _text(t.get("select"))) for t in raw["test"]]
    if len({t.name for t in tests}) != len(tests):
        raise ValueError(f"{path}: test set names must differ")
    teachers = [Teacher(str(name), dict(engine or {})) for name, engine in raw["teachers"].items()]
    scaling = Scaling(**known_settings(Scaling, raw["scaling"], "scaling")) if raw.get("scaling") else None
    if scaling is not None:
        scaling.sequences = [_text(s) for s in scaling.sequences]
        scaling.stages = [int(k) for k in scaling.stages]
        scaling.scans = _text(scaling.scans) or ""
        if max(scaling.stages) > len(scaling.sequences):
            raise ValueError(f"{path}: scaling stage {max(scaling.stages)} but only {len(scaling.sequences)} sequences")
        if scaling.test not in {t.name for t in tests}:
            raise ValueError(f"{path}: scaling test {scaling.test!r} is not a test set name")
    return ExperimentConfig(
        out_dir=(base / raw["out_dir"]).resolve(), dataset=(base / raw["dataset"]).resolve(), train=_text(raw["train"]),
        tests=tests, teachers=teachers, recipe=recipe, vocabulary=(base / raw["vocabulary"]).resolve(),
        label_set=raw.get("label_set", "semantickitti"), steps=raw.get("steps"),
        token_noise=float(raw.get("token_noise", 0.0)), scaling=scaling, pseudolabel=dict(raw.get("pseudolabel") or {}),
        bev_test=str(raw.get("bev_test") or tests[0].name), device=str(raw.get("device", "cpu")))


def override_recipe(cfg: ExperimentConfig, text: str) -> None:
    """Lay a YAML mapping (text) on the experiment's recipe, as its file's ``recipe_overrides``."""
    import yaml

    try:
        over = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    if not isinstance(over, dict):
        raise ValueError(f"expected a mapping such as '{{optim: {{lr: 0.01}}}}', got {text!r}")
    cfg.recipe = _merged(cfg.recipe, over)


def with_recipe_override(cfg: ExperimentConfig, over: dict) -> ExperimentConfig:
    """A copy of ``cfg`` whose recipe has ``over`` laid on it (as the file's ``recipe_overrides``)."""
    return dataclasses.replace(cfg, recipe=_merged(cfg.recipe, over))


def _text(value) -> str | None:
    """YAML reads 00 as 0 and 05 as 5: sequence names and selections are kept as text (numbers compare as such)."""
    return None if value is None else str(value)


def _merged(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``, mappings merged key by key; a null removes the setting (e.g. a teacher)."""
    out = dict(base)
    for key, value in (over or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else value
    return out
