"""Helpers for the web tests: image bytes made in memory, the API's error document, fake worker
heartbeats, a dead Redis, web code run in a fresh interpreter that must not import TensorFlow."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from PIL import Image
from werkzeug.test import TestResponse

from tests.conftest import free_port, make_settings, run_python, settings_env
from worker.client import Keys, WorkerInfo
from worker.settings import Settings


def encode(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    """A gray gradient of ``size`` saved as ``fmt`` (PNG, JPEG, GIF, BMP)."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).save(buffer, fmt)
    return buffer.getvalue()


def png() -> bytes:
    """A valid 64x64 grayscale PNG."""
    return encode("PNG")


def jpeg() -> bytes:
    """A valid 64x64 grayscale JPEG."""
    return encode("JPEG")


def gif() -> bytes:
    """A 64x64 GIF (a real image, in a format that is not accepted)."""
    return encode("GIF")


def bmp() -> bytes:
    """A 64x64 BMP (a real image, in a format that is not accepted)."""
    return encode("BMP")


def truncated_jpeg() -> bytes:
    """A JPEG cut off in the middle of its scan data (a 512 px one, so there is scan data)."""
    data = encode("JPEG", (512, 512))
    return data[: len(data) // 2]


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (with a correct CRC)."""
    data = bytearray(encode("PNG", (1, 1)))
    # Signature (8), then the IHDR chunk: length (4), type (4), data (13: width, height, ...), CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_error(response: TestResponse, status: int, code: str) -> dict[str, Any]:
    """Check the JSON error document and return it."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.content_type
    body: dict[str, Any] = response.get_json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def heartbeat(
    redis_client: redis.Redis,
    settings: Settings,
    state: str,
    model_version: int | None,
    name: str = "fake:1",
) -> None:
    """Write a worker heartbeat as a worker process would (it expires after a minute)."""
    info = WorkerInfo(
        name=name,
        state=state,
        model_version=model_version,
        class_names=["NORMAL", "PNEUMONIA"] if model_version else None,
        input_size=32 if model_version else None,
        error=None,
        updated_at=time.time(),
    )
    keys = Keys(settings.key_prefix)
    redis_client.set(keys.worker(name), info.to_json(), ex=60)
    redis_client.zadd(keys.workers(), {keys.worker(name): time.time() + 60})


def queue_length(redis_client: redis.Redis, settings: Settings) -> int:
    """How many task messages wait in the settings' inference queue."""
    return int(redis_client.llen(settings.inference_queue))


def stored_jobs(redis_client: redis.Redis, settings: Settings) -> list[bytes]:
    """Every job and upload key under the settings' prefix."""
    prefix = settings.key_prefix
    return [
        *redis_client.scan_iter(match=f"{prefix}:job:*"),
        *redis_client.scan_iter(match=f"{prefix}:upload:*"),
    ]


def small_app(
    redis_url: str, tmp_path: Path, max_upload_mb: float = 0.01
) -> tuple[Flask, Settings]:
    """An app (and its settings) with a tiny upload limit."""
    from web import create_app

    settings = make_settings(redis_url, tmp_path / "models", max_upload_mb=max_upload_mb)
    return create_app({"TESTING": True, "CXR_SETTINGS": settings}), settings


@pytest.fixture
def down_app(tmp_path: Path) -> Flask:
    """An app whose Redis is a port nothing listens on (building it must not need Redis)."""
    from web import create_app

    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "models")
    return create_app({"TESTING": True, "CXR_SETTINGS": settings})


# Appended to a script by assert_runs_without_tensorflow: checked after the web code ran.
NO_TENSORFLOW_CHECK = """
loaded = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
assert not loaded, f"the web process imported {loaded}"
"""


def assert_runs_without_tensorflow(script: str, settings: Settings, *args: str) -> None:
    """Run web code in a fresh interpreter on ``settings``: it must pass and never have imported
    TensorFlow or Keras (the web process must not; this interpreter has them loaded already)."""
    result = run_python(
        "import sys\n" + script + NO_TENSORFLOW_CHECK, *args, env=settings_env(settings)
    )
    assert result.returncode == 0, result.stderr
