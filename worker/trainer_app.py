"""Entry point of the trainer: ``celery --app worker.trainer_app worker --queues training``.

When it is ready it checks the first run (``worker.first_run``): a first fine-tuning job into an
empty registry.
"""

from celery.signals import worker_ready

from worker.app import create_celery
from worker.first_run import on_trainer_ready

app = create_celery(role="trainer")

# weak=False: the handler is a module function, but keep it connected whatever imports it.
worker_ready.connect(on_trainer_ready, weak=False)
