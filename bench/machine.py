"""What a benchmark ran on: CPU model and flags, cores, Python, TensorFlow (not imported)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# The flags that decide which kernels TensorFlow/oneDNN and numpy can use on x86.
NOTABLE_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """Return the CPU's model name and its flags (empty where /proc/cpuinfo is not there)."""
    model = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        text = cpuinfo.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "", platform.machine()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
    return model, flags


def machine() -> dict[str, Any]:
    """What the numbers were measured on; figures compare only within one such machine."""
    model, flags = cpu_model_and_flags()
    tf_version = None
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            tf_version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": model,
        "cpu_flags_notable": [f for f in NOTABLE_FLAGS if f in flags],
        "cpu_flags": " ".join(flags),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf_version,
        "loadavg_at_start": list(os.getloadavg()),
    }
