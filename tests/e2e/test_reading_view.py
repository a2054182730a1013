"""The reading view in a real browser: drag-and-drop, thumbnails, live status, the X-ray with its
heatmap overlay, keyboard use, a narrow screen and the page with JavaScript off.

Headless Debian Chromium via Playwright against gunicorn and a real Celery worker (the fixtures of
test_browser.py). Screenshots go to $CXR_SCREENSHOT_DIR (default /tmp/page-shots) to be looked at.
"""

from __future__ import annotations

import base64
import io
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect

from tests.conftest import CLASSES
from tests.dicoms import dicom_bytes
from tests.e2e import test_browser
from tests.e2e.conftest import DATA_DIR, real_xrays
from tests.realsize import jpeg_xray

pytestmark = pytest.mark.integration

# The browser fixtures (headless Chromium; a page whose script errors fail the test).
browser = test_browser.browser
page = test_browser.page

SHOTS = Path(os.environ.get("CXR_SCREENSHOT_DIR", "/tmp/page-shots"))
NARROW = {"width": 390, "height": 844}
WIDE = {"width": 1280, "height": 900}
REFUSED = "Not recognised as a frontal chest X-ray — no prediction"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def drop(page: Page, files: list[tuple[str, str, bytes]], target: str = "#dropzone") -> None:
    """Drop ``(name, type, data)`` files on ``target``, as a drag from the desktop would."""
    payload = [
        {"name": n, "type": t, "b64": base64.b64encode(d).decode("ascii")} for n, t, d in files
    ]
    page.evaluate(
        """([selector, files]) => {
          const dt = new DataTransfer();
          for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, { type: f.type }));
          }
          const zone = document.querySelector(selector);
          for (const type of ["dragenter", "dragover", "drop"]) {
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent(type, init));
          }
        }""",
        [target, payload],
    )


def dx_dicom(modality: str = "DX") -> bytes:
    """A 12-bit MONOCHROME2 DICOM of a generated X-ray."""
    gray = np.asarray(Image.open(io.BytesIO(jpeg_xray(320, 256))).convert("L"), dtype=np.uint16)
    return dicom_bytes(gray * 16, bits_stored=12, modality=modality)


def png_of(data: bytes) -> bytes:
    """``data`` (any image Pillow reads) as an 8-bit grayscale PNG."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").save(out, "PNG")
    return out.getvalue()


def api_result(web_url: str, page: Page, index: int = 0) -> dict[str, Any]:
    """The API's document for the ``index``-th card on the page."""
    url = page.locator("section.card").nth(index).get_attribute("data-url")
    assert url
    doc: dict[str, Any] = requests.get(f"{web_url}{url}", timeout=10).json()
    return doc


# --- drag-and-drop through the real stack -------------------------------------------------------


def test_a_dropped_png_and_dicom_get_thumbnails_then_results(page: Page, web_url: str) -> None:
    page.set_viewport_size(WIDE)
    page.goto(f"{web_url}/")
    expect(page.locator("#dropzone")).to_be_visible()
    drop(page, [("chest.png", "image/png", png_of(jpeg_xray(320, 256))),
                ("chest.dcm", "application/dicom", dx_dicom())])  # fmt: skip

    cards = page.locator("section.card")
    expect(cards).to_have_count(2)
    png_card, dcm_card = cards.nth(0), cards.nth(1)
    expect(png_card.locator(".filename")).to_have_text("chest.png")
    expect(png_card.locator("img.thumb")).to_be_visible()
    assert png_card.locator("img.thumb").evaluate("img => img.naturalWidth") == 320
    expect(dcm_card.locator(".thumb.tile")).to_have_text("DICOM")
    for card in (png_card, dcm_card):
        expect(card.locator(".status")).to_have_text("Ready to send")
    expect(page.locator("button[type=submit]")).to_have_text("Classify 2 files")
    shot(page, "drop-staged")

    page.click("button[type=submit]")
    for card in (png_card, dcm_card):
        expect(card.locator(".status.done")).to_be_visible(timeout=60_000)
        assert card.locator(".status").inner_text() in CLASSES
        expect(card.locator(".bar-row")).to_have_count(len(CLASSES))
        expect(card.locator(".meta")).to_contain_text("Model version 1")
        expect(card.locator(".meta")).to_contain_text(
            re.compile("decision: |screening threshold: ")
        )
        expect(card.locator("a.json-link")).to_have_attribute(
            "href", card.get_attribute("data-url") or ""
        )
    # The address is now the results page of both: a reload shows them, rendered by the server.
    assert "/results?id=" in page.url
    shot(page, "drop-done")
    page.reload()
    expect(page.locator("section.card .status.done")).to_have_count(2)


def test_a_ct_dicom_is_refused_with_its_reason(page: Page, web_url: str) -> None:
    page.goto(f"{web_url}/")
    drop(page, [("slice.dcm", "application/dicom", dx_dicom("CT"))])
    card = page.locator("section.card")
    expect(card.locator(".thumb.tile")).to_have_text("DICOM")
    page.click("button[type=submit]")
    status = card.locator(".status.failed")
    expect(status).to_contain_text("Refused: this DICOM is a CT image, not a projection X-ray")
    expect(card).to_have_attribute("data-state", "failed")
    shot(page, "refused-ct-dicom")


def test_a_file_that_is_not_an_image_fails_on_its_card(page: Page, web_url: str) -> None:
    page.goto(f"{web_url}/")
    drop(page, [("notes.png", "image/png", b"not an image at all")])
    card = page.locator("section.card")
    expect(card.locator(".thumb.tile")).to_be_visible()  # the browser could not preview it
    page.click("button[type=submit]")
    expect(card.locator(".status.failed")).to_contain_text("Refused: ")
    expect(card.locator(".status.failed")).to_contain_text("not a PNG or JPEG image")


@pytest.mark.skipif(DATA_DIR is None, reason="CXR_TEST_DATA_DIR is not set (.ci/run sets it)")
def test_a_real_xray_shows_the_image_and_its_overlay(page: Page, web_url: str) -> None:
    """The X-ray the model judged (when /image.png answers) and, when the result carries an
    explanation, the Grad-CAM overlay with its toggle; else the bars alone."""
    page.set_viewport_size(WIDE)
    path = real_xrays(per_class=1)[-1]
    page.goto(f"{web_url}/")
    drop(page, [(path.name, "image/jpeg", path.read_bytes())])
    card = page.locator("section.card")
    page.click("button[type=submit]")
    expect(card.locator(".status.done")).to_be_visible(timeout=60_000)
    expect(card.locator(".bar-row")).to_have_count(len(CLASSES))

    doc = api_result(web_url, page)
    image = requests.get(f"{web_url}{doc_url(doc)}/image.png", timeout=10)
    if image.status_code == 200:
        expect(card.locator("img.xray-image")).to_be_visible()
        assert card.locator("img.xray-image").evaluate("img => img.naturalWidth") > 0
    else:
        expect(card.locator(".xray")).to_have_count(0)
    explanation = doc["result"].get("explanation")
    if explanation:
        canvas = card.locator("canvas.heatmap")
        expect(canvas).to_be_visible()
        expect(canvas).to_have_attribute("data-drawn", f"{explanation_shape(web_url, explanation)}")
        card.get_by_label("Show heatmap").uncheck()
        expect(canvas).to_be_hidden()
        card.get_by_label("Show heatmap").check()
        expect(canvas).to_be_visible()
        expect(card.locator("a.heatmap-link")).to_have_attribute("href", explanation["heatmap_url"])
    shot(page, "real-xray")


def doc_url(doc: dict[str, Any]) -> str:
    return f"/api/v1/predictions/{doc['id']}"


def explanation_shape(web_url: str, explanation: dict[str, Any]) -> str:
    data = requests.get(f"{web_url}{explanation['map_url']}", timeout=10).json()
    h, w = data["shape"]
    return f"{h}x{w}"


# --- the card against given API answers (the overlay, a refused result) ------------------------


def peak_map(h: int = 14, w: int = 14) -> dict[str, Any]:
    """A map that is 1 in the top-left quarter and 0 elsewhere."""
    values = [[1.0 if y < h // 2 and x < w // 2 else 0.0 for x in range(w)] for y in range(h)]
    return {"shape": [h, w], "values": values}


def done_doc(job_id: str, **result: Any) -> dict[str, Any]:
    base = {
        "label": "PNEUMONIA", "probabilities": {"NORMAL": 0.18, "PNEUMONIA": 0.82},
        "model_version": 4, "decision_threshold": None, "batch_size": 2, "precision": "float32",
        "timings_ms": {"queue": 2.0, "decode": 3.0, "batch_wait": 1.0, "model": 95.0,
                       "worker_total": 101.0},
        "explanation": {
            "method": "grad-cam", "layer": "block5_conv3", "class_explained": "PNEUMONIA",
            "heatmap_url": f"/api/v1/predictions/{job_id}/heatmap.png",
            "map_url": f"/api/v1/predictions/{job_id}/heatmap.json",
        },
    }  # fmt: skip
    base.update(result)
    return {"id": job_id, "status": "done", "filename": "chest.jpeg", "elapsed_ms": 140.0,
            "result": base}  # fmt: skip


def serve(page: Page, doc: dict[str, Any], xray: bytes, heatmap: dict[str, Any]) -> None:
    """Answer the card's API requests for ``doc`` from the test."""
    prefix = f"**/api/v1/predictions/{doc['id']}"
    page.route(prefix, lambda route: route.fulfill(json=doc))
    page.route(f"{prefix}/image.png", lambda r: r.fulfill(body=xray, content_type="image/png"))
    page.route(f"{prefix}/heatmap.json", lambda route: route.fulfill(json=heatmap))


@pytest.fixture
def xray_png() -> bytes:
    if DATA_DIR is not None:
        return png_of(real_xrays(per_class=1)[-1].read_bytes())
    return png_of(jpeg_xray(320, 256))


def overlay_alpha(page: Page, x: float, y: float) -> int:
    """The overlay canvas's alpha at (x, y), as fractions of its size."""
    return int(
        page.locator("canvas.heatmap").evaluate(
            """(c, [x, y]) => c.getContext("2d").getImageData(
                 Math.floor(x * c.width), Math.floor(y * c.height), 1, 1).data[3]""",
            [x, y],
        )
    )


def test_the_overlay_toggle_and_opacity(page: Page, web_url: str, xray_png: bytes) -> None:
    page.set_viewport_size(WIDE)
    doc = done_doc(uuid.uuid4().hex)
    serve(page, doc, xray_png, peak_map())
    page.goto(f"{web_url}/results?id={doc['id']}")
    card = page.locator("section.card")
    expect(card.locator(".status")).to_have_text("PNEUMONIA")
    canvas = card.locator("canvas.heatmap")
    expect(canvas).to_have_attribute("data-drawn", "14x14")
    expect(canvas).to_be_visible()
    # The map's peak (top-left quarter) is where the overlay is drawn, the rest is clear.
    assert overlay_alpha(page, 0.2, 0.2) > 200
    assert overlay_alpha(page, 0.8, 0.8) < 10
    # It covers the image exactly.
    img_box, canvas_box = card.locator("img.xray-image").bounding_box(), canvas.bounding_box()
    assert img_box and canvas_box
    for k in ("x", "y", "width", "height"):
        assert abs(img_box[k] - canvas_box[k]) < 1.5, (k, img_box, canvas_box)
    expect(card.locator(".meta")).to_contain_text("Model version 4")
    expect(card.locator(".meta")).to_contain_text("decision: the most probable class")
    expect(card.locator("figcaption")).to_contain_text("Grad-CAM (block5_conv3)")
    shot(page, "overlay-1280")

    toggle = card.get_by_label("Show heatmap")
    opacity = card.get_by_label("Opacity")
    expect(opacity).to_have_value("55")
    opacity.fill("20")
    expect(canvas).to_have_css("opacity", "0.2")
    expect(card.locator("output.opacity-value")).to_have_text("20 %")
    # Keyboard: Space on the focused toggle hides the overlay, arrows move the opacity.
    toggle.focus()
    page.keyboard.press("Space")
    expect(canvas).to_be_hidden()
    expect(opacity).to_be_disabled()
    shot(page, "overlay-hidden")
    page.keyboard.press("Space")
    expect(canvas).to_be_visible()
    opacity.focus()
    page.keyboard.press("ArrowRight")
    expect(opacity).to_have_value("25")
    expect(canvas).to_have_css("opacity", "0.25")


def test_a_refused_result_says_it_is_not_a_chest_xray(
    page: Page, web_url: str, xray_png: bytes
) -> None:
    job_id = uuid.uuid4().hex
    doc = done_doc(
        job_id,
        label=None,
        explanation=None,
        out_of_distribution={"score": 0.91, "threshold": 0.5, "reason": "looks like a hand"},
    )
    serve(page, doc, xray_png, peak_map())
    page.goto(f"{web_url}/results?id={job_id}")
    card = page.locator("section.card")
    expect(card.locator(".status.refused")).to_have_text(REFUSED)
    expect(card.locator(".reason")).to_contain_text("looks like a hand")
    expect(card.locator(".reason")).to_contain_text("score 0.910, threshold 0.500")
    expect(card.locator(".bar-row")).to_have_count(0)
    expect(card.locator("canvas.heatmap")).to_have_count(0)
    shot(page, "refused-ood")


def test_a_card_without_image_or_explanation_shows_the_bars(page: Page, web_url: str) -> None:
    """The backend of an older version: no /image.png, no explanation: the bars alone."""
    job_id = uuid.uuid4().hex
    doc = done_doc(job_id, explanation=None)
    page.route(f"**/api/v1/predictions/{job_id}", lambda route: route.fulfill(json=doc))
    page.route(f"**/api/v1/predictions/{job_id}/image.png", lambda route: route.fulfill(
        status=404, json={"error": "not_found", "message": "no image"}))  # fmt: skip
    page.goto(f"{web_url}/results?id={job_id}")
    card = page.locator("section.card")
    expect(card.locator(".bar-row")).to_have_count(2)
    expect(card.locator(".xray")).to_have_count(0)


def test_untrained_marker_is_called_for_a_done_card(page: Page, web_url: str) -> None:
    """untrained.js's window.cxrUntrained.mark(card, result) sees each done card: an answer of a
    never-trained version is marked, a trained one is not."""
    untrained, trained = uuid.uuid4().hex, uuid.uuid4().hex
    docs = {
        untrained: done_doc(untrained, explanation=None),
        trained: done_doc(trained, explanation=None),
    }
    docs[untrained]["result"]["model_trained"] = False

    def answer(doc: dict[str, Any]) -> Callable[[Route], None]:
        return lambda route: route.fulfill(json=doc)

    for job_id, doc in docs.items():
        page.route(f"**/api/v1/predictions/{job_id}", answer(doc))
    page.goto(f"{web_url}/results?id={untrained}&id={trained}")
    expect(page.locator(f'section.card[data-job="{untrained}"] .untrained-mark')).to_have_count(1)
    expect(page.locator(f'section.card[data-job="{trained}"] .status')).to_have_text("PNEUMONIA")
    expect(page.locator(f'section.card[data-job="{trained}"] .untrained-mark')).to_have_count(0)


# --- keyboard, narrow screen, no JavaScript -----------------------------------------------------


def test_the_drop_zone_is_usable_with_the_keyboard(page: Page, web_url: str) -> None:
    page.goto(f"{web_url}/")
    page.keyboard.press("Tab")  # the brand link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "dropzone"
    zone = page.locator("#dropzone")
    expect(zone).to_have_attribute("role", "button")
    expect(zone).to_have_accessible_description(
        "or press to choose files (Enter or Space) · PNG, JPEG or DICOM (.dcm), one or many"
    )
    # Enter and Space open the picker (the file input's click); the test stops the dialog itself:
    # headless Chromium opens a second chooser only now and then, whatever the page does.
    page.evaluate(
        """() => { window.pickerOpened = 0; document.getElementById("files").addEventListener(
             "click", (e) => { window.pickerOpened++; e.preventDefault(); }); }"""
    )
    page.keyboard.press("Enter")
    page.keyboard.press("Space")
    assert page.evaluate("window.pickerOpened") == 2
    assert page.evaluate("window.scrollY") == 0  # Space did not scroll the page
    png = png_of(jpeg_xray(200, 160))
    page.set_input_files(
        "#files",
        [
            {"name": f"by-{key}.png", "mimeType": "image/png", "buffer": png}
            for key in ("Enter", "Space")
        ],
    )
    cards = page.locator("section.card")
    expect(cards).to_have_count(2)
    expect(cards.nth(1).locator(".filename")).to_have_text("by-Space.png")
    # Remove the first by keyboard; then Tab reaches the explain box and Classify.
    cards.nth(0).get_by_role("button", name="Remove by-Enter.png").focus()
    page.keyboard.press("Enter")
    expect(cards).to_have_count(1)
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "explain"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.type") == "submit"
    page.keyboard.press("Enter")
    expect(cards.locator(".status.done")).to_be_visible(timeout=60_000)


def test_the_reading_view_fits_a_narrow_screen(page: Page, web_url: str, xray_png: bytes) -> None:
    page.set_viewport_size(NARROW)
    page.goto(f"{web_url}/")
    drop(page, [("phone.png", "image/png", xray_png), ("phone.dcm", "", dx_dicom())])
    expect(page.locator("section.card")).to_have_count(2)
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    shot(page, "narrow-staged")

    doc = done_doc(uuid.uuid4().hex)
    serve(page, doc, xray_png, peak_map())
    page.goto(f"{web_url}/results?id={doc['id']}")
    expect(page.locator("canvas.heatmap")).to_have_attribute("data-drawn", "14x14")
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    img = page.locator("img.xray-image").bounding_box()
    assert img and img["width"] > 0.8 * NARROW["width"] - 40
    shot(page, "narrow-overlay")


@pytest.fixture
def no_js_page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(java_script_enabled=False)
    yield context.new_page()
    context.close()


def test_without_javascript_the_form_posts_and_the_results_appear_on_reload(
    no_js_page: Page, web_url: str, tmp_path: Path
) -> None:
    page = no_js_page
    page.goto(f"{web_url}/")
    expect(page.locator("#dropzone")).to_be_hidden()
    expect(page.get_by_label("PNG, JPEG or DICOM images (one or more)")).to_be_visible()
    files = [tmp_path / "plain.png", tmp_path / "plain.dcm"]
    files[0].write_bytes(png_of(jpeg_xray(320, 256)))
    files[1].write_bytes(dx_dicom())
    page.set_input_files("input[type=file]", [str(p) for p in files])
    page.click("button[type=submit]")
    page.wait_for_url("**/results?**")
    cards = page.locator("section.card")
    expect(cards).to_have_count(2)
    # Nothing polls: the page reloads itself (a meta refresh in <noscript>) until both are done.
    expect(cards.locator(".status.done")).to_have_count(2, timeout=60_000)
    for i, path in enumerate(files):
        expect(cards.nth(i).locator(".filename")).to_have_text(path.name)
        expect(cards.nth(i).locator(".bar-row")).to_have_count(len(CLASSES))
        expect(cards.nth(i).locator(".meta")).to_contain_text("Model version 1")
        expect(cards.nth(i).locator("a.json-link")).to_be_visible()
        doc = api_result(web_url, page, i)
        if doc["result"].get("explanation"):  # the server's overlay, which has the X-ray under it
            src = cards.nth(i).locator("img.xray-image").get_attribute("src")
            assert src == doc["result"]["explanation"]["heatmap_url"]
            assert cards.nth(i).locator("img.xray-image").evaluate("i => i.naturalWidth") > 0
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    shot(page, "no-js-results")


def test_classify_with_nothing_chosen_says_so(page: Page, web_url: str) -> None:
    page.goto(f"{web_url}/")
    page.click("button[type=submit]")
    expect(page.locator("#upload-message")).to_contain_text("Choose at least one X-ray")
    assert page.evaluate("document.activeElement.id") == "dropzone"
    expect(page.locator("section.card")).to_have_count(0)


def test_the_explain_box_is_sent_with_each_upload(page: Page, web_url: str) -> None:
    # Playwright does not record multipart bodies with files: the page's fetch is watched instead.
    page.add_init_script(
        """const realFetch = window.fetch;
        window.sentForms = [];
        window.fetch = (url, init) => {
          if (init && init.body instanceof FormData) {
            window.sentForms.push([...init.body.entries()].map(
              ([k, v]) => [k, typeof v === "string" ? v : "file:" + v.name]));
          }
          return realFetch(url, init);
        };"""
    )
    page.goto(f"{web_url}/")
    page.get_by_label("Show where the model looked (Grad-CAM heatmap)").uncheck()
    drop(page, [("quiet.png", "image/png", png_of(jpeg_xray(200, 160)))])
    page.click("button[type=submit]")
    expect(page.locator("section.card .status.done")).to_be_visible(timeout=60_000)
    assert page.evaluate("window.sentForms") == [[["file", "file:quiet.png"], ["explain", "0"]]]
