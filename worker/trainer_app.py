"""Entry point of the trainer: ``celery --app worker.trainer_app worker --queues training``."""

from worker.app import create_celery

app = create_celery(role="trainer")
