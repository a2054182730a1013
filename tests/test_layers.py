"""Imports run one way: web → worker's client side → worker → ml; cli is a client beside web.

Read from the source (no import), so a lazy import inside a function counts too; only a module's
``if __name__ == "__main__":`` block is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    """The top-level package names ``path`` imports, outside its ``__main__`` block."""
    tree = ast.parse(path.read_text())
    main_blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    ]
    exempt = {id(n) for block in main_blocks for n in ast.walk(block)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    """The source files of one of the project's packages."""
    return sorted((ROOT / package).glob("*.py"))


FORBIDDEN_IN_ML = ("flask", "celery", "kombu", "redis", "urllib", "http", "requests")
FORBIDDEN_IN_ML += ("web", "worker", "cli")


@pytest.mark.parametrize("path", modules("ml"), ids=lambda p: p.name)
def test_ml_is_pure_keras_and_numpy(path: Path) -> None:
    bad = {n for n in imported(path) if n.split(".")[0] in FORBIDDEN_IN_ML}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("web"), ids=lambda p: p.name)
def test_web_reaches_ml_only_through_the_worker_client_side(path: Path) -> None:
    bad = {n for n in imported(path) if n.split(".")[0] in ("ml", "cli", "tensorflow", "keras")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("cli"), ids=lambda p: p.name)
def test_cli_talks_to_the_service_over_http_only(path: Path) -> None:
    names = imported(path)
    bad = {n for n in names if n.split(".")[0] in ("flask", "celery", "redis", "web")}
    bad |= {n for n in names if n.startswith("worker") and n != "worker.settings"}
    assert not bad, f"{path.name} imports {sorted(bad)}"
