"""Pure Python + Keras: image intake, preprocessing, the VGG16 classifier and its saved versions.

Nothing here imports Flask or Celery. Only :mod:`ml.model` and :mod:`ml.versions` (on load/save)
import TensorFlow; :mod:`ml.imaging` needs only Pillow and numpy, so the web process can use it.
"""
