"""The pages in a real browser: headless Debian Chromium driven by Playwright, against gunicorn."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import CLASSES, make_settings
from tests.e2e.conftest import DATA_DIR, gunicorn, real_xrays
from tests.realsize import jpeg_xray, png16_xray
from worker.client import Keys
from worker.settings import Settings

pytestmark = pytest.mark.integration

# Generous waits: CI shares two cores with workers and gunicorn (expect() returns as soon as met).
expect.set_options(timeout=20_000)

CHROMIUM = "/usr/bin/chromium"
# No download of Playwright's own browser: Debian's, with everything that would phone home off.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (scripts/system-deps.sh installs it)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run `bash scripts/system-deps.sh`"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page whose script errors fail the test."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


@pytest.mark.skipif(DATA_DIR is None, reason="CXR_TEST_DATA_DIR is not set (.ci/run sets it)")
def test_upload_form_shows_a_result_card_per_xray(
    page: Page, web_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Choose two real X-rays, submit: each card ends with a label, bars and the version."""
    images = real_xrays(per_class=1)
    page.goto(f"{web_url}/")
    page.set_input_files("input[type=file]", [str(p) for p in images])
    page.click("button[type=submit]")
    page.wait_for_url("**/results?**")

    cards = page.locator("section.card")
    expect(cards).to_have_count(len(images))
    for i, path in enumerate(images):
        card = cards.nth(i)
        expect(card.locator(".status.done")).to_be_visible(timeout=60_000)
        assert card.locator(".status").inner_text() in CLASSES
        expect(card.locator(".filename")).to_have_text(path.name)
        expect(card.locator(".bar-row")).to_have_count(len(CLASSES))
        expect(card.locator(".meta")).to_contain_text("Model version 1")
        expect(card.locator(".meta")).to_contain_text("from upload to result")
    page.screenshot(path=str(tmp_path / f"{request.node.name}.png"), full_page=True)


def test_real_size_xrays_chosen_in_the_browser_are_classified(
    page: Page, web_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A 2500 px JPEG (1.4 MB) and a 2500 px 16-bit PNG (7 MB) through the form (issue 7)."""
    paths = [tmp_path / "full-size.jpg", tmp_path / "full-size-16bit.png"]
    paths[0].write_bytes(jpeg_xray(2500, 2048))
    paths[1].write_bytes(png16_xray(2500, 2048))
    page.goto(f"{web_url}/")
    page.set_input_files("input[type=file]", [str(p) for p in paths])
    page.click("button[type=submit]")
    page.wait_for_url("**/results?**")
    cards = page.locator("section.card")
    expect(cards).to_have_count(2)
    for i, path in enumerate(paths):
        expect(cards.nth(i).locator(".status.done")).to_be_visible(timeout=60_000)
        expect(cards.nth(i).locator(".filename")).to_have_text(path.name)
    page.screenshot(path=str(tmp_path / f"{request.node.name}.png"), full_page=True)


def test_a_file_that_is_not_an_image_is_refused_on_the_form(browser: Browser, web_url: str) -> None:
    """The form without JavaScript (with it, the file fails on its card: test_reading_view.py)."""
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{web_url}/")
    page.set_input_files(
        "input[type=file]",
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image at all"}],
    )
    page.click("button[type=submit]")
    alert = page.locator(".errors")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("notes.png")
    expect(page.locator("section.card")).to_have_count(0)
    context.close()


def test_an_unknown_result_id_says_it_expired_or_never_existed(page: Page, web_url: str) -> None:
    page.goto(f"{web_url}/results?id={uuid.uuid4().hex}")
    expect(page.locator(".status.failed")).to_contain_text("expired or never existed")


def test_a_failed_result_shows_the_no_model_commands_as_code(
    page: Page, web_url: str, worker_settings: Settings, redis_client: redis.Redis
) -> None:
    """The worker's no-model error names commands in backticks: the card sets them as <code>."""
    from worker.client import NO_MODEL_MESSAGE

    job_id = uuid.uuid4().hex
    key = Keys(worker_settings.key_prefix).job(job_id)
    redis_client.hset(key, mapping={"status": "failed", "error": NO_MODEL_MESSAGE})
    redis_client.expire(key, 60)
    page.goto(f"{web_url}/results?id={job_id}")
    status = page.locator(".status.failed")
    expect(status).to_contain_text("No model version is active yet")
    expect(status.locator("code").first).to_have_text(
        "docker compose run --rm worker cxr init-model --base imagenet"
    )
    expect(status.locator("code").nth(1)).to_have_text("cxr init-model")
    assert "`" not in status.inner_text()


ADMIN_TOKEN = "browser-test-admin-token"


@pytest.fixture
def admin_web(redis_url: str, model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """gunicorn with the admin API on, over a registry with versions 1 and 2 (none active)."""
    settings = make_settings(redis_url, model_dir, admin_token=ADMIN_TOKEN)
    with gunicorn(settings, tmp_path) as url:
        yield url, settings


def test_admin_page_signs_in_promotes_and_records_it(
    page: Page, admin_web: tuple[str, Settings]
) -> None:
    admin_url, settings = admin_web
    # A job as the trainer leaves it in the middle of an epoch (no trainer runs here).
    r = requests.post(
        f"{admin_url}/api/v1/admin/training-jobs",
        json={"dataset": "cxr", "epochs_finetune": 12},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    progress = {"stage": "training", "phase": 2, "epoch": 4, "batch": 17, "batches": 34,
                "total_epochs": 10, "metrics": {"val_auc": 0.93}, "eta_seconds": 125}  # fmt: skip
    redis.Redis.from_url(settings.redis_url).hset(
        Keys(settings.key_prefix).training_job(r.json()["id"]),
        mapping={"status": "running", "progress": json.dumps(progress)},
    )

    page.goto(f"{admin_url}/admin")
    page.fill("#token", "a-wrong-token-of-enough-length")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-message")).to_be_visible()
    expect(page.locator("#panel")).to_be_hidden()

    page.fill("#token", ADMIN_TOKEN)
    page.fill("#actor", "dr-browser")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#panel")).to_be_visible()
    expect(page.locator("#active-version")).to_have_text("none")
    rows = page.locator("#versions tbody tr")
    expect(rows).to_have_count(2)
    v2 = rows.filter(has_text="v2")
    expect(v2).to_contain_text("0.960")  # its ROC AUC
    expect(v2).to_contain_text("argmax")  # no decision threshold
    expect(v2.locator("img")).to_be_visible()  # the curves, fetched with the token
    job = page.locator("#jobs .job")
    expect(job).to_contain_text("phase 2 · epoch 4/10 · batch 17/34 · val_auc 0.930")
    expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "35")  # 3.5/10

    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#reason", "better AUC")
    v2.get_by_role("button", name="Promote").click()
    expect(page.locator("#active-version")).to_have_text("version 2")
    audit = page.locator("#audit tbody tr").first
    for text in ("dr-browser", "promote", "2", "better AUC"):
        expect(audit).to_contain_text(text)

    # A fine-tuning job from the form, with an operating point.
    page.fill("#train-form input[name=dataset]", "cxr-pneumonia-256")
    page.fill("#train-form input[name=target_sensitivity]", "0.95")
    page.click("#train-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("Queued fine-tuning job")
    expect(page.locator("#jobs .job")).to_have_count(2)
    listed = requests.get(
        f"{admin_url}/api/v1/admin/training-jobs",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ).json()["jobs"]
    newest = max(listed, key=lambda job: job["created_at"])
    assert newest["params"]["target_sensitivity"] == 0.95
    assert newest["params"]["dataset"] == "cxr-pneumonia-256"
    assert newest["actor"] == "admin:dr-browser"


def test_results_page_names_the_decision_threshold(page: Page, web_url: str) -> None:
    """A version with a threshold: the card says why a 45% finding is the label."""
    job_id = uuid.uuid4().hex
    doc = {
        "id": job_id, "status": "done", "filename": "chest.jpeg", "elapsed_ms": 120.0,
        "result": {
            "label": "PNEUMONIA", "probabilities": {"NORMAL": 0.55, "PNEUMONIA": 0.45},
            "model_version": 3, "decision_threshold": 0.0908, "batch_size": 1,
            "timings_ms": {"queue": 1.0, "decode": 1.0, "batch_wait": 0.0, "model": 80.0,
                           "worker_total": 82.0},
        },
    }  # fmt: skip
    page.route(f"**/api/v1/predictions/{job_id}", lambda route: route.fulfill(json=doc))
    page.goto(f"{web_url}/results?id={job_id}")
    meta = page.locator(".card .meta")
    expect(meta).to_contain_text("Model version 3")
    expect(meta).to_contain_text("a finding when 1 − p(NORMAL) ≥ 0.091")
    expect(page.locator(".card .status")).to_have_text("PNEUMONIA")
