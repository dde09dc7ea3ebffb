"""What a benchmark ran on: CPU model, usable cores, load, library versions.

The machines these run on are often shared, so the one-minute load average at
the start (and, where a script records it, at the end) goes with every result.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

_LIBRARIES = ("numpy", "torch", "pybullet", "gymnasium", "nibabel", "trimesh")


def load_average() -> float | None:
    """One-minute load average, or None where the platform has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def describe_machine(**extra) -> dict:
    """CPU model, usable cores, load average now, Python and library versions, plus ``extra``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        versions["torch_threads"] = torch.get_num_threads()
        versions["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    gpu = versions.get("cuda")
    return {
        "description": f"{cores}-core CPU ({cpu}), " + (f"GPU {gpu}" if gpu else "no GPU"),
        "cpu": cpu,
        "cores": cores,
        "load_average_1min_at_start": load_average(),
        "python": platform.python_version(),
        **versions,
        **extra,
    }
