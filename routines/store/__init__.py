"""Storage: the ``Store`` protocol and its two implementations."""

from routines.store.base import (
    Advance,
    DebounceWrite,
    Delivery,
    DueEntry,
    Page,
    Slot,
    SlotTaken,
    SlotWrite,
    Store,
    Watch,
)

__all__ = [
    "Advance",
    "DebounceWrite",
    "Delivery",
    "DueEntry",
    "Page",
    "Slot",
    "SlotTaken",
    "SlotWrite",
    "Store",
    "Watch",
]
