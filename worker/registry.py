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
        return self._change(version, actor=actor, action=action, reason=reason, push_history=True)

    def rollback(self, *, actor: str, reason: str = "") -> AuditEntry:
        """Make the previously active version active again."""
        previous = self.redis.lindex(self.keys.model_history(), 0)
        if previous is None:
            raise PointerError("there is no previous active version to roll back to")
        return self._change(
            int(as_text(previous)),
            actor=actor, action="rollback", reason=reason, push_history=False,
        )  # fmt: skip

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent pointer changes, newest first."""
        rows = self.redis.lrange(self.keys.model_audit(), 0, max(0, limit - 1))
        return [json.loads(as_text(r)) for r in rows]

    def _change(
        self, version: int, *, actor: str, action: str, reason: str, push_history: bool
    ) -> AuditEntry:
        if self.model_dir is not None and not has_version(self.model_dir, version):
            raise PointerError(f"model version {version} does not exist")
        keys = self.keys
        entry: AuditEntry | None = None

        def change(pipe: redis.client.Pipeline) -> None:
            nonlocal entry
            raw = pipe.get(keys.active_version())
            old = int(as_text(raw)) if raw is not None else self._file_version()
            entry = AuditEntry(time.time(), actor, action, old, version, reason)
            pipe.multi()
            pipe.set(keys.active_version(), version)
            if push_history and old is not None and old != version:
                pipe.lpush(keys.model_history(), old)
            elif not push_history:
                pipe.lpop(keys.model_history())
            pipe.lpush(keys.model_audit(), json.dumps(entry.to_dict()))
            pipe.ltrim(keys.model_audit(), 0, AUDIT_LENGTH - 1)
            pipe.publish(keys.model_events(), json.dumps({"active_version": version}))

        self.redis.transaction(change, keys.active_version(), keys.model_history())
        if self.model_dir is not None:
            write_active_file(self.model_dir, version)
        assert entry is not None
        return entry

    def _file_version(self) -> int | None:
        return read_active_file(self.model_dir) if self.model_dir is not None else None
