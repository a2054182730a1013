"""The shared active-version pointer: promote, pin, rollback, audit, fallback, announcements."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from ml.versions import read_active_file
from tests.conftest import make_settings
from worker.client import Keys
from worker.registry import ActiveVersion, PointerError
from worker.settings import Settings


@pytest.fixture
def registry(tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis) -> ActiveVersion:
    """Versions 1..4 (copies of the tiny model), version 1 active in active.json only."""
    model_dir = tmp_path / "models"
    shutil.copytree(tiny_model_dir, model_dir)
    for v in (2, 3, 4):
        shutil.copytree(model_dir / "1", model_dir / str(v))
    return ActiveVersion(redis_client, Keys(f"cxrtest-{tmp_path.name}"), model_dir)


def test_file_fallback_then_redis(registry: ActiveVersion) -> None:
    assert registry.get() == 1  # nothing in Redis yet: active.json
    registry.set(2, actor="t")
    assert registry.get() == 2
    assert read_active_file(registry.model_dir or Path()) == 2
    registry.redis.delete(registry.keys.active_version())  # Redis lost its data
    assert registry.get() == 2


def test_promote_pin_rollback_and_audit(registry: ActiveVersion) -> None:
    registry.set(2, actor="alice", reason="better AUC")
    registry.set(3, actor="bob", action="pin")
    assert registry.rollback(actor="carol").to_version == 2
    assert registry.rollback(actor="carol").to_version == 1
    with pytest.raises(PointerError, match="no previous"):
        registry.rollback(actor="carol")
    entries = registry.audit()
    assert [(e["action"], e["from_version"], e["to_version"]) for e in entries] == [
        ("rollback", 2, 1),
        ("rollback", 3, 2),
        ("pin", 2, 3),
        ("promote", 1, 2),
    ]
    assert entries[-1]["actor"] == "alice" and entries[-1]["reason"] == "better AUC"
    assert len(registry.audit(limit=2)) == 2 and len(registry.audit(limit=0)) == 1


def test_unknown_version_is_refused(registry: ActiveVersion) -> None:
    with pytest.raises(PointerError, match="does not exist"):
        registry.set(9, actor="t")
    assert registry.get() == 1 and registry.audit() == []


def test_rollback_skips_a_deleted_version(registry: ActiveVersion) -> None:
    registry.set(2, actor="t")
    registry.set(3, actor="t")
    registry.set(4, actor="t")
    shutil.rmtree((registry.model_dir or Path()) / "3")
    assert registry.rollback(actor="t").to_version == 2
    assert registry.rollback(actor="t").to_version == 1


def test_changes_are_announced(registry: ActiveVersion) -> None:
    pubsub = registry.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registry.keys.model_events())
    pubsub.get_message(timeout=1)
    registry.set(3, actor="t")
    message = pubsub.get_message(timeout=2)
    assert message is not None and json.loads(message["data"]) == {"active_version": 3}
    pubsub.close()


@pytest.mark.parametrize("token", ["short", "x" * 15])
def test_weak_admin_tokens_are_refused(redis_url: str, tmp_path: Path, token: str) -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        make_settings(redis_url, tmp_path, admin_token=token)


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_admin_token_disables_the_admin_api(token: str) -> None:
    assert Settings(admin_token=token).admin_token is None  # type: ignore[arg-type]
