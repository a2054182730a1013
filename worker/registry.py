"""The active model version: one pointer shared by every machine, with history and an audit log.

The pointer lives in Redis (``<prefix>:model:active``); ``MODEL_DIR/active.json`` mirrors it and is
the fallback when Redis has none (e.g. after Redis lost its data). Every change is appended to an
audit log and announced on a pub/sub channel, so workers swap within moments, not a poll period.
TF-free: the web process uses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from ml.versions import has_version, list_versions, read_active_file, write_active_file
from worker.client import Keys, as_text

AUDIT_LENGTH = 1000


class PointerError(ValueError):
    """A pointer change that cannot be made (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class AuditEntry:
    """One change of the active version."""

    at: float
    actor: str
    action: str  # "promote", "pin", "rollback"
    from_version: int | None
    to_version: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form."""
        return asdict(self)


class ActiveVersion:
    """Reads and changes which model version the workers serve."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, model_dir: Path | None):
        self.redis = redis_client
        self.keys = keys
        self.model_dir = model_dir

    def get(self) -> int | None:
        """The active version: Redis first, then ``active.json``; ``None`` when neither has one."""
        raw = self.redis.get(self.keys.active_version())
        if raw is not None:
            return int(as_text(raw))
        if self.model_dir is not None:
            return read_active_file(self.model_dir)
        return None

    def versions(self) -> list[int]:
        """The complete versions in the registry folder."""
        return list_versions(self.model_dir) if self.model_dir is not None else []

    def set(
        self, version: int, *, actor: str, action: str = "promote", reason: str = ""
    ) -> AuditEntry:
        """Make ``version`` active (``promote`` or ``pin``), remembering the previous one."""
        return self._change(version, actor=actor, action=action, reason=reason)

    def rollback(self, *, actor: str, reason: str = "") -> AuditEntry:
        """Make the previously active version active again (skipping versions since deleted)."""
        return self._change(None, actor=actor, action="rollback", reason=reason)

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent pointer changes, newest first."""
        rows = self.redis.lrange(self.keys.model_audit(), 0, max(1, limit) - 1)
        return [json.loads(as_text(r)) for r in rows]

    def _change(self, version: int | None, *, actor: str, action: str, reason: str) -> AuditEntry:
        """Change the pointer atomically; ``version`` None means: pop the history (rollback)."""
        if version is not None and not self._exists(version):
            raise PointerError(f"model version {version} does not exist")
        keys = self.keys
        entry: AuditEntry | None = None

        def change(pipe: redis.client.Pipeline) -> None:
            nonlocal entry
            raw = pipe.get(keys.active_version())
            old = int(as_text(raw)) if raw is not None else self._file_version()
            target, popped = version, 0
            if target is None:
                history = [int(as_text(v)) for v in pipe.lrange(keys.model_history(), 0, -1)]
                # A version deleted since it was active is skipped, not a dead end.
                while popped < len(history) and not self._exists(history[popped]):
                    popped += 1
                if popped == len(history):
                    raise PointerError("there is no previous active version to roll back to")
                target = history[popped]
                popped += 1
            entry = AuditEntry(time.time(), actor, action, old, target, reason)
            pipe.multi()
            pipe.set(keys.active_version(), target)
            if version is not None and old is not None and old != version:
                pipe.lpush(keys.model_history(), old)
            if popped:
                pipe.ltrim(keys.model_history(), popped, -1)
            pipe.lpush(keys.model_audit(), json.dumps(entry.to_dict()))
            pipe.ltrim(keys.model_audit(), 0, AUDIT_LENGTH - 1)
            pipe.publish(keys.model_events(), json.dumps({"active_version": target}))

        self.redis.transaction(change, keys.active_version(), keys.model_history())
        assert entry is not None
        if self.model_dir is not None:
            write_active_file(self.model_dir, entry.to_version)
        return entry

    def _exists(self, version: int) -> bool:
        return self.model_dir is None or has_version(self.model_dir, version)

    def _file_version(self) -> int | None:
        return read_active_file(self.model_dir) if self.model_dir is not None else None
