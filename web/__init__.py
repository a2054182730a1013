"""Flask front-end: upload pages, the JSON API and health checks. Never imports TensorFlow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import redis
from flask import Flask, current_app

from web.ratelimit import init_rate_limits
from web.uploads import FORM_MAX_PARTS, FORM_MEMORY_BYTES, UploadRequest
from worker.app import create_celery
from worker.catalog import ModelCatalog
from worker.client import Keys, PredictionClient
from worker.jobs import TrainingJobs
from worker.registry import ActiveVersion
from worker.settings import Settings, get_settings

T = TypeVar("T")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web application.

    Args:
        config: Flask config overrides; the key ``CXR_SETTINGS`` may hold a
            :class:`worker.settings.Settings` to use instead of the environment.
    """
    app = Flask(__name__)
    # File parts are bounded by MAX_CONTENT_LENGTH alone; text fields by the form limits.
    app.request_class = UploadRequest
    config = dict(config or {})
    settings: Settings = config.pop("CXR_SETTINGS", None) or get_settings()
    app.config.update(
        MAX_CONTENT_LENGTH=int(settings.max_upload_mb * 1024 * 1024),
        MAX_FORM_MEMORY_SIZE=FORM_MEMORY_BYTES,
        MAX_FORM_PARTS=FORM_MAX_PARTS,
    )
    app.config.update(config)
    register_extensions(app, settings)
    register_blueprints(app)
    init_rate_limits(app, settings)
    return app


def register_extensions(app: Flask, settings: Settings) -> None:
    """Attach settings, a Redis client, a send-only Celery app, the pointer, jobs and versions."""
    # socket_timeout stays above api.MAX_WAIT_SECONDS: long-polling status requests block in
    # Redis (BLPOP) that long.
    redis_client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=30, socket_connect_timeout=2, health_check_interval=30
    )
    celery = create_celery(settings)
    app.extensions["cxr_settings"] = settings
    app.extensions["cxr"] = PredictionClient(settings, redis_client, celery)
    # The admin API's view of the active-version pointer and of fine-tuning jobs (both TF-free).
    app.extensions["cxr_registry"] = ActiveVersion(
        redis_client, Keys(settings.key_prefix), settings.model_dir
    )
    app.extensions["cxr_jobs"] = TrainingJobs(settings, redis_client, celery)
    app.extensions["cxr_models"] = ModelCatalog(settings.model_dir)


def register_blueprints(app: Flask) -> None:
    """Register the pages, API, health, admin, metrics and OpenAPI blueprints and error handlers."""
    # Imported here, not at the top: gunicorn's config must set PROMETHEUS_MULTIPROC_DIR before
    # prometheus_client (imported by web.metrics) is first imported.
    from web import admin, api, health, metrics, openapi, pages

    metrics.instrument(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(admin.pages_bp)
    app.register_blueprint(openapi.bp)
    api.register_error_handlers(app)


def extension(name: str, kind: type[T]) -> T:
    """The current app's extension ``name`` (attached by :func:`register_extensions`)."""
    found = current_app.extensions[name]
    if not isinstance(found, kind):
        raise TypeError(
            f"app.extensions[{name!r}] is a {type(found).__name__}, not {kind.__name__}"
        )
    return found


def prediction_client() -> PredictionClient:
    """Return the current app's :class:`PredictionClient`."""
    return extension("cxr", PredictionClient)


def settings() -> Settings:
    """Return the current app's :class:`Settings` (the one way web code reaches them)."""
    return extension("cxr_settings", Settings)
