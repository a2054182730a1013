"""DICOM uploads through gunicorn, Redis and a real Celery worker (issue 10, "DICOM in").

Patient data never leaves the upload: after DICOMs carrying identifying tags went through the API
and the form (accepted and refused), none of the tags' values is in any Redis key, the results or
the web's and the worker's logs. And a real X-ray uploaded as JPEG and as a DICOM made from it
gets the same answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from ml.imaging import decode_image
from tests.conftest import WorkerProcess
from tests.dicoms import IDENTIFYING, dicom_bytes
from tests.e2e.conftest import DATA_DIR, gunicorn, real_xrays
from tests.e2e.test_stack import poll
from worker.client import Keys
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def logged_web(
    worker_settings: Settings, live_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """gunicorn in front of the session's worker, with its log folder (to search it)."""
    log_dir = tmp_path_factory.mktemp("dicom-web")
    with gunicorn(worker_settings, log_dir) as url:
        yield url, log_dir


def needles() -> list[bytes]:
    """Every identifying value, its parts and its other spellings, as bytes."""
    found: set[str] = set()
    for value in IDENTIFYING.values():
        found.add(value)
        found.update(part for part in re.split(r"[\^ ]", value) if len(part) >= 5)
        if re.fullmatch(r"\d{8}", value):
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(v.encode() for v in found)


def redis_contents(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key of the database and its value(s) (strings, hashes, lists, sets, sorted sets)."""
    contents: dict[bytes, bytes] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts: list[bytes] = []
        if kind == b"string":
            parts = [client.get(key) or b""]
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts += [field, value]
        elif kind == b"list":
            parts = client.lrange(key, 0, -1)
        elif kind == b"set":
            parts = list(client.smembers(key))
        elif kind == b"zset":
            parts = [member for member, _score in client.zrange(key, 0, -1, withscores=True)]
        contents[key] = b"\n".join([key, *parts])
    return contents


def test_no_identifying_tag_is_found_anywhere(
    logged_web: tuple[str, Path], live_worker: WorkerProcess, worker_settings: Settings
) -> None:
    url, log_dir = logged_web
    xray = np.random.default_rng(10).integers(0, 4096, (700, 560), dtype=np.uint16)
    dicom = dicom_bytes(xray, bits_stored=12, modality="CR", identifying=True)
    ct = dicom_bytes(xray, bits_stored=12, modality="CT", identifying=True)
    monochrome1 = dicom_bytes(xray, bits_stored=12, photometric="MONOCHROME1", identifying=True,
                              window=(2048.0, 4096.0), syntax="1.2.840.10008.1.2.5")  # fmt: skip

    texts: list[bytes] = []
    ids: list[str] = []
    for name, data in (("study.dcm", dicom), ("IM0001", monochrome1)):
        r = requests.post(f"{url}/api/v1/predictions", files={"file": (name, data)}, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    r = requests.post(f"{url}/api/v1/predictions", files={"file": ("ct.dcm", ct)}, timeout=30)
    assert r.status_code == 415 and r.json()["error"] == "unsupported_modality", r.text
    texts.append(r.content)
    r = requests.post(
        f"{url}/api/v1/predictions", files={"file": ("cut.dcm", dicom[:-1000])}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"] == "corrupt", r.text
    texts.append(r.content)
    form = [("files", ("form.dcm", dicom, "application/dicom"))]
    r = requests.post(f"{url}/", files=form, timeout=30, allow_redirects=False)
    assert r.status_code == 303, r.text
    page = requests.get(url + r.headers["Location"], timeout=10)
    texts.append(page.content)
    ids += re.findall(r'data-job="([0-9a-f]{32})"', page.text)
    assert len(ids) == 3

    for job_id in ids:
        doc = poll(f"{url}/api/v1/predictions/{job_id}", timeout=90)
        assert doc["status"] == "done", doc
        texts.append(json.dumps(doc).encode())
        texts.append(requests.get(f"{url}/api/v1/predictions/{job_id}", timeout=10).content)

    contents = redis_contents(redis.Redis.from_url(worker_settings.redis_url))
    keys = Keys(worker_settings.key_prefix)
    # The search does cover what the jobs stored: their hashes (with the file names) are there.
    for job_id in ids:
        assert b"filename" in contents[keys.job(job_id).encode()]
    assert any(b"study.dcm" in value for value in contents.values())
    logs = {"worker": live_worker.log().encode()}
    logs |= {p.name: p.read_bytes() for p in log_dir.glob("*.log")}
    assert len(logs) == 2 and all(logs.values())  # both processes did write their logs

    places = {f"redis {k!r}": v for k, v in contents.items()} | logs
    places |= {f"response {i}": t for i, t in enumerate(texts)}
    leaks = [(n.decode(), where) for n in needles() for where, v in places.items() if n in v]
    assert leaks == []


@pytest.mark.skipif(DATA_DIR is None, reason="CXR_TEST_DATA_DIR is not set")
def test_real_xray_as_jpeg_and_as_dicom_gets_the_same_answer(web_url: str) -> None:
    for path in real_xrays(per_class=2):
        jpeg = path.read_bytes()
        dicom = dicom_bytes(decode_image(jpeg, max_side=None), modality="CR")
        results = []
        for name, data in ((path.name, jpeg), (path.stem + ".dcm", dicom)):
            r = requests.post(
                f"{web_url}/api/v1/predictions", files={"file": (name, data)}, timeout=30
            )
            assert r.status_code == 202, r.text
            doc = poll(web_url + r.json()["status_url"], timeout=90)
            assert doc["status"] == "done", doc
            results.append(doc["result"])
        as_jpeg, as_dicom = results
        assert as_dicom["label"] == as_jpeg["label"]
        assert as_dicom["probabilities"].keys() == as_jpeg["probabilities"].keys()
        for name, p in as_jpeg["probabilities"].items():
            assert abs(as_dicom["probabilities"][name] - p) <= 1e-4
