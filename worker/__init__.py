"""Celery side of cxr: the app, thin tasks, the per-process model holder and a TF-free client."""
