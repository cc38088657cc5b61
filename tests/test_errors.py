"""One error tree: everything Routines raises on purpose is a RoutinesError, data in attributes."""

from __future__ import annotations

import pytest

from routines.config import SettingsError
from routines.devhost import DevHostError
from routines.dispatcher import PoisonMessage
from routines.errors import Conflict, NotFound, PreconditionFailed, Refused, RoutinesError
from routines.schedule import ScheduleError
from routines.store import SlotTaken
from routines.store.memory import MemoryStore


@pytest.mark.parametrize(
    "error", [SettingsError, DevHostError, PoisonMessage, ScheduleError, SlotTaken, NotFound, Conflict]
)
def test_every_error_raised_on_purpose_is_a_routines_error(error: type[Exception]) -> None:
    assert issubclass(error, RoutinesError)


def test_value_errors_stay_value_errors_for_callers_that_catch_them() -> None:
    assert issubclass(ScheduleError, ValueError) and issubclass(SettingsError, ValueError)


def test_a_failed_write_plan_names_its_failing_operation_in_op() -> None:
    store = MemoryStore()
    row = {"PartitionKey": "p", "RowKey": "a"}
    store._write("runs", [("insert", row, None)], "a")
    other = {"PartitionKey": "p", "RowKey": "b"}
    with pytest.raises(Conflict) as caught:
        store._write("runs", [("insert", other, None), ("insert", row, None)], "b then a")
    assert caught.value.op == 1
    with pytest.raises(PreconditionFailed) as stale:
        store._write("runs", [("replace", row, "not-the-etag")], "a")
    assert isinstance(stale.value, Refused) and stale.value.op == 0
    assert NotFound("gone").op is None
