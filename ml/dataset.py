"""Reading a dataset folder in the Kaggle layout into the arrays a training run needs.

``<root>/{train,val,test}/<CLASS>/*.{jpg,jpeg,png}``: classes are the folder names, unreadable
files are skipped and listed, a small or missing ``val/`` is replaced by a seeded stratified split
of ``train/``, and a fingerprint names exactly the files used. Images go through
:func:`ml.imaging.to_model_input`, the resize the service uses. Pillow and numpy only (no
TensorFlow).
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

from ml.config import TrainConfig
from ml.imaging import ImageError, decode_image, to_model_input

__all__ = ["Dataset", "DatasetError", "load_dataset", "x_test_at"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".dcm"})


class DatasetError(ValueError):
    """The dataset folder cannot be used for training; the message says what is wrong."""


@dataclass
class Dataset:
    """Images and labels of the three splits, ready for the model, and where they came from.

    ``x_*`` are float32 ``(n, S, S, 1)`` arrays from :func:`ml.imaging.to_model_input`; ``y_*``
    are int64 class indices into ``class_names``. ``skipped`` lists unreadable files (paths
    relative to the dataset root). ``fingerprint`` identifies exactly the files used:
    ``{"sha256", "files", "counts": {split: {class: n}}, "val_source": "val" | "split from
    train"}``. ``test_files`` are the test images' paths in the order of ``x_test``, so the
    same test split can be read again at another input size (:func:`x_test_at`).
    """

    class_names: list[str]
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    skipped: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    test_files: list[str] = field(default_factory=list)


@dataclass
class _Image:
    relpath: str
    sha256: str
    label: int
    pixels: npt.NDArray[np.float32]


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``split_dir``."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """Sorted visible PNG/JPEG/DICOM (.dcm) files (by suffix) in ``class_dir``."""
    return sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _read_class(
    root: Path,
    split: str,
    class_name: str,
    label: int,
    config: TrainConfig,
    skipped: list[str],
) -> list[_Image]:
    """Read the images of one class folder of one split, at most ``max_images_per_class``."""
    files = _image_files(root / split / class_name)
    if config.max_images_per_class is not None and len(files) > config.max_images_per_class:
        # A seeded random sample rather than the first N names: file names cluster by patient
        # and source ("person1_...", "NORMAL2-..."), so the first N would be a biased subset.
        key = f"{config.seed}/{split}/{class_name}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        files = [files[i] for i in rng.permutation(len(files))]
    limit = config.max_images_per_class
    images: list[_Image] = []
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        relpath = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
            pixels = to_model_input(decode_image(data), config.input_size)
        except (ImageError, OSError) as exc:
            log.warning("skipping unreadable image %s: %s", relpath, exc)
            skipped.append(relpath)
            continue
        images.append(_Image(relpath, hashlib.sha256(data).hexdigest(), label, pixels))
    images.sort(key=lambda image: image.relpath)
    return images


def _read_split(
    root: Path, split: str, class_names: list[str], config: TrainConfig, skipped: list[str]
) -> list[_Image]:
    """Read every class folder of one split; the split's classes must equal ``class_names``."""
    found = _class_folders(root / split)
    if found != class_names:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else ""]
        raise DatasetError(
            f"the classes of {split}/ differ from those of train/ {class_names}: "
            + ", ".join(p for p in parts if p)
        )
    images: list[_Image] = []
    for label, name in enumerate(class_names):
        images.extend(_read_class(root, split, name, label, config, skipped))
    return images


def _require_every_class(images: list[_Image], split: str, class_names: list[str]) -> None:
    """Raise DatasetError naming the classes of ``split`` that have no readable image."""
    present = {image.label for image in images}
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(f'{split}/{name}' for name in empty)} "
            "contain no readable PNG/JPEG/DICOM images"
        )


def _stratified_split(
    images: list[_Image], n_classes: int, fraction: float, seed: int
) -> tuple[list[_Image], list[_Image]]:
    """Split ``images`` into (train, val), taking ``fraction`` of every class (seeded)."""
    rng = np.random.default_rng(seed)
    train: list[_Image] = []
    val: list[_Image] = []
    for label in range(n_classes):
        members = [image for image in images if image.label == label]
        order = rng.permutation(len(members))
        # At least one validation image per class, but never a class's last training image.
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        chosen = set(order[:n_val].tolist())
        for i, image in enumerate(members):
            (val if i in chosen else train).append(image)
    return train, val


def _arrays(
    images: list[_Image], input_size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Stack images into ``(n, S, S, 1)`` float32 and their labels into int64."""
    if not images:
        return np.zeros((0, input_size, input_size, 1), np.float32), np.zeros(0, np.int64)
    x = np.stack([image.pixels for image in images]).astype(np.float32, copy=False)
    y = np.array([image.label for image in images], dtype=np.int64)
    return x, y


def _counts(images: list[_Image], class_names: list[str]) -> dict[str, int]:
    """Images per class name."""
    return {name: sum(1 for im in images if im.label == i) for i, name in enumerate(class_names)}


def load_dataset(root: str | os.PathLike[str], config: TrainConfig) -> Dataset:
    """Read a folder in the Kaggle layout ``<root>/{train,val,test}/<CLASS>/*.{jpg,jpeg,png}``.

    The classes are the sorted sub-folder names of ``train/`` (so a three-class set with COVID19
    works); ``val/`` and ``test/`` must have the same ones. ``test/`` is required: it is the
    held-out split the final evaluation runs on. ``val/`` is optional: when it is missing or
    holds fewer than ``config.min_val_images`` images, its images join the training pool and a
    stratified, seeded ``config.val_fraction`` of that pool becomes the validation split (the
    Kaggle set's own val/ has only 16 images, too few to early-stop on).

    Unreadable files are skipped and listed in ``Dataset.skipped``; a class left with no readable
    image in a split raises :class:`DatasetError`, as do missing folders.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DatasetError(
                f"no {split}/ folder in {base}: expected {base}/{split}/<CLASS>/<images>"
            )
    class_names = _class_folders(base / "train")
    if len(class_names) < 2:
        raise DatasetError(
            f"train/ in {base} needs at least two class folders, found {class_names}"
        )

    skipped: list[str] = []
    train = _read_split(base, "train", class_names, config, skipped)
    _require_every_class(train, "train", class_names)
    test = _read_split(base, "test", class_names, config, skipped)
    _require_every_class(test, "test", class_names)
    val: list[_Image] = []
    if (base / "val").is_dir():
        val = _read_split(base, "val", class_names, config, skipped)
    if len(val) >= max(config.min_val_images, 1):
        _require_every_class(val, "val", class_names)
        val_source = "val"
    else:
        pool = sorted(train + val, key=lambda image: image.relpath)
        train, val = _stratified_split(pool, len(class_names), config.val_fraction, config.seed)
        val_source = "split from train"

    used = sorted((image.relpath, image.sha256) for image in train + val + test)
    digest = hashlib.sha256()
    for relpath, sha in used:
        digest.update(f"{relpath}\0{sha}\n".encode())
    x_train, y_train = _arrays(train, config.input_size)
    x_val, y_val = _arrays(val, config.input_size)
    x_test, y_test = _arrays(test, config.input_size)
    return Dataset(
        class_names=class_names,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        skipped=sorted(skipped),
        test_files=[image.relpath for image in test],
        fingerprint={
            "sha256": digest.hexdigest(),
            "files": len(used),
            "counts": {
                "train": _counts(train, class_names),
                "val": _counts(val, class_names),
                "test": _counts(test, class_names),
            },
            "val_source": val_source,
        },
    )


def x_test_at(
    root: str | os.PathLike[str], dataset: Dataset, input_size: int
) -> npt.NDArray[np.float32]:
    """``dataset.x_test`` at ``input_size``: the same test files, in the same order.

    At the dataset's own size this is ``x_test`` itself; at another size only the test files are
    read again (a version trained at another input size is scored on the very same images).
    """
    if dataset.x_test.shape[1:] == (input_size, input_size, 1):
        return dataset.x_test
    base = Path(root)
    pixels = [
        to_model_input(decode_image((base / relpath).read_bytes()), input_size)
        for relpath in dataset.test_files
    ]
    if not pixels:
        return np.zeros((0, input_size, input_size, 1), np.float32)
    return np.stack(pixels).astype(np.float32, copy=False)
