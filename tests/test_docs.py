"""The README stays true: every setting documented, CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `(CXR_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    expected = {f"CXR_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected


def test_ci_runs_the_readme_test_command() -> None:
    assert "\nmake test\n" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_architecture_names_every_redis_key() -> None:
    from worker.client import Keys

    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    keys = Keys("cxr")
    names = [keys.job("<id>"), keys.upload("<id>"), keys.done("<id>"), keys.heatmap("<id>")]
    names += [keys.worker("<host>:<pid>"), keys.workers(), keys.training_job("<id>")]
    names += [keys.training_index(), keys.first_run(), keys.first_run_lock()]
    names += [keys.active_version(), keys.model_history(), keys.model_audit(), keys.model_events()]
    for key in names:
        assert f"`{key}`" in architecture, key
