"""The asyncio client: ``from routines_client.aio import RoutinesClient`` (needs the ``aio`` extra)."""

from routines_client.aio._client import RoutinesClient

__all__ = ["RoutinesClient"]
