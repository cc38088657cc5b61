"""Shared fixtures: one Azurite per test session, unique table prefixes and queue names per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from routines.azurite import Azurite


@dataclass(frozen=True)
class ExternalStorage:
    """Storage given by ``ROUTINES_TEST_STORAGE_CONNECTION`` instead of a started Azurite."""

    connection_string: str


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite | ExternalStorage]:
    """Azurite (in memory) for the whole session; tests read ``.connection_string``.

    With ``ROUTINES_TEST_STORAGE_CONNECTION`` set, that storage is used and nothing is started.
    """
    external = os.environ.get("ROUTINES_TEST_STORAGE_CONNECTION", "").strip()
    if external:
        yield ExternalStorage(external)
        return
    with Azurite() as emulator:
        yield emulator


@pytest.fixture
def table_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def storage_env(azurite: Azurite | ExternalStorage, table_prefix: str) -> dict[str, str]:
    """App settings for a test app on the session's storage, with its own tables and queue."""
    return {
        "AzureWebJobsStorage": azurite.connection_string,
        "ROUTINES_TABLE_PREFIX": table_prefix,
        "ROUTINES_QUEUE_NAME": "q" + uuid.uuid4().hex[:16],
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test that needs storage (directly or through another fixture) gets the azurite marker.
    for item in items:
        if "azurite" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.azurite)
