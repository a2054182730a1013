"""What a benchmark ran on: CPU model and flags, cores, Python, TensorFlow (not imported)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from ml.precision import cpu_model_and_flags

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
