"""The admin commands of ``cxr``: fine-tuning jobs and the active version, over the admin API.

They call a running service (``--api-url``, ``--token``; defaults from
:class:`worker.settings.ClientSettings`) through :class:`cli.api.AdminApi`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from cli.api import AdminApi, ApiError, ApiUnreachable, job_path
from cli.options import add_options
from cli.output import (
    describe_change,
    fmt_metric,
    fmt_seconds,
    fmt_time,
    outcome_text,
    print_json,
    print_table,
    progress_text,
)
from ml.config import POLICIES, TrainingOptions
from worker.settings import DEFAULT_API_URL, ClientSettings

FINAL_JOB_STATES = ("done", "failed", "cancelled")


def add_api_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options of the admin commands: on the main parser, and again after a subcommand.

    After a subcommand their default is ``SUPPRESS``, so ``cxr --json models`` and
    ``cxr models --json`` both work and neither position overrides the other.
    """

    env = ClientSettings()

    def value(fallback: Any) -> Any:
        return argparse.SUPPRESS if suppress else fallback

    parser.add_argument(
        "--api-url",
        default=value(env.api_url),
        help=f"base URL of the cxr web service (default: $CXR_API_URL or {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--token",
        default=value(env.admin_token),
        help="admin API token (default: $CXR_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--actor",
        default=value(env.who),
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
    # The knobs come from their one declaration; unset ones are not sent (the service's defaults).
    add_options(train, TrainingOptions, TrainingOptions.model_fields, with_defaults=False)
    train.add_argument(
        "--promotion",
        choices=POLICIES,
        help="promote the new version if at least as good as the active one, always, or never",
    )
    train.add_argument(
        "--external-tolerance",
        type=float,
        help="how far (AUC, sensitivity) an if_better candidate may fall below the active "
        "version on a registered evaluation set (default: the service's; 1: off)",
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
    model.add_argument("--card", action="store_true", help="print the version's model card")
    for name, summary in (
        ("promote", "make a version the active one"),
        ("pin", "deliberately make a specific (older) version active"),
    ):
        change = command(name, summary)
        change.add_argument("version", type=int)
        change.add_argument("--reason", default="", help="recorded in the audit log")
    rollback = command("rollback", "make the previously active version active again")
    rollback.add_argument("--reason", default="", help="recorded in the audit log")
    sets = command(
        "eval-datasets",
        "list, register (--add NAME PATH) or remove (--remove NAME) evaluation sets",
    )
    sets.add_argument(
        "--add", nargs=2, metavar=("NAME", "PATH"), help="register PATH (inside CXR_DATA_DIR)"
    )
    sets.add_argument("--remove", metavar="NAME", help="forget an admin-registered set")
    audit = command("audit", "show recent changes of the active version")
    audit.add_argument("--limit", type=int, default=20, help="how many (default 20)")


def cmd_train(args: argparse.Namespace, api: AdminApi) -> int:
    """Queue a fine-tuning job; with --wait, follow it to the end."""
    names = ("dataset", "base", *TrainingOptions.model_fields, "promotion", "external_tolerance")
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


def print_listing(
    as_json: bool,
    doc: dict[str, Any],
    key: str,
    empty: str,
    header: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[object]],
) -> bool:
    """Print ``doc`` as JSON, or ``empty``, or a table of ``doc[key]``; True if a table."""
    if as_json:
        print_json(doc)
        return False
    if not doc[key]:
        print(empty)
        return False
    print_table(header, [row(item) for item in doc[key]])
    return True


def job_row(j: dict[str, Any]) -> tuple[object, ...]:
    """One row of ``cxr jobs``."""
    return (
        j["id"], j["status"], fmt_time(j.get("created_at")), j.get("actor", ""),
        progress_text(j) if j["status"] in ("queued", "running") else outcome_text(j),
    )  # fmt: skip


def cmd_jobs(args: argparse.Namespace, api: AdminApi) -> int:
    """List recent fine-tuning jobs."""
    doc = api.call("GET", f"/training-jobs?limit={args.limit}")
    header = ("ID", "STATUS", "CREATED", "BY", "PROGRESS / OUTCOME")
    print_listing(args.json_output, doc, "jobs", "no fine-tuning jobs", header, job_row)
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


def version_row(v: dict[str, Any]) -> tuple[object, ...]:
    """One row of ``cxr models``."""
    m = v.get("metrics") or {}
    base = f"v{v['parent_version']}" if v.get("parent_version") else v.get("base_weights")
    # A version never fine-tuned: its answers are not a diagnosis (ModelMetadata.trained).
    name = v["version"] if v.get("trained", True) else f"{v['version']} UNTRAINED"
    return (
        name, "*" if v["active"] else "", fmt_time(v.get("created_at")),
        base or "none", f"{v['input_size']}px", fmt_metric(m.get("accuracy")),
        fmt_metric(m.get("sensitivity")), fmt_metric(m.get("specificity")),
        fmt_metric(m.get("roc_auc")), gate_cell(v.get("gate") or {}),
    )  # fmt: skip


def gate_cell(g: dict[str, Any]) -> str:
    """The OOD gate column: method, threshold, acceptance on val / test; "none" without one."""
    if g.get("method", "none") == "none":
        return "none"
    val, test = g.get("val_acceptance"), g.get("test_acceptance")
    cell = f"{g['method']} t={g['threshold']:.1f} val={val:.1%} test={test:.1%}"
    return cell + ("" if g.get("enabled", True) else " (off)")


def cmd_models(args: argparse.Namespace, api: AdminApi) -> int:
    """List the service's model versions."""
    doc = api.call("GET", "/models")
    header = ("VERSION", "ACTIVE", "CREATED", "BASE", "INPUT", "ACC", "SENS", "SPEC", "AUC", "GATE")
    table = print_listing(
        args.json_output, doc, "versions", "no model versions", header, version_row
    )
    if table and doc["active_version"] is None:
        print("no active version: promote one with `cxr promote N`")
    return 0


def cmd_model(args: argparse.Namespace, api: AdminApi) -> int:
    """Show one model version (``--card``: its model card, Markdown; with --json, the JSON)."""
    if args.card:
        from ml.model_card import card_markdown

        card = api.call("GET", f"/models/{args.version}/card")
        if args.json_output:
            print_json(card)
        else:
            print(card_markdown(card), end="")
        return 0
    doc = api.call("GET", f"/models/{args.version}")
    if args.json_output:
        print_json(doc)
        return 0
    print(f"version:   {doc['version']}" + ("  (active)" if doc.get("active") else ""))
    if doc.get("trained") is False:
        print("UNTRAINED: never fine-tuned; its answers are not a diagnosis")
    print(f"created:   {fmt_time(doc.get('created_at'))}")
    print(f"base:      {doc.get('base_weights') or 'none'}")
    if doc.get("parent_version") is not None:
        print(f"parent:    version {doc['parent_version']}")
    print(f"input:     {doc['input_size']}px")
    print(f"classes:   {', '.join(doc['class_names'])}")
    print(f"OOD gate:  {gate_cell(doc.get('gate') or {})}")
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
    external = doc.get("external") or {}
    if external:
        from cli.local import external_line

        print("external evaluation (at the version's own decision rule, 95% intervals):")
        for name, ext in sorted(external.items()):
            print("  " + external_line(name, ext).replace("\n", "\n  "))
    return 0


def cmd_eval_datasets(args: argparse.Namespace, api: AdminApi) -> int:
    """List, register or remove evaluation sets."""
    if args.add:
        name, path = args.add
        doc = api.call("PUT", f"/eval-datasets/{urllib.parse.quote(name, safe='')}", {"path": path})
        if args.json_output:
            print_json(doc)
        else:
            print(f"registered evaluation set {doc['name']}: {doc['path']}")
            if doc.get("warning"):
                print(f"warning: {doc['warning']}")
        return 0
    if args.remove:
        api.call("DELETE", f"/eval-datasets/{urllib.parse.quote(args.remove, safe='')}")
        print(f"removed evaluation set {args.remove}")
        return 0
    doc = api.call("GET", "/eval-datasets")
    header = ("NAME", "PATH", "SOURCE")
    row = lambda d: (d["name"], d["path"], d["source"])  # noqa: E731
    print_listing(args.json_output, doc, "datasets", "no evaluation sets", header, row)
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


def audit_row(e: dict[str, Any]) -> tuple[object, ...]:
    """One row of ``cxr audit``."""
    return (
        fmt_time(e["at"]), e["actor"], e["action"],
        "-" if e["from_version"] is None else e["from_version"], e["to_version"], e["reason"],
    )  # fmt: skip


def cmd_audit(args: argparse.Namespace, api: AdminApi) -> int:
    """Show recent changes of the active version."""
    doc = api.call("GET", f"/audit?limit={args.limit}")
    header = ("WHEN", "BY", "ACTION", "FROM", "TO", "REASON")
    empty = "no changes of the active version yet"
    print_listing(args.json_output, doc, "entries", empty, header, audit_row)
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
    "eval-datasets": cmd_eval_datasets,
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
