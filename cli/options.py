"""Command-line flags built from :mod:`ml.config`'s declaration of the training knobs.

``cxr train`` and ``python -m cli.train`` both call :func:`add_options`, so a knob has one
spelling (``--`` + its name with dashes; older spellings kept as aliases), one type, one default
and one help text wherever it is typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from ml.config import choices, limits, value_type


def _extra(model: type[BaseModel], name: str, key: str) -> Any:
    """One entry of a field's ``json_schema_extra`` (None when absent)."""
    extra = model.model_fields[name].json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def flags(model: type[BaseModel], name: str) -> list[str]:
    """The flags of a field: ``--input-size``, then its aliases (``--lr-head``)."""
    aliases = _extra(model, name, "aliases") or []
    return ["--" + name.replace("_", "-"), *(str(a) for a in aliases)]


def help_text(model: type[BaseModel], name: str) -> str:
    """A field's description with its range and default: ``images per batch (1..1024; 32)``."""
    info = model.model_fields[name]
    kind = value_type(model, name)
    low, high, exclusive = limits(model, name)
    parts = []
    # A choice's values are in argparse's own "{a,b,c}" beside the flag.
    if kind in (int, float) and (low is not None or high is not None):
        parts.append(_range(low, high, exclusive, kind))
    unset = _extra(model, name, "unset") or "none"
    parts.append(f"default {unset if info.default is None else info.default}")
    return f"{info.description} ({'; '.join(parts)})"


def _range(low: float | None, high: float | None, exclusive: bool, kind: type) -> str:
    """``0..500``, ``> 0 and <= 1`` or ``>= 1``."""

    def show(value: float) -> str:
        return str(int(value)) if kind is int else f"{value:g}"

    if low is not None and high is not None and not exclusive:
        return f"{show(low)}..{show(high)}"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if exclusive else '>='} {show(low)}")
    if high is not None:
        bounds.append(f"<= {show(high)}")
    return " and ".join(bounds)


def add_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    names: Iterable[str],
    *,
    with_defaults: bool,
) -> None:
    """Add a flag per field ``names`` of ``model``.

    With ``with_defaults`` a flag not given takes the declared default (a local run); without,
    it stays ``None`` so that only what was typed is sent (the service applies its defaults).
    """
    for name in names:
        info = model.model_fields[name]
        kind = value_type(model, name)
        options: dict[str, Any] = {
            "dest": name,
            "default": info.default if with_defaults else None,
            "help": help_text(model, name),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is str:
            options["choices"] = choices(model, name)
        else:
            options["type"] = kind
        parser.add_argument(*flags(model, name), **options)
