"""DICOM uploads through the API and the form (Flask's test client, a real Redis, no worker)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from PIL import Image

from ml.imaging import decode_image
from tests.dicoms import IDENTIFYING, dicom_bytes, encapsulated_dicom, pillow_frame
from tests.web.test_api import assert_refused, post_file
from tests.web.test_pages import html, post_files
from worker.client import Keys
from worker.settings import Settings

RNG = np.random.default_rng(7)
XRAY = RNG.integers(0, 4096, (300, 240), dtype=np.uint16)


@pytest.mark.parametrize("filename", ["chest.dcm", "IM000001", "scan.png", ""])
def test_dicom_is_accepted_under_any_name_and_stored_as_pixels_only(
    filename: str, client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    data = dicom_bytes(XRAY, bits_stored=12, identifying=True, window=(2000.0, 2500.0))
    response = post_file(client, data, filename or "upload")
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id = response.get_json()["id"]

    keys = Keys(settings.key_prefix)
    stored = redis_client.get(keys.upload(job_id))
    assert stored is not None and stored.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(stored), decode_image(data))
    with Image.open(io.BytesIO(stored)) as image:
        assert image.mode == "L" and image.size == (240, 300)
        assert not image.info  # no text, EXIF, ICC or other metadata chunk
    job = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.job(job_id)).items()}
    # No tag of the DICOM: only what the upload itself says (and whether to explain it).
    assert set(job) == {"status", "created_at", "filename", "bytes", "width", "height", "explain"}
    assert (job["width"], job["height"]) == ("240", "300")
    for value in IDENTIFYING.values():
        assert value.encode() not in stored
        assert all(value not in v for v in job.values())


def test_compressed_dicom_is_accepted(client: FlaskClient) -> None:
    frame = pillow_frame((XRAY >> 4).astype(np.uint8), "JPEG2000")
    data = encapsulated_dicom([frame], XRAY.shape, "1.2.840.10008.1.2.4.90")
    assert post_file(client, data, "j2k.dcm").status_code == 202


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: dicom_bytes(XRAY, bits_stored=12, modality="CT"), 415, "unsupported_modality"),
        (lambda: dicom_bytes(XRAY, bits_stored=12, modality="MR"), 415, "unsupported_modality"),
        (lambda: encapsulated_dicom([b"\0"], (8, 8), "1.2.840.10008.1.2.4.201"), 415,
         "unsupported_format"),
        (lambda: dicom_bytes(XRAY, bits_stored=12)[:5000], 400, "corrupt"),
        (lambda: dicom_bytes(XRAY, bits_stored=12, with_pixels=False), 400, "corrupt"),
        (lambda: b"\0" * 128 + b"DICM" + RNG.bytes(3000), 400, "corrupt"),
    ],
)  # fmt: skip
def test_dicom_refusals_are_4xx_with_their_code(
    make: object, status: int, code: str, client: FlaskClient, settings: Settings,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    data = make()  # type: ignore[operator]
    body = assert_refused(post_file(client, data, "x.dcm"), status, code, redis_client, settings)
    for value in IDENTIFYING.values():
        assert value not in body["message"]


def test_ct_dicom_is_refused_on_the_form_with_its_message(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    ct = dicom_bytes(XRAY, bits_stored=12, modality="CT", identifying=True)
    response = post_files(client, (ct, "head.dcm"))
    assert response.status_code == 415
    page = html(response)
    assert "<strong>head.dcm</strong>" in page
    assert "this DICOM is a CT image, not a projection X-ray" in page
    assert all(value not in page for value in IDENTIFYING.values())


def test_form_accepts_dicom_files(client: FlaskClient) -> None:
    page = html(client.get("/"))
    assert 'accept="image/png,image/jpeg,.dcm,application/dicom"' in page
    assert "PNG, JPEG or DICOM" in page
