"""Integration fixtures: the real Kafka broker started by `make test`, and a harness
that runs the real worker and CLI as subprocesses on topics of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from pipeline.settings import load_settings
from tests.integration.harness import Harness


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The broker's address; fails (never skips) when no broker answers."""
    settings = load_settings()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means: no broker
        pytest.fail(
            f"no Kafka broker at {settings.kafka_bootstrap} ({exc}). Integration tests need "
            "the real broker: run them with `make test`, which starts and stops it.",
            pytrace=False,
        )
    return settings.kafka_bootstrap


@pytest.fixture
def harness(bootstrap: str, tmp_path: Path) -> Iterator[Harness]:
    """A worker environment with its own topics, group, data dir and web port."""
    h = Harness(bootstrap, tmp_path)
    try:
        yield h
    finally:
        h.close()
