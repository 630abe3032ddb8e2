"""What a demo run is (``DemoConfig``), where its data is, and the rule that a folder made with other settings
starts over (``settings.json``)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sal_ros.core.files import write_json
from sal_ros.data.layouts import is_semantickitti_sequence

REPO_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LABEL_MIN_POINTS = 50  # SemanticKITTI's minimum segment size for PQ
ORACLE = "oracle"  # the run whose 2D masks are ground-truth segments rendered into the image
LAYOUT = 2  # output folder layout: 2 = one folder per run (masks, oracle) beside the shared bag and frames
SETTINGS_FILE = "settings.json"
# Everything the demo writes into its folder, of this layout and the one before (train/, clouds/, params.yaml).
DEMO_OUTPUTS = ("bag", "frames", "slic", "sam2", ORACLE, "png", "logs", "metrics.json", "report.md",
                "train", "clouds", "params.yaml")


class DemoDataError(RuntimeError):
    """No SemanticKITTI data where the demo looked."""


@dataclass
class DemoConfig:
    out: Path
    data: Path | None = None
    steps: int = 600
    max_points: int = 0  # all points of the camera frustums (~19k per SemanticKITTI scan)
    slic_segments: int = 40  # coarse superpixels: ~22 segments of >= 50 points per scan, learnable in CPU minutes
    rate: float = 0.1  # 1 s between the 10 Hz scans: the tiny student answers each on 2 CPU cores (~0.3 s)
    masks: str = "slic"
    sam2_checkpoint: str | None = None
    sam2_config: str | None = None
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = None
    progress: bool = True

    @property
    def random_clip(self) -> bool:
        return not self.clip_pretrained

    @property
    def runs(self) -> tuple[str, str]:
        """The two loops the demo runs: with the chosen 2D masks, and with oracle masks."""
        return self.masks, ORACLE


def say(text: str) -> None:
    print(text, flush=True)


def find_sequence(data: Path | None) -> Path:
    """The SemanticKITTI sequence folder to run on: ``--data``, else ``$SAL_DATA``, else ../shared/data."""
    tried = [Path(data)] if data else [Path(p) for p in (os.environ.get("SAL_DATA"),) if p]
    if not tried:
        tried = [Path.cwd().parent / "shared" / "data", REPO_DATA]
    for root in tried:
        for candidate in (root, root / "sequences" / "00", root / "semantickitti" / "sequences" / "00"):
            if is_semantickitti_sequence(candidate):
                return candidate.resolve()
    where = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise DemoDataError(
        f"no SemanticKITTI data found (looked in {where}). The demo needs a SemanticKITTI sequence folder with "
        "velodyne/*.bin, image_0/*.png, labels/*.label, calib.txt and times.txt (e.g. the sample in "
        "../shared/data/semantickitti/sequences/00). Point at it with `sal-ros demo --data PATH` or "
        "`SAL_DATA=PATH make demo`.")


def mask_statement(cfg: DemoConfig, run: str) -> str:
    if run == ORACLE:
        return ("oracle masks: ground-truth segments rendered into the image, the stand-in for SAM that shows what "
                "lifting and distillation do with object-level masks")
    if run == "sam2":
        return f"SAM 2 ({cfg.sam2_checkpoint})"
    return "SLIC superpixels (weight-free; image regions, not objects)"


def weights_statement(cfg: DemoConfig) -> str:
    clip = (f"{cfg.clip_model} / {cfg.clip_pretrained}" if cfg.clip_pretrained else
            f"{cfg.clip_model} with RANDOM weights (seeded): class names carry NO meaning, so only class-agnostic "
            "segmentation is scored")
    return (f"2D masks: {mask_statement(cfg, cfg.masks)}; and, side by side, {mask_statement(cfg, ORACLE)}. "
            f"CLIP: {clip}. Students: tiny preset, {cfg.steps} steps on CPU.")


def demo_settings(seq: Path, cfg: DemoConfig) -> dict:
    """What the results in the output folder depend on (not how they are shown: rate, progress)."""
    keys = ("steps", "max_points", "slic_segments", "masks", "sam2_checkpoint", "sam2_config", "clip_model",
            "clip_pretrained")
    return {"layout": LAYOUT, "data": str(seq.resolve()), **{k: getattr(cfg, k) for k in keys}}


def start_over_if_settings_changed(out: Path, seq: Path, cfg: DemoConfig) -> None:
    """Steps resume from what the folder holds, so results made with other settings (other masks, weights, data,
    steps, folder layout) would be taken as done: remove the demo's own outputs and say why, before anything
    runs."""
    wanted = demo_settings(seq, cfg)
    settings = out / SETTINGS_FILE
    if settings.exists():
        try:
            before = json.loads(settings.read_text())
        except (OSError, ValueError):
            before = {}
        changed = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        if changed:
            say("settings differ from the last demo in this folder ("
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()) + "): starting over")
            remove_outputs(out)
    elif any((out / name).exists() for name in DEMO_OUTPUTS):
        say(f"{out} holds demo results without {SETTINGS_FILE} (older sal_ros): reusing them as they are")
    write_json(settings, wanted)


def remove_outputs(out: Path) -> None:
    """The demo's own outputs only: anything else in the folder stays."""
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
