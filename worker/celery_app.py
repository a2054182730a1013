"""Entry point of inference workers: ``celery --app worker.celery_app worker -Q inference``."""

from worker.app import create_celery

app = create_celery(role="inference")
