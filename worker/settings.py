"""Typed settings for every cxr process, read from ``CXR_*`` environment variables in one place.

:class:`Settings` configures the service (web, workers, trainer); :class:`ClientSettings` the
``cxr`` command line. No other module reads the environment (gunicorn's own config file aside).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ml.config import DEFAULT_EXTERNAL_TOLERANCE, check_eval_name

MIN_ADMIN_TOKEN_LENGTH = 16
PLACEHOLDER_TOKENS = frozenset({"changeme-changeme", "change-me-please!", "secretsecretsecret"})


def parse_eval_datasets(text: str) -> dict[str, str]:
    """``{"name": "path", ...}`` (JSON) or ``name=path,name=path`` as ``{name: path}``.

    Raises ValueError naming what is wrong (a bad name, an empty path, not an object).
    """
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"CXR_EVAL_DATASETS is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError('CXR_EVAL_DATASETS must be a JSON object {"name": "path"}')
        pairs = list(raw.items())
    else:
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"CXR_EVAL_DATASETS: {item!r} is not name=path")
            pairs.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in pairs:
        check_eval_name(name)
        if not path or len(path) > MAX_EVAL_PATH_CHARS:
            raise ValueError(f"CXR_EVAL_DATASETS: the path of {name!r} is empty or too long")
        out[name] = path
    return out


MAX_EVAL_PATH_CHARS = 255


class Settings(BaseSettings):
    """All knobs of the service; each field is the environment variable ``CXR_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis used as Celery broker and for uploads, job state and results.",
    )
    model_dir: Path = Field(
        default=Path("models"),
        description="The model registry: version folders <N>/ and active.json "
        "(workers, trainer, web admin).",
    )
    inference_queue: str = Field(default="inference", description="Queue of prediction tasks.")
    key_prefix: str = Field(default="cxr", description="Prefix of every Redis key cxr writes.")
    max_upload_mb: float = Field(
        default=32.0, gt=0, description="Largest accepted upload in MiB (larger: 413)."
    )
    max_image_pixels: int = Field(
        default=60_000_000,
        gt=0,
        description="Largest decoded image, width x height (guards against decompression bombs).",
    )
    max_queued_predictions: int = Field(
        default=500,
        ge=0,
        description="Most predictions waiting in the queue; beyond it uploads get 503 with "
        "Retry-After (0: no bound). Each holds at most ~1 MiB in Redis.",
    )
    queue_full_retry_after_seconds: int = Field(
        default=5, ge=1, description="The Retry-After of a 503 for a full queue."
    )
    rate_limit_uploads: str = Field(
        default="10/second;300/minute",
        description="Uploads per client address (API and form), in Flask-Limiter's notation; "
        "empty: no limit.",
    )
    rate_limit_status: str = Field(
        default="50/second",
        description="Status requests per client address; empty: no limit.",
    )
    result_ttl_seconds: int = Field(
        default=3600, gt=0, description="How long uploads, job state and results are kept."
    )
    worker_heartbeat_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often each worker process reports what it serves and checks the active "
        "version (changes are also announced over pub/sub).",
    )
    visibility_timeout_seconds: int = Field(
        default=60,
        gt=0,
        description="An unacknowledged inference task is redelivered after this long.",
    )
    restore_interval_seconds: int = Field(
        default=5, gt=0, description="How often workers scan for tasks of crashed workers."
    )
    worker_concurrency: int = Field(default=1, gt=0, description="Worker processes per worker.")
    batch_max_size: int = Field(
        default=16,
        ge=1,
        description="Most predictions one model call takes (1 turns dynamic batching off). "
        "Batches form in a worker run with `--pool threads --concurrency >= this`.",
    )
    batch_padding: bool = Field(
        default=False,
        description="Pad each batch with blank images up to the next power of two (at most "
        "CXR_BATCH_MAX_SIZE), so the model sees a few batch sizes, each warmed up when a version "
        "loads; false (default): every size from 1 up, each paying its first call on first use.",
    )
    batch_max_delay_ms: float = Field(
        default=5.0,
        ge=0,
        description="Longest a prediction waits for others to join its batch.",
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="What inference workers and the trainer compute in: auto (bfloat16 on CPUs "
        "with AMX or AVX512-BF16, float16 on GPUs with Tensor Cores, else float32) or a forced "
        "precision; probabilities and saved versions stay float32.",
    )
    ood_gate: bool = Field(
        default=True,
        description="Refuse images a version's out-of-distribution gate does not recognise as a "
        "frontal chest X-ray (label null); false: every image gets a label.",
    )
    explain: bool = Field(
        default=True,
        description="Whether inference workers compute a Grad-CAM map of each prediction "
        "(requests can still turn it off with explain=0; 0 turns it off for all).",
    )
    worker_metrics_port: int = Field(
        default=9100,
        ge=0,
        le=65535,
        description="Port of an inference worker's Prometheus endpoint /metrics (0: off).",
    )
    worker_metrics_addr: str = Field(
        default="127.0.0.1", description="Address the worker's metrics endpoint listens on."
    )
    training_queue: str = Field(default="training", description="Queue of fine-tuning jobs.")
    data_dir: Path = Field(
        default=Path("data"),
        description="Folder of datasets; a job's `dataset` is a path inside it (trainer only).",
    )
    training_visibility_timeout_seconds: int = Field(
        default=6 * 3600,
        gt=0,
        description="A fine-tuning job is redelivered after this long unacknowledged; it is also "
        "the hard time limit of one run.",
    )
    first_run: bool = Field(
        default=True,
        description="On start, a trainer that finds no model version in CXR_MODEL_DIR and a "
        "dataset (CXR_FIRST_RUN_DATASET) fine-tunes a first model by itself; it becomes active.",
    )
    first_run_dataset: str | None = Field(
        default=None,
        description="Dataset of the first run, a path inside CXR_DATA_DIR; unset: CXR_DATA_DIR "
        "itself if it holds train/, else its first subfolder (by name) that does.",
    )
    first_run_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Training options of the first run as JSON (the admin API's job fields), "
        "over its defaults: base imagenet when the VGG16 weights are cached (the Docker image), "
        "else a from-scratch recipe at 128 px.",
    )
    promotion_policy: Literal["if_better", "always", "never"] = Field(
        default="if_better",
        description="Default for jobs: promote a new version if at least as good as the active "
        "one on the same test split, always, or never (manual).",
    )
    promotion_metric: Literal["roc_auc", "accuracy", "sensitivity", "specificity"] = Field(
        default="roc_auc", description="Metric the if_better policy compares."
    )
    promotion_external_tolerance: float = Field(
        default=DEFAULT_EXTERNAL_TOLERANCE,
        ge=0,
        le=1,
        description="Default for jobs: how far (ROC AUC, sensitivity) an if_better candidate may "
        "fall below the active version on any registered evaluation set (1: off).",
    )
    eval_datasets: str = Field(
        default="",
        description='Evaluation sets every published version is scored on: JSON {"name": "path"} '
        "or name=path,...; a relative path is inside CXR_DATA_DIR. More are registered through "
        "the admin API.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin API and page; unset disables them (never open).",
    )

    @field_validator("eval_datasets")
    @classmethod
    def _eval_datasets(cls, value: str) -> str:
        parse_eval_datasets(value)  # refuse a malformed value at start, not at the first publish
        return value

    def configured_eval_datasets(self) -> dict[str, str]:
        """``CXR_EVAL_DATASETS`` as ``{name: path}``."""
        return parse_eval_datasets(self.eval_datasets)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _admin_token(cls, value: object) -> object:
        # CXR_ADMIN_TOKEN= (set but empty, as compose passes an unset variable) disables the
        # admin API instead of accepting an empty bearer token.
        if value is None or str(value).strip() == "":
            return None
        token = str(value.get_secret_value() if isinstance(value, SecretStr) else value)
        if len(token) < MIN_ADMIN_TOKEN_LENGTH or token.lower() in PLACEHOLDER_TOKENS:
            raise ValueError(
                f"CXR_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters and not a "
                "placeholder; generate one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        return value


DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    """What the ``cxr`` command line reads from the environment: its defaults for flags.

    Read afresh for every command (no cache). The token is not checked here: the service
    judges it, and a wrong one is answered 401.
    """

    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    model_dir: Path = Field(default=Path("models"), description="Folder of model versions.")
    api_url: str = Field(default=DEFAULT_API_URL, description="Base URL of the cxr web service.")
    admin_token: str | None = Field(default=None, description="Admin API token.")
    actor: str | None = Field(default=None, description="Name recorded in the audit log.")
    user: str | None = Field(
        default=None,
        validation_alias=AliasChoices("USER"),
        description="The login name: the actor when CXR_ACTOR is unset or empty.",
    )
    eval_datasets: str = Field(
        default="", description="Evaluation sets local commands score versions on."
    )
    data_dir: Path = Field(
        default=Path("data"), description="Where a relative evaluation-set path is."
    )

    def configured_eval_datasets(self) -> dict[str, Path]:
        """``CXR_EVAL_DATASETS`` as ``{name: folder}`` (relative paths inside CXR_DATA_DIR)."""
        return {n: self.data_dir / p for n, p in parse_eval_datasets(self.eval_datasets).items()}

    @property
    def who(self) -> str | None:
        """The actor to record: ``$CXR_ACTOR``, else ``$USER``."""
        return self.actor or self.user


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (read from the environment once)."""
    return Settings()
