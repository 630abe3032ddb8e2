"""What every bench records so its numbers can be reproduced: threads, CPU, load, library versions.

Benches run torch with the segmenter node's thread policy by default (all cores but one, or OMP_NUM_THREADS),
``--threads N`` changes it. On a shared machine a speed alone says little, so each bench also times a reference
in the same run and reports ratios; the load average before and after the run says how busy the machine was.
"""
from __future__ import annotations

import argparse
import os
import platform


def add_thread_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the segmenter node's policy, all cores but one unless "
                             "OMP_NUM_THREADS is set)")


def apply_threads(threads: int | None) -> int:
    """Set torch's threads: ``threads``, or the node's policy when None. Returns the count in use."""
    import torch

    from sal_ros.model.runtime import apply_node_thread_policy

    if threads is None:
        return apply_node_thread_policy()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def environment(with_torch: bool = True) -> dict:
    """Machine and software facts for a bench's JSON (call at the start; add ``load_end`` at the end)."""
    import numpy as np

    from sal_ros.model.runtime import cpu_model

    out = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "load_average_start": load_average(), "python": platform.python_version(), "numpy": np.__version__,
           "machine": platform.machine(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    if with_torch:
        import torch

        from sal_ros.model.runtime import native_bf16_cpu

        out.update(torch=str(torch.__version__), torch_threads=torch.get_num_threads(),
                   native_bf16_cpu=native_bf16_cpu(), cuda=torch.cuda.is_available())
    return out


def finish(env: dict) -> dict:
    env["load_average_end"] = load_average()
    return env


__all__ = ["add_thread_argument", "apply_threads", "environment", "finish", "load_average"]
