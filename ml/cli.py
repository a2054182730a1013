"""``cxr``: create, list and run model versions from the command line, without the service.

``cxr predict chest.jpeg`` does what the original notebook did: give it an X-ray, get the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CLASSES = "NORMAL,PNEUMONIA"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``cxr`` command."""
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("CXR_MODEL_DIR", "models")),
        help="folder of model versions (default: $CXR_MODEL_DIR or ./models)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser(
        "init-model",
        help="write an untrained classifier (VGG16 base + new head) as the next version",
        description="Build VGG16 + a fresh classification head and publish it as a new version. "
        "The head is untrained: its predictions are meaningless until the model is fine-tuned, "
        "but it lets the whole service run end to end.",
    )
    init.add_argument(
        "--base",
        default="imagenet",
        help="'imagenet' (downloaded once by Keras, pre-fetched in the Docker image), "
        "'none' (random), or a path to a VGG16 notop weights file (default: imagenet)",
    )
    init.add_argument("--input-size", type=int, default=224, help="input side in px (>= 32)")
    init.add_argument(
        "--classes", default=DEFAULT_CLASSES, help=f"comma-separated (default {DEFAULT_CLASSES})"
    )
    init.add_argument("--seed", type=int, default=0, help="seed for the head's initial weights")

    predict = sub.add_parser("predict", help="classify local image files with a model version")
    predict.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    predict.add_argument("--version", type=int, help="model version (default: the highest)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")

    sub.add_parser("versions", help="list the model versions in the model folder")
    return parser


def cmd_init_model(args: argparse.Namespace) -> int:
    """Publish an untrained classifier as the next version."""
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    base = None if args.base.lower() == "none" else args.base
    keras.utils.set_random_seed(args.seed)
    model = build_classifier(classes, input_size=args.input_size, base_weights=base)
    metadata = save_version(
        model,
        args.model_dir,
        class_names=classes,
        base_weights=base,
        extra={"trained": False, "note": "untrained head, created by `cxr init-model`"},
    )
    print(f"wrote version {metadata.version} to {args.model_dir / str(metadata.version)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify each image and print its label and probabilities."""
    from ml.imaging import ImageError, load_image_file, to_model_input
    from ml.versions import latest_version, list_versions, load_classifier

    version = args.version if args.version is not None else latest_version(args.model_dir)
    if version is None:
        print(f"no model version in {args.model_dir}; run `cxr init-model` first", file=sys.stderr)
        return 2
    if version not in list_versions(args.model_dir):
        print(f"no model version {version} in {args.model_dir}", file=sys.stderr)
        return 2
    classifier = load_classifier(args.model_dir, version)
    failures = 0
    for path in args.images:
        try:
            x = to_model_input(load_image_file(path), classifier.input_size)
        except (ImageError, OSError) as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        prediction = classifier.to_prediction(classifier.predict_batch(x[None])[0])
        if args.json:
            doc = {"image": str(path), "label": prediction.label, "model_version": version}
            print(json.dumps({**doc, "probabilities": prediction.probabilities}))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in prediction.probabilities.items())
            print(f"{path}: {prediction.label}  ({probs})  [model v{version}]")
    return 1 if failures else 0


def cmd_versions(args: argparse.Namespace) -> int:
    """Print one line per model version."""
    from ml.versions import list_versions, read_metadata

    versions = list_versions(args.model_dir)
    if not versions:
        print(f"no model versions in {args.model_dir}")
    for v in versions:
        m = read_metadata(args.model_dir, v)
        print(f"{v}\t{m.created_at}\t{m.input_size}px\t{','.join(m.class_names)}\t{m.base_weights}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cxr`` command."""
    args = build_parser().parse_args(argv)
    commands = {"init-model": cmd_init_model, "predict": cmd_predict, "versions": cmd_versions}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
