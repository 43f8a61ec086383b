"""Settings of distributed mode: indexing, counters, redis_url."""

from __future__ import annotations

import pytest

from proxy.redis_state import BufferedRedisCounters, RedisCounterStore
from stanzaguard.errors import SettingsError
from stanzaguard.settings import load_settings
from stanzaguard.wiring import build_counter_store


def test_defaults_are_one_machine() -> None:
    settings = load_settings()
    assert settings.indexing == "process"
    assert settings.counters == "memory"
    assert build_counter_store(settings) is None


@pytest.mark.parametrize("choice", [{"indexing": "celery"}, {"counters": "redis"}])
def test_redis_url_is_required(choice: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="redis_url"):
        load_settings(None, **choice)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/0",
        "redis://host:6379/0 extra",
        "redis://\x00",
        "redis://" + "a" * 3000,
    ],
)
def test_bad_redis_urls(url: str) -> None:
    with pytest.raises(SettingsError, match="redis_url"):
        load_settings(redis_url=url, indexing="celery")


def test_redis_url_stays_secret() -> None:
    settings = load_settings(redis_url="redis://:hunter2@127.0.0.1:6379/0", counters="redis")
    assert "hunter2" not in repr(settings)
    assert build_counter_store(settings) is not None  # connects lazily


def test_counters_are_exact_or_buffered_by_settings() -> None:
    url = "redis://127.0.0.1:6379/0"
    exact = build_counter_store(load_settings(counters="redis", redis_url=url))
    assert isinstance(exact, RedisCounterStore)
    exact.close()
    settings = load_settings(counters="redis", redis_url=url, counters_flush_interval=0.05)
    buffered = build_counter_store(settings)
    assert isinstance(buffered, BufferedRedisCounters)
    buffered.close()  # nothing queued: closing touches no Redis
