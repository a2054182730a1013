"""Entry point for ``celery --app worker.celery_app worker``."""

from worker.app import create_celery

app = create_celery()
