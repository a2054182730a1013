"""The admin page's External sets column in a real browser (headless Chromium, gunicorn): each
set's figures with their intervals, and the below-target warning exactly where the rule says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from ml.external import write_external
from tests.conftest import make_settings
from tests.e2e.conftest import gunicorn
from tests.e2e.test_browser import ADMIN_TOKEN, browser, page  # noqa: F401 (fixtures)
from worker.settings import Settings

pytestmark = pytest.mark.integration

SHORT = {"n": 474, "accuracy": 0.772, "sensitivity": 0.593, "sensitivity_ci": [0.53, 0.653],
         "specificity": 0.961, "roc_auc": 0.92, "roc_auc_ci": [0.896, 0.942], "threshold": 0.09,
         "target_sensitivity": 0.95}  # fmt: skip


@pytest.fixture
def admin_web(redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """gunicorn with the admin API on; version 2 has three external evaluations."""
    write_external(model_dir, 2, "kaggle-test", SHORT)
    write_external(model_dir, 2, "site-a", SHORT | {"sensitivity_ci": [0.4, 0.96]})
    write_external(model_dir, 2, "site-b", {"dataset": "site-b", "error": "no folder"})
    (tmp_path / "data" / "site-c" / "NORMAL").mkdir(parents=True)
    settings = make_settings(
        redis_url, model_dir, admin_token=ADMIN_TOKEN, data_dir=tmp_path / "data",
        eval_datasets="kaggle-test=/data/cxr-kaggle-test-256",
    )  # fmt: skip
    with gunicorn(settings, tmp_path) as url:
        yield url, settings


def test_the_versions_table_shows_external_sets_and_warns(
    page: Page,  # noqa: F811
    admin_web: tuple[str, Settings],
) -> None:
    url, _ = admin_web
    page.goto(f"{url}/admin")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#panel")).to_be_visible()
    expect(page.locator("#versions thead")).to_contain_text("External sets")
    v2 = page.locator("#versions tbody tr").filter(has_text="v2")
    kaggle = v2.locator(".external-set[data-set=kaggle-test]")
    expect(kaggle).to_contain_text("AUC 0.920 [0.896–0.942], sens 0.593 [0.530–0.653]")
    expect(kaggle.locator(".badge.warning")).to_have_text("below target")
    expect(kaggle).to_contain_text("is below the target 0.950")
    site_a = v2.locator(".external-set[data-set=site-a]")
    expect(site_a).to_contain_text("sens 0.593 [0.400–0.960]")
    expect(site_a.locator(".badge.warning")).to_have_count(0)  # 0.95 is inside the interval
    expect(v2.locator(".external-set[data-set=site-b]")).to_contain_text("not evaluated")
    v1 = page.locator("#versions tbody tr").nth(1)  # newest first; "v1" is also v2's base
    expect(v1.locator("td.external")).to_have_text("—")

    # The evaluation sets: the configured one, and one registered from the page.
    sets = page.locator("#eval-sets tbody tr")
    expect(sets).to_have_count(1)
    expect(sets.first).to_contain_text("CXR_EVAL_DATASETS")
    page.fill("#eval-form input[name=name]", "nowhere")
    page.fill("#eval-form input[name=path]", "no-such-folder")
    page.click("#eval-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("no folder 'no-such-folder'")
    page.fill("#eval-form input[name=name]", "site-c")
    page.fill("#eval-form input[name=path]", "site-c")
    page.click("#eval-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("Registered evaluation set site-c")
    expect(sets).to_have_count(2)
    page.on("dialog", lambda dialog: dialog.accept())
    sets.filter(has_text="site-c").get_by_role("button", name="Remove").click()
    expect(sets).to_have_count(1)
