"""How the admin commands print: JSON, aligned tables, times, metrics, a job's progress."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any


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
    # The trainer records the promotion decision under "promotion" (with its reason: which
    # evaluation set blocked it, for one).
    nested = outcome.get("promotion")
    decision: dict[str, Any] = nested if isinstance(nested, dict) else outcome
    if decision.get("promoted") is not None:
        parts.append("promoted" if decision["promoted"] else "not promoted")
    if decision.get("reason"):
        parts.append(str(decision["reason"]))
    return ", ".join(parts) or json.dumps(outcome, sort_keys=True)


def describe_change(doc: dict[str, Any]) -> str:
    """A sentence about a pointer change answered by promote, pin or rollback."""
    entry = doc.get("audit", {})
    was = entry.get("from_version")
    return (
        f"version {doc['active_version']} is now active "
        f"({entry.get('action')} by {entry.get('actor')}; was {'none' if was is None else was})"
    )
