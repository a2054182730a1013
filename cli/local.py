"""The local commands of ``cxr``: create, import, calibrate, list and run model versions.

They work on the model folder (``--model-dir``) directly, with :mod:`ml`; TensorFlow is imported
only by the commands that load or build a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CLASSES = "NORMAL,PNEUMONIA"


def add_local_commands(sub: Any) -> None:
    """The subcommands that work on the local model folder."""
    init = sub.add_parser(
        "init-model",
        help="write an untrained classifier (VGG16 base + new head) as the next version",
        description="Build VGG16 + a fresh classification head and publish it as a new version. "
        "The head is untrained: its predictions are meaningless until the model is fine-tuned, "
        "but it lets the whole service run end to end. The first version in the model folder "
        "becomes the active one; later ones are candidates to promote.",
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
    add_gate_arguments(init)

    imp = sub.add_parser(
        "import",
        help="publish an existing Keras model file as the next version",
        description="Check that a .keras model takes (batch, S, S, 1) grayscale 0..255 and "
        "outputs one probability per class, then publish it as the next version. The first "
        "version in the model folder becomes the active one; later ones are candidates.",
    )
    imp.add_argument("file", type=Path, help="the .keras model file")
    imp.add_argument(
        "--classes", required=True, help="comma-separated class names, in output order"
    )
    imp.add_argument("--note", help="free text kept in the version's metadata")
    add_gate_arguments(imp)
    imp.add_argument(
        "--untrained",
        action="store_true",
        help="mark the version as never trained (its answers are shown as not a diagnosis); "
        "without it an imported model counts as trained",
    )

    calibrate = sub.add_parser(
        "calibrate",
        help="publish a version again, labelling at a threshold for a stated sensitivity",
        description="Choose the highest threshold on 1 - p(NORMAL) that reaches "
        "--target-sensitivity on the dataset's val split, evaluate the test split at it, and "
        "publish the same weights with that threshold as the next version (a candidate: "
        "promote it to serve it). Without a threshold a version labels by the highest "
        "probability.",
    )
    calibrate.add_argument("version", type=int, help="the version to calibrate")
    calibrate.add_argument(
        "--dataset", type=Path, required=True, help="a folder <root>/{train,val,test}/<CLASS>/"
    )
    calibrate.add_argument(
        "--target-sensitivity", type=float, default=0.95, help="on the val split (default 0.95)"
    )
    add_gate_arguments(calibrate, required=True)

    predict = sub.add_parser("predict", help="classify local image files with a model version")
    predict.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or DICOM files")
    predict.add_argument(
        "--version", type=int, help="model version (default: the active one, else the highest)"
    )
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")

    sub.add_parser("versions", help="list the model versions in the model folder")

    evaluate = sub.add_parser(
        "evaluate",
        help="score a version on an evaluation set and store the result with the version",
        description="Score a version, at its own input size and decision rule, on an evaluation "
        "folder (<CLASS>/<images>, or a Kaggle layout whose test/ is used): accuracy, "
        "sensitivity, specificity with 95%% Wilson intervals, ROC AUC with a bootstrap interval, "
        "the confusion matrix. Stored as <MODEL_DIR>/<N>/external/<name>.json. An evaluation set "
        "is a test set only: never train, tune or choose a threshold on it.",
    )
    evaluate.add_argument("version", type=int, help="the version to score")
    evaluate.add_argument(
        "--dataset",
        required=True,
        help="a name in $CXR_EVAL_DATASETS, or a folder (stored under --name or the folder's name)",
    )
    evaluate.add_argument("--name", help="the name to store a folder's result under")
    evaluate.add_argument("--json", action="store_true", help="print the stored JSON document")


def add_gate_arguments(parser: Any, required: bool = False) -> None:
    """``--dataset`` (fits the out-of-distribution gate) and ``--ood-acceptance``."""
    if not required:
        parser.add_argument(
            "--dataset",
            type=Path,
            help="a folder <root>/{train,val,test}/<CLASS>/ to fit the out-of-distribution gate "
            "on (train split; threshold on val); without it the version has no gate",
        )
    parser.add_argument(
        "--ood-acceptance",
        type=float,
        default=0.99,
        help="share of val images the gate's threshold accepts (default 0.99)",
    )


IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def cmd_init_model(args: argparse.Namespace) -> int:
    """Publish an untrained classifier as the next version."""
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version

    classes = parse_classes(args.classes)
    base = None if args.base.lower() == "none" else args.base
    keras.utils.set_random_seed(args.seed)
    try:
        model = build_classifier(classes, input_size=args.input_size, base_weights=base)
    except Exception as exc:
        if base != "imagenet" or "URL fetch failure" not in str(exc):
            raise
        # Keras raises a bare Exception when the download fails; say what to do in one line.
        print(
            f"cxr init-model: cannot download the ImageNet VGG16 weights "
            f"({str(exc).splitlines()[0][:200]}). Offline, use --base none (random weights), "
            f"--base /path/to/{IMAGENET_NOTOP_FILE}, or put that file in "
            "~/.keras/models/ (or $KERAS_HOME/models/); the Docker worker image has it.",
            file=sys.stderr,
        )
        return 2
    from ml.ood import fit_gate_on_folder

    gate, ood = fit_gate_on_folder(model, args.dataset, classes, args.ood_acceptance)
    metadata = save_version(
        model,
        args.model_dir,
        class_names=classes,
        base_weights=base,
        extra={"trained": False, "note": "untrained head, created by `cxr init-model`"},
        ood_gate=gate,
        ood=ood,
        trained=False,
    )
    print(
        f"wrote version {metadata.version} to {args.model_dir / str(metadata.version)} "
        "(UNTRAINED: its answers are not a diagnosis until it is fine-tuned)"
    )
    activate_if_first(args.model_dir, metadata.version)
    return 0


def parse_classes(text: str) -> list[str]:
    """Split a comma-separated list of class names, dropping blanks."""
    return [c.strip() for c in text.split(",") if c.strip()]


def activate_if_first(model_dir: Path, version: int) -> None:
    """Make ``version`` active when the folder has no active version yet; say which it is.

    Only the first version is activated: a later one replaces what is being served only when an
    administrator promotes it (``cxr promote``, or the admin page).
    """
    from ml.versions import read_active_file, write_active_file

    active = read_active_file(model_dir)
    if active is None:
        write_active_file(model_dir, version)
        print(f"version {version} is now the active version (the first in {model_dir})")
    else:
        print(
            f"version {version} is a candidate; version {active} stays active "
            f"(promote it with `cxr promote {version}`)"
        )


def cmd_import(args: argparse.Namespace) -> int:
    """Publish an existing Keras model file as the next version."""
    from ml.dataset import DatasetError
    from ml.versions import IncompatibleModelError, import_model

    classes = parse_classes(args.classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        print(f"--classes needs at least two distinct names, got {classes}", file=sys.stderr)
        return 2
    if not args.file.is_file():
        print(f"{args.file}: no such file", file=sys.stderr)
        return 2
    try:
        metadata = import_model(
            args.file,
            args.model_dir,
            class_names=classes,
            note=args.note,
            dataset_root=args.dataset,
            ood_acceptance=args.ood_acceptance,
            trained=not args.untrained,
        )
    except (IncompatibleModelError, DatasetError) as exc:
        print(f"cannot import {args.file}: {exc}", file=sys.stderr)
        return 2
    path = args.model_dir / str(metadata.version)
    mark = "" if metadata.trained else ", UNTRAINED"
    print(
        f"imported {args.file} as version {metadata.version} ({metadata.input_size}px{mark}) "
        f"to {path}"
    )
    activate_if_first(args.model_dir, metadata.version)
    evaluate_configured(args.model_dir, metadata.version)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Publish a version's weights again with a decision threshold."""
    from ml.calibration import calibrate_version
    from ml.dataset import DatasetError
    from ml.versions import VersionNotFoundError

    try:
        meta = calibrate_version(
            args.model_dir, args.version, args.dataset, args.target_sensitivity,
            args.ood_acceptance,
        )  # fmt: skip
    except (DatasetError, VersionNotFoundError, ValueError) as exc:
        print(f"cannot calibrate version {args.version}: {exc}", file=sys.stderr)
        return 2
    m = meta.metrics
    print(
        f"wrote version {meta.version}: version {args.version} labelling at threshold "
        f"{meta.decision_threshold:.4f} on 1 - p(NORMAL); test split: accuracy "
        f"{m['accuracy']:.3f}, sensitivity {m['sensitivity']:.3f}, specificity "
        f"{m['specificity']:.3f} (a candidate: `cxr promote {meta.version}` to serve it)"
    )
    evaluate_configured(args.model_dir, meta.version)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify each image and print its label and probabilities."""
    from ml.imaging import ImageError, load_image_file, to_model_input
    from ml.versions import latest_version, list_versions, load_classifier, read_active_file

    version = args.version
    if version is None:
        version = read_active_file(args.model_dir) or latest_version(args.model_dir)
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
        threshold = classifier.decision_threshold
        if args.json or args.json_output:
            doc = {"image": str(path), "label": prediction.label, "model_version": version}
            doc["decision_threshold"] = threshold
            doc["model_trained"] = classifier.trained
            print(json.dumps({**doc, "probabilities": prediction.probabilities}))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in prediction.probabilities.items())
            rule = "" if threshold is None else f", threshold {threshold:.3f}"
            mark = "" if classifier.trained else "  UNTRAINED model: not a diagnosis"
            print(f"{path}: {prediction.label}  ({probs})  [model v{version}{rule}]{mark}")
    return 1 if failures else 0


def cmd_versions(args: argparse.Namespace) -> int:
    """Print one line per model version."""
    from ml.versions import list_versions, read_metadata

    versions = list_versions(args.model_dir)
    if not versions:
        print(f"no model versions in {args.model_dir}")
    for v in versions:
        m = read_metadata(args.model_dir, v)
        mark = "" if m.trained else "\tUNTRAINED"
        line = f"{v}\t{m.created_at}\t{m.input_size}px\t{','.join(m.class_names)}\t{m.base_weights}"
        print(f"{line}\t{gate_column(m.ood)}{mark}")
    return 0


def external_line(name: str, doc: dict[str, Any]) -> str:
    """One evaluation set's figures in one line (or its error)."""
    from ml.external import sensitivity_warning

    if doc.get("error"):
        return f"{name}: not evaluated: {doc['error']}"

    def figure(key: str) -> str:
        value, ci = doc.get(key), doc.get(f"{key}_ci")
        if value is None:
            return f"{key} -"
        return f"{key} {value:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")

    keys = ("accuracy", "sensitivity", "specificity", "roc_auc")
    line = f"{name} (n={doc.get('n')}): " + ", ".join(figure(k) for k in keys)
    warning = sensitivity_warning({"dataset": name, **doc})
    return line + (f"\n  WARNING: {warning}" if warning else "")


def evaluate_configured(model_dir: Path, version: int) -> None:
    """Score a freshly published version on every set of $CXR_EVAL_DATASETS (and say so)."""
    from worker.settings import ClientSettings

    sets = ClientSettings().configured_eval_datasets()
    if sets:
        from ml.external import evaluate_on_sets

        for name, doc in evaluate_on_sets(model_dir, version, sets).items():
            print(external_line(name, doc))


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a version on one evaluation set and store the result."""
    from ml.external import check_name, evaluate_version
    from ml.versions import has_version
    from worker.settings import ClientSettings

    if not has_version(args.model_dir, args.version):
        print(f"no model version {args.version} in {args.model_dir}", file=sys.stderr)
        return 2
    try:
        configured = ClientSettings().configured_eval_datasets()
    except ValueError as exc:
        print(f"CXR_EVAL_DATASETS: {exc}", file=sys.stderr)
        return 2
    if args.dataset in configured and args.name is None:
        name, root = args.dataset, configured[args.dataset]
    else:
        root = Path(args.dataset)
        if not root.is_dir():
            known = ", ".join(sorted(configured)) or "none"
            print(
                f"{args.dataset}: neither a folder nor a set of $CXR_EVAL_DATASETS ({known})",
                file=sys.stderr,
            )
            return 2
        name = args.name or root.resolve().name
    try:
        check_name(name)
    except ValueError as exc:
        print(f"{exc} (pass --name)", file=sys.stderr)
        return 2
    doc = evaluate_version(args.model_dir, args.version, name, root)
    if args.json or args.json_output:
        print(json.dumps(doc))
    else:
        print(f"version {args.version} on {root}: " + external_line(name, doc))
        print(f"stored in {args.model_dir / str(args.version) / 'external' / (name + '.json')}")
    return 1 if doc.get("error") else 0


def gate_column(ood: dict[str, Any]) -> str:
    """The versions table's gate column: method, threshold, acceptance on val and test."""
    if not ood or ood.get("method", "none") == "none":
        return "gate: none"
    return (
        f"gate: {ood['method']} t={ood['threshold']:.1f} "
        f"val {ood['val_acceptance']:.1%} test {ood['test_acceptance']:.1%}"
    )


LOCAL_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init-model": cmd_init_model,
    "import": cmd_import,
    "calibrate": cmd_calibrate,
    "predict": cmd_predict,
    "versions": cmd_versions,
    "evaluate": cmd_evaluate,
}
