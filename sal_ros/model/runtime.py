"""Where the model runs fast on this CPU: native bfloat16 detection and the node's torch thread policy.

bfloat16 pays on a CPU only with native bf16 instructions (AMX-BF16 tiles, AVX512-BF16 dot products): there oneDNN
runs bf16 matmuls several times faster than float32 (14x measured for one AMX core); elsewhere bf16 is emulated and
slower than float32, so the model stays float32; so does a narrow model (the tiny preset), whose casts cost more
than its matmuls gain. ``SAL_ROS_CPU_BF16=0`` / ``=1`` overrides both (a test, or a CPU whose flags lie in a VM).
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV_BF16 = "SAL_ROS_CPU_BF16"


def cpu_flags() -> set[str]:
    """CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """Marketing name of the CPU ("Intel(R) Xeon(R) Processor"), or the architecture where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _detected_native_bf16() -> bool:
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def _forced_bf16() -> bool | None:
    forced = os.environ.get(ENV_BF16, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        return forced in ("1", "true", "yes")
    return None


def native_bf16_cpu() -> bool:
    """True where this CPU runs bfloat16 natively (or ``SAL_ROS_CPU_BF16`` says so)."""
    forced = _forced_bf16()
    return _detected_native_bf16() if forced is None else forced


# bf16 pays where matmuls dominate: the casts around each layer cost per element, the AMX gain grows with the
# channels. Measured side by side on one core: minkunet34 (up to 256 channels) 1.5-2x faster, tiny (16-48 channels)
# 0.75x, i.e. slower.
BF16_MIN_WIDTH = 128


def cpu_bf16(config) -> bool:
    """Whether the CPU model of ``config`` (a ModelConfig) runs under bfloat16 autocast: native bf16 and channels
    wide enough to pay for the casts; ``SAL_ROS_CPU_BF16=1`` / ``=0`` forces it on / off for any model."""
    forced = _forced_bf16()
    if forced is not None:
        return forced
    width = config.waffleiron.width if config.backbone == "waffleiron" else max(config.minkunet.widths)
    return _detected_native_bf16() and width >= BF16_MIN_WIDTH


def node_torch_threads(cores: int | None = None) -> int:
    """The segmenter node's CPU policy: torch on all cores but one (one is left to DDS callbacks), unless
    OMP_NUM_THREADS says otherwise. OpenMP threads wait for each other at every parallel op; with all cores taken,
    each DDS callback that preempts one stalls the rest (on 2 cores the tiny backbone took 3-5 s instead of 0.2 s
    per frame while clouds arrived at 20 Hz)."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, (cores if cores is not None else _default_threads()) - 1)


@functools.lru_cache(maxsize=None)
def _default_threads() -> int:
    """torch's thread count before any policy changed it (so applying the policy twice changes nothing)."""
    import torch

    return torch.get_num_threads()


def apply_node_thread_policy() -> int:
    """Set torch's thread count as the segmenter node does; returns it."""
    import torch

    threads = node_torch_threads()
    torch.set_num_threads(threads)
    return threads


__all__ = ["cpu_bf16", "native_bf16_cpu", "cpu_flags", "cpu_model", "node_torch_threads", "apply_node_thread_policy"]
