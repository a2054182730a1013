"""Reading an evaluation folder: labelled images a version is scored on, never trained on.

An evaluation folder is ``<root>/<CLASS>/*`` (class folders at the top, as ``cxr-kaggle-test-256``
has inside ``test/``) or a Kaggle-layout folder whose ``test/`` split is used. Only ``test/`` is
read from a Kaggle layout: a registered evaluation set is a test set only. Images go through
the service's own decoder and resize (:mod:`ml.imaging`). Pillow and numpy only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.dataset import DatasetError, _class_folders, _image_files
from ml.imaging import ImageError, decode_image, to_model_input

__all__ = ["EvalSet", "eval_root", "load_eval_folder"]

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """The images of one evaluation folder at one input size, labelled by a model's classes.

    ``y`` indexes ``class_names`` (the model's, in its output order); ``folder_classes`` are the
    class folders found; ``fingerprint`` is ``{"sha256", "files", "counts"}``.
    """

    class_names: list[str]
    folder_classes: list[str]
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def eval_root(root: str | os.PathLike[str]) -> Path:
    """The folder holding the class folders: ``root/test`` in a Kaggle layout, else ``root``."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"evaluation folder {base} does not exist")
    return base / "test" if (base / "test").is_dir() else base


def load_eval_folder(
    root: str | os.PathLike[str], class_names: list[str], input_size: int
) -> EvalSet:
    """Read every image of an evaluation folder at ``input_size``, labelled by ``class_names``.

    The folder's classes must be among ``class_names`` (a two-class set can score a three-class
    model; a class the model does not know cannot be scored). Unreadable files are skipped and
    listed.

    Raises:
        DatasetError: no such folder, fewer than two class folders, a class the model does not
            know, or no readable image.
    """
    # A registered evaluation set -- cxr-kaggle-test-256 above all -- is a TEST SET ONLY: it is
    # read here to score versions, never to train, tune, choose a threshold or pick a recipe.
    base = eval_root(root)
    found = _class_folders(base)
    if len(found) < 2:
        raise DatasetError(
            f"{base} needs at least two class folders (<CLASS>/<images>), found {found}"
        )
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DatasetError(f"class folder(s) {unknown} of {base} are not among {class_names}")
    pixels: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    files: list[str] = []
    skipped: list[str] = []
    counts: dict[str, int] = {}
    digest = hashlib.sha256()
    for name in found:
        counts[name] = 0
        for path in _image_files(base / name):
            relpath = path.relative_to(base).as_posix()
            try:
                data = path.read_bytes()
                pixels.append(to_model_input(decode_image(data), input_size))
            except (ImageError, OSError) as exc:
                log.warning("skipping unreadable image %s: %s", relpath, exc)
                skipped.append(relpath)
                continue
            digest.update(f"{relpath}\0{hashlib.sha256(data).hexdigest()}\n".encode())
            labels.append(class_names.index(name))
            files.append(relpath)
            counts[name] += 1
    if not files:
        raise DatasetError(f"{base} holds no readable PNG/JPEG/DICOM image")
    return EvalSet(
        class_names=list(class_names),
        folder_classes=found,
        x=np.stack(pixels).astype(np.float32, copy=False),
        y=np.array(labels, dtype=np.int64),
        files=files,
        skipped=skipped,
        fingerprint={"sha256": digest.hexdigest(), "files": len(files), "counts": counts},
    )
