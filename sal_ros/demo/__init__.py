"""``sal-ros demo`` (``make demo``): the whole SAL loop in miniature on real SemanticKITTI frames, twice.

1. convert the dataset folder into a rosbag2 that looks like a robot recording (``data.convert``);
2. record synced frames from a replay of it with the recorder node (its own process, DDS on localhost);
3. per run: pseudo-label the recorded frames (``pseudolabel.engine``; SLIC masks unless SAM 2 weights are
   given, or, in the oracle run, ground-truth segments rendered into the image: the stand-in for SAM),
   distill a tiny student (``train.trainer``), and run the segmenter node with it on a replay of the bag;
4. write ``demo_out/``: per run labeled clouds (PLY), pseudo-labels and training curves; bird's-eye-view and
   camera-overlay PNGs of both runs beside ground truth; ``metrics.json`` and ``report.md`` (class-agnostic PQ
   vs ground truth and student vs its pseudo-labels, side by side; latency, drops).

Every step leaves its result in the output folder and is skipped when that result is complete, so an interrupted
demo resumes where it stopped (training resumes from its last checkpoint). A run with other settings (masks,
weights, data, steps: ``settings.json``) starts over instead of taking the old results for done.

Modules: settings (config, data discovery, start-over rule), steps (the pipeline), oracle (oracle pseudo-labels),
metrics, report, render (PNGs, the node's palette), ply, cli (options and order).
"""
from sal_ros.demo.cli import add_arguments, main, run_demo
from sal_ros.demo.settings import DemoConfig, DemoDataError, start_over_if_settings_changed

__all__ = ["add_arguments", "main", "run_demo", "DemoConfig", "DemoDataError", "start_over_if_settings_changed"]
