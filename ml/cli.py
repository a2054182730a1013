"""``cxr``: create, list and run model versions locally, and administer the running service.

``cxr predict chest.jpeg`` does what the original notebook did: give it an X-ray, get the answer.
``init-model``, ``import``, ``calibrate``, ``predict`` and ``versions`` work on the local model
folder; the admin commands (``train``, ``jobs``, ``promote``, ...) call the service's admin API
over HTTP with ``$CXR_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_CLASSES = "NORMAL,PNEUMONIA"
DEFAULT_API_URL = "http://127.0.0.1:8000"
ADMIN_PATH = "/api/v1/admin"
HTTP_TIMEOUT_SECONDS = 30.0
FINAL_JOB_STATES = ("done", "failed", "cancelled")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``cxr`` command."""
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("CXR_MODEL_DIR", "models")),
        help="folder of model versions (default: $CXR_MODEL_DIR or ./models)",
    )
    add_api_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)

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

    predict = sub.add_parser("predict", help="classify local image files with a model version")
    predict.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    predict.add_argument(
        "--version", type=int, help="model version (default: the active one, else the highest)"
    )
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")

    sub.add_parser("versions", help="list the model versions in the model folder")
    add_admin_commands(sub)
    return parser


def add_api_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options of the admin commands: on the main parser, and again after a subcommand.

    After a subcommand their default is ``SUPPRESS``, so ``cxr --json models`` and
    ``cxr models --json`` both work and neither position overrides the other.
    """

    def value(fallback: Any) -> Any:
        return argparse.SUPPRESS if suppress else fallback

    parser.add_argument(
        "--api-url",
        default=value(os.environ.get("CXR_API_URL", DEFAULT_API_URL)),
        help=f"base URL of the cxr web service (default: $CXR_API_URL or {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--token",
        default=value(os.environ.get("CXR_ADMIN_TOKEN")),
        help="admin API token (default: $CXR_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--actor",
        default=value(os.environ.get("CXR_ACTOR") or os.environ.get("USER")),
        help="name recorded in the audit log and on jobs (default: $CXR_ACTOR or $USER)",
    )
    parser.add_argument(
        "--json",
        dest="json_output",
        action="store_true",
        default=value(False),
        help="print the API's JSON instead of tables",
    )


def add_admin_commands(sub: Any) -> None:
    """The subcommands that call the admin API of a running service."""
    api = argparse.ArgumentParser(add_help=False)
    add_api_options(api, suppress=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=summary, description=summary, parents=[api]
        )
        return parser

    train = command("train", "start a fine-tuning job on the service's trainer")
    train.add_argument("--dataset", help="folder inside the service's CXR_DATA_DIR")
    train.add_argument("--base", help="imagenet, none, active, or a weights file in CXR_DATA_DIR")
    train.add_argument("--input-size", type=int, help="input side in px (32..1024)")
    train.add_argument("--epochs-head", type=int, help="epochs training the new head only")
    train.add_argument("--epochs-finetune", type=int, help="epochs with VGG16 blocks unfrozen")
    train.add_argument("--learning-rate-head", type=float, help="learning rate of the head phase")
    train.add_argument(
        "--learning-rate-finetune", type=float, help="learning rate of the fine-tuning phase"
    )
    train.add_argument("--finetune-blocks", type=int, help="VGG16 blocks to unfreeze (0..5)")
    train.add_argument("--batch-size", type=int, help="images per batch")
    train.add_argument(
        "--promotion",
        choices=("if_better", "always", "never"),
        help="promote the new version if at least as good as the active one, always, or never",
    )
    train.add_argument(
        "--max-images-per-class", type=int, help="use at most this many images of each class"
    )
    train.add_argument(
        "--patience", type=int, help="epochs without a better validation AUC before stopping"
    )
    train.add_argument("--seed", type=int, help="random seed (split, shuffling, initial weights)")
    train.add_argument(
        "--target-sensitivity",
        type=float,
        help="label at the threshold reaching this sensitivity on the val split (default argmax)",
    )
    train.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const=False,
        help="train without the light augmentation (rotation, zoom, shift)",
    )
    train.add_argument(
        "--wait", action="store_true", help="follow the job's progress until it ends"
    )
    train.add_argument(
        "--poll-seconds", type=float, default=2.0, help="seconds between polls with --wait"
    )

    jobs = command("jobs", "list recent fine-tuning jobs")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    job = command("job", "show one fine-tuning job")
    job.add_argument("id", help="job id")
    cancel = command("cancel", "cancel a queued job, or stop a running one at its next batch")
    cancel.add_argument("id", help="job id")

    command("models", "list the service's model versions and which one is active")
    model = command("model", "show one model version with its evaluation")
    model.add_argument("version", type=int)
    for name, summary in (
        ("promote", "make a version the active one"),
        ("pin", "deliberately make a specific (older) version active"),
    ):
        change = command(name, summary)
        change.add_argument("version", type=int)
        change.add_argument("--reason", default="", help="recorded in the audit log")
    rollback = command("rollback", "make the previously active version active again")
    rollback.add_argument("--reason", default="", help="recorded in the audit log")
    audit = command("audit", "show recent changes of the active version")
    audit.add_argument("--limit", type=int, default=20, help="how many (default 20)")


def cmd_init_model(args: argparse.Namespace) -> int:
    """Publish an untrained classifier as the next version."""
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version

    classes = parse_classes(args.classes)
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
    from ml.versions import IncompatibleModelError, import_model

    classes = parse_classes(args.classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        print(f"--classes needs at least two distinct names, got {classes}", file=sys.stderr)
        return 2
    if not args.file.is_file():
        print(f"{args.file}: no such file", file=sys.stderr)
        return 2
    try:
        metadata = import_model(args.file, args.model_dir, class_names=classes, note=args.note)
    except IncompatibleModelError as exc:
        print(f"cannot import {args.file}: {exc}", file=sys.stderr)
        return 2
    path = args.model_dir / str(metadata.version)
    print(f"imported {args.file} as version {metadata.version} ({metadata.input_size}px) to {path}")
    activate_if_first(args.model_dir, metadata.version)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Publish a version's weights again with a decision threshold."""
    from ml.training import DatasetError, calibrate_version
    from ml.versions import VersionNotFoundError

    try:
        meta = calibrate_version(
            args.model_dir, args.version, args.dataset, args.target_sensitivity
        )
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
            print(json.dumps({**doc, "probabilities": prediction.probabilities}))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in prediction.probabilities.items())
            rule = "" if threshold is None else f", threshold {threshold:.3f}"
            print(f"{path}: {prediction.label}  ({probs})  [model v{version}{rule}]")
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


# --- the admin API client ---------------------------------------------------------------------


class ApiError(Exception):
    """The admin API answered with an error document."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or []


class ApiUnreachable(Exception):
    """No answer from the admin API (refused, timed out, unknown host)."""


class AdminApi:
    """A small JSON client of ``/api/v1/admin`` on urllib (the CLI needs no HTTP library)."""

    def __init__(self, base_url: str, token: str | None, actor: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.actor = actor

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request and return the decoded JSON answer.

        Raises:
            ApiError: the API answered 4xx/5xx (the message comes from its JSON error body).
            ApiUnreachable: nothing answered at ``base_url``.
        """
        headers = {"Accept": "application/json", "User-Agent": "cxr-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.actor:
            headers["X-Actor"] = self.actor
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = self.base_url + ADMIN_PATH + path
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise error_from(exc.code, exc.read(), exc.reason) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ApiUnreachable(f"cannot reach the cxr API at {self.base_url}: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(200, f"the answer from {url} is not JSON") from None


def error_from(status: int, raw: bytes, reason: str) -> ApiError:
    """Turn an HTTP error answer into an :class:`ApiError` with the API's own message."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return ApiError(status, f"HTTP {status} {reason}")
    message = str(doc.get("message") or doc.get("error") or f"HTTP {status} {reason}")
    details = doc.get("details")
    return ApiError(status, message, details if isinstance(details, list) else [])


def job_path(job_id: str) -> str:
    """The API path of one job (the id is quoted: it comes from the command line)."""
    return "/training-jobs/" + urllib.parse.quote(job_id, safe="")


# --- output helpers ---------------------------------------------------------------------------


def print_json(doc: Any) -> None:
    """Print ``doc`` as indented JSON."""
    print(json.dumps(doc, indent=2, sort_keys=True))


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows in aligned columns under a header."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fmt_time(value: object) -> str:
    """A Unix time or ISO timestamp as local ``YYYY-MM-DD HH:MM:SS``."""
    try:
        if isinstance(value, int | float):
            moment = datetime.fromtimestamp(value)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value).astimezone()
        else:
            return "-"
    except (ValueError, OverflowError, OSError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def fmt_metric(value: object) -> str:
    """A metric with three decimals, or ``-``."""
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def fmt_seconds(value: object) -> str:
    """A duration as ``1m05s``."""
    if not isinstance(value, int | float):
        return ""
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_text(job: dict[str, Any]) -> str:
    """One line about where a job is: phase, epoch, metrics, time left."""
    progress = job.get("progress")
    if not isinstance(progress, dict):
        return "waiting for a trainer" if job.get("status") == "queued" else ""
    parts = [f"phase {progress['phase']}" if progress.get("phase") else ""]
    epoch, total = progress.get("epoch"), progress.get("total_epochs")
    batch, batches = progress.get("batch"), progress.get("batches")
    if isinstance(epoch, int | float) and isinstance(total, int | float) and total:
        parts.append(f"epoch {epoch}/{total}")
        done = epoch
        # While an epoch runs, ``epoch`` is the running one and ``batch`` says how far it is.
        if isinstance(batch, int) and isinstance(batches, int) and batches > 0:
            parts.append(f"batch {batch}/{batches}")
            done = epoch - 1 + batch / batches
        parts.append(f"({100 * done / total:.0f}%)")
    metrics = progress.get("metrics")
    if isinstance(metrics, dict):
        parts += [f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, int | float)]
    if eta := fmt_seconds(progress.get("eta_seconds")):
        parts.append(f"eta {eta}")
    return "  ".join(p for p in parts if p)


def outcome_text(job: dict[str, Any]) -> str:
    """One line about how a job ended."""
    if job.get("error"):
        return str(job["error"])
    outcome = job.get("outcome")
    if not isinstance(outcome, dict):
        return ""
    parts = []
    if outcome.get("version") is not None:
        parts.append(f"version {outcome['version']}")
    if outcome.get("promoted") is not None:
        parts.append("promoted" if outcome["promoted"] else "not promoted")
    if outcome.get("reason"):
        parts.append(str(outcome["reason"]))
    return ", ".join(parts) or json.dumps(outcome, sort_keys=True)


def describe_change(doc: dict[str, Any]) -> str:
    """A sentence about a pointer change answered by promote, pin or rollback."""
    entry = doc.get("audit", {})
    was = entry.get("from_version")
    return (
        f"version {doc['active_version']} is now active "
        f"({entry.get('action')} by {entry.get('actor')}; was {'none' if was is None else was})"
    )


# --- the admin commands -----------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, api: AdminApi) -> int:
    """Queue a fine-tuning job; with --wait, follow it to the end."""
    names = (
        "dataset", "base", "input_size", "epochs_head", "epochs_finetune", "learning_rate_head",
        "learning_rate_finetune", "finetune_blocks", "batch_size", "promotion",
        "max_images_per_class", "patience", "seed", "augment", "target_sensitivity",
    )  # fmt: skip
    body = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    doc = api.call("POST", "/training-jobs", body)
    if not args.wait:
        if args.json_output:
            print_json(doc)
        else:
            print(doc["id"])
        return 0
    if not args.json_output:  # with --json, only the final job document is printed
        print(doc["id"], flush=True)
    return follow_job(api, doc["id"], args.poll_seconds, args.json_output)


def follow_job(api: AdminApi, job_id: str, interval: float, as_json: bool) -> int:
    """Print a line whenever a job's state changes, until it ends; 0 if it is done."""
    last = None
    try:
        while True:
            job = api.call("GET", job_path(job_id))
            status = job["status"]
            line = f"{status}: {progress_text(job)}".rstrip(": ")
            if status in FINAL_JOB_STATES:
                if as_json:
                    print_json(job)
                else:
                    print(f"{status}: {outcome_text(job)}".rstrip(": "))
                return 0 if status == "done" else 1
            if line != last and not as_json:
                print(line, flush=True)
            last = line
            time.sleep(interval)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: `cxr job {job_id}`", file=sys.stderr)
        return 130


def cmd_jobs(args: argparse.Namespace, api: AdminApi) -> int:
    """List recent fine-tuning jobs."""
    doc = api.call("GET", f"/training-jobs?limit={args.limit}")
    if args.json_output:
        print_json(doc)
        return 0
    if not doc["jobs"]:
        print("no fine-tuning jobs")
        return 0
    rows = [
        (
            j["id"], j["status"], fmt_time(j.get("created_at")), j.get("actor", ""),
            progress_text(j) if j["status"] in ("queued", "running") else outcome_text(j),
        )
        for j in doc["jobs"]
    ]  # fmt: skip
    print_table(("ID", "STATUS", "CREATED", "BY", "PROGRESS / OUTCOME"), rows)
    return 0


def cmd_job(args: argparse.Namespace, api: AdminApi) -> int:
    """Show one fine-tuning job."""
    job = api.call("GET", job_path(args.id))
    if args.json_output:
        print_json(job)
        return 0
    print(f"id:        {job['id']}")
    print(
        f"status:    {job['status']}" + (" (cancel requested)" if job["cancel_requested"] else "")
    )
    print(f"by:        {job.get('actor', '')}")
    for name in ("created_at", "started_at", "finished_at"):
        if name in job:
            print(f"{name.removesuffix('_at') + ':':<10} {fmt_time(job[name])}")
    params = job.get("params") or {}
    print("params:    " + "  ".join(f"{k}={v}" for k, v in sorted(params.items())))
    if progress := progress_text(job):
        print(f"progress:  {progress}")
    if outcome := outcome_text(job):
        print(f"outcome:   {outcome}")
    return 0


def cmd_cancel(args: argparse.Namespace, api: AdminApi) -> int:
    """Cancel a job."""
    job = api.call("DELETE", job_path(args.id))
    if args.json_output:
        print_json(job)
    elif job["status"] == "cancelled":
        print(f"cancelled job {job['id']}")
    else:
        print(f"asked {job['status']} job {job['id']} to stop (it stops at its next batch)")
    return 0


def cmd_models(args: argparse.Namespace, api: AdminApi) -> int:
    """List the service's model versions."""
    doc = api.call("GET", "/models")
    if args.json_output:
        print_json(doc)
        return 0
    if not doc["versions"]:
        print("no model versions")
        return 0
    rows = []
    for v in doc["versions"]:
        m = v.get("metrics") or {}
        base = f"v{v['parent_version']}" if v.get("parent_version") else v.get("base_weights")
        rows.append(
            (
                v["version"], "*" if v["active"] else "", fmt_time(v.get("created_at")),
                base or "none", f"{v['input_size']}px", fmt_metric(m.get("accuracy")),
                fmt_metric(m.get("sensitivity")), fmt_metric(m.get("specificity")),
                fmt_metric(m.get("roc_auc")),
            )
        )  # fmt: skip
    header = ("VERSION", "ACTIVE", "CREATED", "BASE", "INPUT", "ACC", "SENS", "SPEC", "AUC")
    print_table(header, rows)
    if doc["active_version"] is None:
        print("no active version: promote one with `cxr promote N`")
    return 0


def cmd_model(args: argparse.Namespace, api: AdminApi) -> int:
    """Show one model version."""
    doc = api.call("GET", f"/models/{args.version}")
    if args.json_output:
        print_json(doc)
        return 0
    print(f"version:   {doc['version']}" + ("  (active)" if doc.get("active") else ""))
    print(f"created:   {fmt_time(doc.get('created_at'))}")
    print(f"base:      {doc.get('base_weights') or 'none'}")
    if doc.get("parent_version") is not None:
        print(f"parent:    version {doc['parent_version']}")
    print(f"input:     {doc['input_size']}px")
    print(f"classes:   {', '.join(doc['class_names'])}")
    if doc.get("job_id"):
        print(f"job:       {doc['job_id']}")
    if doc.get("training_seconds") is not None:
        print(f"trained:   {fmt_seconds(doc['training_seconds'])}")
    for name in ("hyperparameters", "dataset", "extra"):
        if doc.get(name):
            print(f"{name + ':':<10} " + json.dumps(doc[name], sort_keys=True))
    evaluation = doc.get("evaluation")
    if evaluation:
        scalars = {k: v for k, v in evaluation.items() if isinstance(v, int | float | str)}
        print("evaluation:")
        for k, v in sorted(scalars.items()):
            print(f"  {k}: {fmt_metric(v) if isinstance(v, float) else v}")
    else:
        print("evaluation: none")
    return 0


def cmd_promote(args: argparse.Namespace, api: AdminApi) -> int:
    """Make a version active (``promote`` or ``pin``)."""
    body = {"reason": args.reason} if args.reason else None
    doc = api.call("POST", f"/models/{args.version}/{args.command}", body)
    if args.json_output:
        print_json(doc)
    else:
        print(describe_change(doc))
    return 0


def cmd_rollback(args: argparse.Namespace, api: AdminApi) -> int:
    """Make the previously active version active again."""
    doc = api.call("POST", "/models/rollback", {"reason": args.reason} if args.reason else None)
    if args.json_output:
        print_json(doc)
    else:
        print("rolled back: " + describe_change(doc))
    return 0


def cmd_audit(args: argparse.Namespace, api: AdminApi) -> int:
    """Show recent changes of the active version."""
    doc = api.call("GET", f"/audit?limit={args.limit}")
    if args.json_output:
        print_json(doc)
        return 0
    if not doc["entries"]:
        print("no changes of the active version yet")
        return 0
    rows = [
        (
            fmt_time(e["at"]), e["actor"], e["action"],
            "-" if e["from_version"] is None else e["from_version"], e["to_version"], e["reason"],
        )
        for e in doc["entries"]
    ]  # fmt: skip
    print_table(("WHEN", "BY", "ACTION", "FROM", "TO", "REASON"), rows)
    return 0


ADMIN_COMMANDS: dict[str, Callable[[argparse.Namespace, AdminApi], int]] = {
    "train": cmd_train,
    "jobs": cmd_jobs,
    "job": cmd_job,
    "cancel": cmd_cancel,
    "models": cmd_models,
    "model": cmd_model,
    "promote": cmd_promote,
    "pin": cmd_promote,
    "rollback": cmd_rollback,
    "audit": cmd_audit,
}


def run_admin(args: argparse.Namespace) -> int:
    """Run an admin command: 1 when the API refuses, 2 when it cannot be reached."""
    scheme = urllib.parse.urlsplit(args.api_url).scheme
    if scheme not in ("http", "https"):
        print(f"--api-url must be an http(s) URL, got {args.api_url!r}", file=sys.stderr)
        return 2
    api = AdminApi(args.api_url, args.token, args.actor)
    try:
        return ADMIN_COMMANDS[args.command](args, api)
    except ApiError as exc:
        print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
        for detail in exc.details:
            if isinstance(detail, dict):
                where = ".".join(str(p) for p in detail.get("loc", [])) or "body"
                print(f"  {where}: {detail.get('msg', detail)}", file=sys.stderr)
        if exc.status == 401 and not args.token:
            print("no admin token given: pass --token or set CXR_ADMIN_TOKEN", file=sys.stderr)
        return 1
    except ApiUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cxr`` command."""
    args = build_parser().parse_args(argv)
    if args.command in ADMIN_COMMANDS:
        return run_admin(args)
    commands = {
        "init-model": cmd_init_model,
        "import": cmd_import,
        "calibrate": cmd_calibrate,
        "predict": cmd_predict,
        "versions": cmd_versions,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
