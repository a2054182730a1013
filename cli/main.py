"""``cxr``: create, list and run model versions locally, and administer the running service.

``cxr predict chest.jpeg`` does what the original notebook did: give it an X-ray, get the answer.
``init-model``, ``import``, ``calibrate``, ``predict`` and ``versions`` work on the local model
folder; the admin commands (``train``, ``jobs``, ``promote``, ...) call the service's admin API
over HTTP with ``$CXR_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.admin import ADMIN_COMMANDS, add_admin_commands, add_api_options, run_admin
from cli.local import LOCAL_COMMANDS, add_local_commands
from worker.settings import ClientSettings


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``cxr`` command."""
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=ClientSettings().model_dir,
        help="folder of model versions (default: $CXR_MODEL_DIR or ./models)",
    )
    add_api_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_local_commands(sub)
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cxr`` command."""
    args = build_parser().parse_args(argv)
    if args.command in ADMIN_COMMANDS:
        return run_admin(args)
    return LOCAL_COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
