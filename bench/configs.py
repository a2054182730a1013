"""What a benchmark run varies: model configs, request shapes, targets and constants."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.stack import (
    ROOT,
    ModelKind,
)

RESULTS = ROOT / "bench" / "results"
WAIT_SECONDS = 20  # ?wait= of the status request (the API's maximum)
HTTP_TIMEOUT = 60.0
CLIENT_BOUND_CORES = 0.85  # one GIL-bound Python process cannot use much more than one core
TARGET_MODEL_BOUND_RATIO = 0.95
TARGET_BATCHING_GAIN = 2.0
TARGET_STANDIN_RATE = 500.0
TARGET_OVERHEAD_MS = 10.0
BATCH_DELAY_MS = 5.0  # CXR_BATCH_MAX_DELAY_MS with batching on (and off, where it is moot)

Json = dict[str, Any]


# --- configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many processes serve: everything about a stack but the model and batching."""

    label: str = "1 worker, 2 web"
    worker_processes: int = 1
    web_workers: int = 2
    explain: bool = True  # CXR_EXPLAIN: Grad-CAM maps (the service's default; a no-op without conv)


# The cost of explanations: the same stack with CXR_EXPLAIN=0 (VGG16 at 224 px, batching on).
NO_EXPLAIN = Shape("1 worker, 2 web, explain off", explain=False)


@dataclass(frozen=True)
class ModelConfig:
    """One model to benchmark and how to load it."""

    name: str
    kind: ModelKind
    input_size: int
    batch_max: int  # CXR_BATCH_MAX_SIZE with batching on; also the threads pool's concurrency
    levels: tuple[int, ...]  # client concurrency levels
    ramp_s: float  # measured window starts this long after the clients do
    warmup_s: float  # per stack, before the first level, at the highest concurrency
    extra_shapes: tuple[Shape, ...] = ()  # also run with batching on at the top levels
    extra_levels: tuple[int, ...] = ()
    precision: str = "auto"  # CXR_PRECISION of the workers and of the raw measurement
    image_side: int | None = None  # uploads: the shared 256 px X-rays, or real-size JPEGs

    @property
    def description(self) -> str:
        """Human name of the model."""
        model = "VGG16" if self.kind == "vgg16" else "stand-in (pooling+dense)"
        images = f", {self.image_side} px JPEG uploads" if self.image_side else ""
        return f"{model} @ {self.input_size} px, {self.precision}{images}"


PRECISION_SUFFIX = {"auto": "", "float32": "-fp32", "bfloat16": "-bf16", "float16": "-fp16"}


def variants(
    configs: list[ModelConfig], precisions: list[str], image_sides: list[int | None]
) -> list[ModelConfig]:
    """Every config in every precision and with every upload size (named ``vgg224-bf16-2500``)."""
    out = []
    for cfg in configs:
        for precision in precisions:
            for side in image_sides:
                name = cfg.name + PRECISION_SUFFIX[precision] + (f"-{side}" if side else "")
                out.append(replace(cfg, name=name, precision=precision, image_side=side))
    return out


DEFAULT_SHAPE = Shape()


def model_configs(quick: bool) -> list[ModelConfig]:
    """The three configs; for a quick run smaller levels and, of the extra shapes, only the
    explain-off stack of VGG16 at 224 px."""
    if quick:
        return [
            ModelConfig(
                "vgg224", "vgg16", 224, 32, (1, 8), ramp_s=1.0, warmup_s=2.0,
                extra_shapes=(NO_EXPLAIN,), extra_levels=(1, 8),
            ),
            ModelConfig("vgg32", "vgg16", 32, 32, (1, 16), ramp_s=0.5, warmup_s=1.0),
            ModelConfig("standin", "standin", 224, 32, (1, 16), ramp_s=0.5, warmup_s=1.0),
        ]  # fmt: skip
    return [
        ModelConfig(
            "vgg224", "vgg16", 224, 32, (1, 4, 16, 32), ramp_s=3.0, warmup_s=6.0,
            extra_shapes=(NO_EXPLAIN,), extra_levels=(1, 16, 32),
        ),
        ModelConfig("vgg32", "vgg16", 32, 32, (1, 4, 16, 32), ramp_s=1.0, warmup_s=3.0),
        ModelConfig(
            "standin", "standin", 224, 32, (1, 4, 16, 32, 64), ramp_s=1.0, warmup_s=3.0,
            extra_shapes=(Shape("2 workers, 2 web", 2, 2), Shape("1 worker, 4 web", 1, 4)),
            extra_levels=(32, 64),
        ),
    ]  # fmt: skip
