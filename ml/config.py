"""The one declaration of a training run's knobs: names, types, limits, defaults and help.

:class:`TrainingOptions` holds every knob an administrator may set. Everything else derives from
it: :class:`TrainConfig` (what :func:`ml.training.train` runs) adds the knobs only a local run
has, the admin API's ``worker.jobs.TrainingRequest`` adds the dataset, the base and the
promotion policy, the admin page renders its form from ``worker.jobs.form_fields``, and both
command lines (``cxr train`` and ``python -m cli.train``) build their flags with ``cli.options``.

A field's ``title`` is the admin form's label, its ``description`` the help text, and
``json_schema_extra`` may hold ``aliases`` (older command-line spellings, kept) and ``unset``
(what ``None`` means, for help texts).
Pydantic only (no TensorFlow), so TF-free processes validate requests with it.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_EXTERNAL_TOLERANCE",
    "EVAL_NAME_PATTERN",
    "INTENSITIES",
    "Intensity",
    "check_eval_name",
    "MAX_INPUT_SIZE",
    "MIN_INPUT_SIZE",
    "POLICIES",
    "Policy",
    "TrainConfig",
    "TrainingOptions",
    "limits",
    "choices",
    "value_type",
]

MAX_INPUT_SIZE = 1024
MIN_INPUT_SIZE = 32  # VGG16 halves the image five times (same limit as ml.model).
VGG16_BLOCKS = 5
MAX_SEED = 2**32 - 1  # numpy's seed range

# What happens to a finished job's version: see ml.promotion.decide.
Policy = Literal["if_better", "always", "never"]
POLICIES: tuple[Policy, ...] = ("if_better", "always", "never")
# How the model normalises each image's grey levels before VGG16 (ml.layers): "none" builds no
# layer at all, so a model without it is the same as one built before the option existed.
Intensity = Literal["none", "standardize", "equalize"]
INTENSITIES: tuple[Intensity, ...] = get_args(Intensity)
# How far an if_better candidate may fall below the active version on a registered evaluation set
# (ROC AUC and sensitivity; ml.promotion.external_gate). 0.05 is about the half-width of a 95%
# interval of a sensitivity near 0.85 on ~250 pneumonias: a bigger drop is not noise. 1 = off.
DEFAULT_EXTERNAL_TOLERANCE = 0.05
# An evaluation set's name is also its file name (MODEL_DIR/<N>/external/<name>.json): letters,
# digits, '.', '_', '-', never a leading dot.
EVAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_eval_name(name: object) -> str:
    """``name`` if it may name an evaluation set, else ValueError saying what is allowed."""
    if not isinstance(name, str) or not EVAL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            "an evaluation set's name is 1-64 letters, digits, '.', '_' or '-', not starting "
            f"with '.', '_' or '-'; got {name!r}"
        )
    return name


class TrainingOptions(BaseModel):
    """The knobs of a fine-tuning run that the admin API, the page and both CLIs share."""

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(
        default=224,
        ge=MIN_INPUT_SIZE,
        le=MAX_INPUT_SIZE,
        title="Input size (px)",
        description="input side in px",
    )
    epochs_head: int = Field(
        default=5,
        ge=0,
        le=500,
        title="Epochs, head only",
        description="epochs of phase 1: the new head on a frozen base",
    )
    epochs_finetune: int = Field(
        default=5,
        ge=0,
        le=500,
        title="Epochs, fine-tuning",
        description="epochs of phase 2: the last finetune_blocks VGG16 blocks unfrozen",
    )
    learning_rate_head: float = Field(
        default=1e-3,
        gt=0,
        le=1,
        title="Learning rate, head",
        description="learning rate of the head phase",
        json_schema_extra={"aliases": ["--lr-head"]},
    )
    learning_rate_finetune: float = Field(
        default=1e-5,
        gt=0,
        le=1,
        title="Learning rate, fine-tuning",
        description="learning rate of the fine-tuning phase",
        json_schema_extra={"aliases": ["--lr-finetune"]},
    )
    finetune_blocks: int = Field(
        default=1,
        ge=0,
        le=VGG16_BLOCKS,
        title="VGG16 blocks to unfreeze",
        description="VGG16 blocks to unfreeze in phase 2 (0 skips it, 5 = the whole base)",
    )
    batch_size: int = Field(
        default=32, ge=1, le=1024, title="Batch size", description="images per batch"
    )
    augment: bool = Field(
        default=True,
        title="Augment",
        description="train with light augmentation (rotation, zoom, shift)",
    )
    site_augment: bool = Field(
        default=False,
        title="Augment for other sites",
        description=(
            "also vary what differs between sites: aspect (squash), softness, contrast, gamma, "
            "brightness, noise (ml/augment.py)"
        ),
    )
    intensity: Intensity = Field(
        default="none",
        title="Intensity normalisation",
        description=(
            "per-image grey-level normalisation inside the model, before VGG16: none, "
            "standardize (subtract the image's mean, divide by its std) or equalize (histogram "
            "equalisation), see ml/layers.py; a job continuing a version keeps that version's"
        ),
    )
    patience: int = Field(
        default=3,
        ge=1,
        le=100,
        title="Patience",
        description="epochs without a better validation AUC before a phase stops",
    )
    seed: int = Field(
        default=1337,
        ge=0,
        le=MAX_SEED,
        title="Seed",
        description="random seed (split, shuffling, initial weights)",
    )
    max_images_per_class: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        title="Images per class (empty: all)",
        description="use at most this many images of each class and split",
        json_schema_extra={"unset": "all"},
    )
    target_sensitivity: float | None = Field(
        default=None,
        gt=0,
        le=1,
        title="Target sensitivity (empty: label by the most probable class)",
        examples=[0.95],
        description="label at the threshold that reaches this sensitivity on the validation "
        "split (e.g. 0.95) instead of at the highest probability",
        json_schema_extra={"unset": "argmax"},
    )


class TrainConfig(TrainingOptions):
    """Every knob of a training run, checked strictly on construction (``ValueError``).

    Strict: ``epochs_head=True`` or ``input_size=224.0`` is a mistake, not a number.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # One line an operator can read (it ends up in a job's error and on the command
            # line), not pydantic's multi-line report.
            raise ValueError(describe(exc)) from None

    val_fraction: float = Field(
        default=0.15,
        gt=0,
        le=0.5,
        description="share of train/ split off as validation when val/ is small",
    )
    min_val_images: int = Field(
        default=50,
        ge=0,
        le=10**9,
        description="a smaller (or missing) val/ split -> stratified split off train/",
    )
    base_weights: str | None = Field(
        default="imagenet",
        description="'imagenet' (downloads), None (random init), or a VGG16 notop weights file",
    )

    @field_validator("base_weights")
    @classmethod
    def _weights_named(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("base_weights must be 'imagenet', a weights-file path or None")
        return value

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        if self.planned_epochs(1) + self.planned_epochs(2) == 0:
            raise ValueError(
                "epochs_head is 0 and phase 2 is off (epochs_finetune or finetune_blocks is 0): "
                "nothing to train"
            )
        return self

    def planned_epochs(self, phase: int) -> int:
        """The epochs planned for ``phase`` (1 or 2); phase 2 is off when it unfreezes nothing."""
        if phase == 1:
            return self.epochs_head
        return self.epochs_finetune if self.finetune_blocks > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-native form, accepted back by :meth:`from_dict`."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict; unknown keys and out-of-range values raise ValueError."""
        return cls(**data)


def describe(exc: ValidationError) -> str:
    """A validation error in one line, e.g. ``input_size: ... (got 16); seed: ... (got -1)``."""
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    parts = [f"unknown training option(s): {', '.join(unknown)}"] if unknown else []
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        got = f" (got {error['input']!r})" if where else ""
        parts.append(f"{where}: {message}{got}" if where else message)
    return "; ".join(parts)


def limits(model: type[BaseModel], name: str) -> tuple[float | None, float | None, bool]:
    """``(low, high, low_exclusive)`` of a numeric field (``None`` where unbounded)."""
    low: float | None = None
    high: float | None = None
    exclusive = False
    for item in model.model_fields[name].metadata:
        if isinstance(item, annotated_types.Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            low, exclusive = float(item.gt), True  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = float(item.le)  # type: ignore[arg-type]
    return low, high, exclusive


def value_type(
    model: type[BaseModel], name: str
) -> type[int] | type[float] | type[bool] | type[str]:
    """The Python type of a field's value, ``None`` aside (``str`` for a choice of strings)."""
    annotation = model.model_fields[name].annotation
    for kind in (bool, int, float):
        if annotation is kind or annotation == kind | None:
            return kind
    if choices(model, name):
        return str
    raise TypeError(f"{name} is not a bool, int, float or choice field")


def choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The values a ``Literal`` field of strings allows (empty for any other field)."""
    annotation = model.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        if all(isinstance(v, str) for v in values):
            return values
    return ()
