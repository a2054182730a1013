"""The registered evaluation sets: from ``CXR_EVAL_DATASETS`` and from the admin API (Redis).

TF-free. Every published version is scored on each of them (``ml.external``); this module only
says which sets there are and where they live. A path is relative to ``CXR_DATA_DIR`` (a
configured one may also be absolute); the admin API registers relative paths only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any, cast

import redis

from ml.config import check_eval_name
from worker.client import Keys, as_text
from worker.settings import MAX_EVAL_PATH_CHARS, Settings

__all__ = [
    "MAX_EVAL_DATASETS",
    "EvalDatasetError",
    "EvalDatasets",
    "check_eval_name",
    "check_eval_path",
]

MAX_EVAL_DATASETS = 50
"""Most sets the admin API keeps registered (every publish scores each one)."""


class EvalDatasetError(ValueError):
    """A registration the service refuses; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_eval_path(path: object) -> str:
    """A path the admin API may register: relative, inside CXR_DATA_DIR, bounded."""
    if not isinstance(path, str) or not path.strip() or len(path) > MAX_EVAL_PATH_CHARS:
        raise ValueError(f"path must be a string of 1 to {MAX_EVAL_PATH_CHARS} characters")
    parts = PurePosixPath(path)
    if parts.is_absolute() or ".." in parts.parts or "\\" in path or "\x00" in path:
        raise ValueError("path must be a relative path inside CXR_DATA_DIR (no '..')")
    return path


class EvalDatasets:
    """Lists, registers and removes evaluation sets."""

    def __init__(self, settings: Settings, redis_client: redis.Redis):
        self.settings = settings
        self.redis = redis_client
        self.key = Keys(settings.key_prefix).eval_datasets()

    def configured(self) -> dict[str, str]:
        """The sets of ``CXR_EVAL_DATASETS``."""
        return self.settings.configured_eval_datasets()

    def list(self) -> list[dict[str, Any]]:
        """Every set: ``{name, path, source: config|admin, ...}``, by name (config ones win)."""
        rows = {
            name: {"name": name, "path": path, "source": "config"}
            for name, path in self.configured().items()
        }
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.key))
        for k, v in raw.items():
            name = as_text(k)
            if name in rows:
                continue
            try:
                doc = json.loads(as_text(v))
            except ValueError:
                continue
            rows[name] = {"name": name, "source": "admin", **doc}
        return [rows[name] for name in sorted(rows)]

    def resolved(self) -> dict[str, Path]:
        """Every set's folder as this process sees it: ``{name: CXR_DATA_DIR / path}``."""
        return {row["name"]: self.settings.data_dir / row["path"] for row in self.list()}

    def register(self, name: str, path: str, actor: str) -> dict[str, Any]:
        """Register (or move) an admin set; raises ValueError / EvalDatasetError."""
        check_eval_name(name)
        check_eval_path(path)
        if name in self.configured():
            raise EvalDatasetError(
                "configured", f"{name!r} is set by CXR_EVAL_DATASETS; change it there"
            )
        if (
            not self.redis.hexists(self.key, name)
            and self.redis.hlen(self.key) >= MAX_EVAL_DATASETS
        ):
            raise EvalDatasetError(
                "too_many", f"at most {MAX_EVAL_DATASETS} evaluation sets; remove one first"
            )
        doc = {"path": path, "actor": actor, "registered_at": time.time()}
        self.redis.hset(self.key, name, json.dumps(doc))
        return {"name": name, "source": "admin", **doc}

    def remove(self, name: str) -> bool:
        """Forget an admin set (its stored evaluations stay with the versions); False if none."""
        if name in self.configured():
            raise EvalDatasetError(
                "configured", f"{name!r} is set by CXR_EVAL_DATASETS; remove it there"
            )
        return bool(self.redis.hdel(self.key, name))
