"""Pure Python + Keras: image intake, the VGG16 classifier, training and its saved versions.

Nothing here imports Flask, Celery, Redis or an HTTP client. TensorFlow is imported only inside
the functions that build, load, train or run a model (:mod:`ml.model`, :mod:`ml.versions`,
:mod:`ml.training`); :mod:`ml.imaging` needs only Pillow and numpy and :mod:`ml.config` only
pydantic, so the web process can use them. docs/ARCHITECTURE.md lists every module's job.
"""
