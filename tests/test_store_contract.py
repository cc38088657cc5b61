"""One contract suite for every ``Store`` (``routines.store.base``): ``MemoryStore`` and ``TableStore``
on Azurite pass the same tests, so unit tests on the memory store say something about production.

Each test names the documented behaviour it checks; failures of the write plans must leave nothing
half-written, so most error cases also read the state back.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from routines import limits
from routines.errors import Conflict, NotFound, PreconditionFailed, ValidationError
from routines.models import (
    ActionResult,
    Routine,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    StepProgress,
    StepStatus,
    new_routine_id,
    run_id_for,
)
from routines.store import (
    Advance,
    DebounceWrite,
    Delivery,
    DueEntry,
    SlotTaken,
    SlotWrite,
    Store,
    Watch,
    codec,
)
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore
from tests.helpers import T0, make_routine

MINUTE = timedelta(minutes=1)


# --- fixtures and builders -----------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("tables", marks=pytest.mark.azurite)])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    azurite = request.getfixturevalue("azurite")
    prefix = request.getfixturevalue("table_prefix")
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    table_store = TableStore(service, prefix)
    table_store.ensure_tables()
    yield table_store
    for name in (table_store.routines_table, table_store.runs_table):
        service.delete_table(name)


def make_run(
    routine_id: str, scheduled_for: datetime, status: RunStatus = RunStatus.succeeded, **changes: Any
) -> Run:
    run_id = run_id_for(scheduled_for, secrets.token_hex(5))
    data: dict[str, Any] = {
        "id": run_id,
        "routine_id": routine_id,
        "trigger": RunTrigger.schedule,
        "scheduled_for": scheduled_for,
        "status": status,
        "idempotency_key": f"{routine_id}:{scheduled_for.isoformat()}",
    }
    data.update(changes)
    return Run.model_validate(data)


def changed(routine: Routine, **update: Any) -> Routine:
    return routine.model_copy(update={"version": routine.version + 1, **update})


def all_routines(store: Store) -> list[Routine]:
    return store.list_routines(None, 200, None).items


def due_ids(store: Store, before: datetime = T0 + timedelta(days=365)) -> list[tuple[str, datetime]]:
    return [(e.routine_id, e.fire_at) for e in store.due_entries(before)]


def only_entry(store: Store, routine_id: str) -> DueEntry:
    entries = [e for e in store.due_entries(T0 + timedelta(days=365)) if e.routine_id == routine_id]
    assert len(entries) == 1, entries
    return entries[0]


# --- routines: create / get -----------------------------------------------------------------------


def test_create_then_get_returns_the_routine_with_an_etag(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    got, got_etag = store.get_routine(routine.id)
    assert got == routine
    assert etag and got_etag == etag


def test_get_unknown_routine_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_routine(new_routine_id())


def test_get_by_name_finds_the_routine_and_follows_renames_and_deletes(store: Store) -> None:
    routine = make_routine("by-name")
    etag = store.create_routine(routine)
    found, found_etag = store.get_routine_by_name("by-name")
    assert (found.id, found_etag) == (routine.id, etag)
    store.replace_routine(changed(routine, name="renamed-by-name"), etag, routine)
    with pytest.raises(NotFound):
        store.get_routine_by_name("by-name")
    assert store.get_routine_by_name("renamed-by-name")[0].id == routine.id
    store.delete_routine(routine.id)
    with pytest.raises(NotFound):
        store.get_routine_by_name("renamed-by-name")


def test_create_with_a_taken_name_is_conflict_and_writes_nothing(store: Store) -> None:
    first = make_routine("shared-name", fire=T0 + MINUTE)
    store.create_routine(first)
    second = make_routine("shared-name", fire=T0 + 2 * MINUTE)
    with pytest.raises(Conflict):
        store.create_routine(second)
    with pytest.raises(NotFound):
        store.get_routine(second.id)
    assert due_ids(store) == [(first.id, T0 + MINUTE)]
    assert [r.id for r in all_routines(store)] == [first.id]


def test_create_with_a_taken_id_is_conflict(store: Store) -> None:
    first = make_routine("one")
    store.create_routine(first)
    with pytest.raises(Conflict):
        store.create_routine(first.model_copy(update={"name": "two"}))
    # The failed create must not have taken the name "two".
    store.create_routine(make_routine("two"))


def test_create_without_next_fire_has_no_due_entry(store: Store) -> None:
    routine = make_routine(state=RoutineState.disabled)
    store.create_routine(routine)
    assert due_ids(store) == []


# --- routines: replace ------------------------------------------------------------------------------


def test_replace_with_current_etag_writes_and_returns_a_new_etag(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    updated = changed(routine, description="now with a description")
    new_etag = store.replace_routine(updated, etag, routine)
    assert new_etag and new_etag != etag
    got, got_etag = store.get_routine(routine.id)
    assert got == updated
    assert got_etag == new_etag


def test_replace_with_stale_etag_is_precondition_failed_and_changes_nothing(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    stale = store.create_routine(routine)
    first = changed(routine, description="first writer")
    store.replace_routine(first, stale, routine)
    loser = changed(routine, name="renamed", description="second writer", due_at=T0 + 5 * MINUTE)
    with pytest.raises(PreconditionFailed):
        store.replace_routine(loser, stale, routine)
    assert store.get_routine(routine.id)[0] == first
    assert due_ids(store) == [(routine.id, T0 + MINUTE)]
    store.create_routine(make_routine("renamed"))  # the loser did not take the name


def test_replace_of_a_deleted_routine_is_not_found(store: Store) -> None:
    routine = make_routine()
    etag = store.create_routine(routine)
    store.delete_routine(routine.id)
    with pytest.raises(NotFound):
        store.replace_routine(changed(routine, description="x"), etag, routine)


def test_rename_frees_the_old_name_and_takes_the_new_one(store: Store) -> None:
    routine = make_routine("old-name")
    etag = store.create_routine(routine)
    store.replace_routine(changed(routine, name="new-name"), etag, routine)
    assert store.get_routine(routine.id)[0].name == "new-name"
    store.create_routine(make_routine("old-name"))  # free again
    with pytest.raises(Conflict):
        store.create_routine(make_routine("new-name"))


def test_rename_to_a_taken_name_is_conflict_and_changes_nothing(store: Store) -> None:
    taken = make_routine("taken")
    store.create_routine(taken)
    routine = make_routine("mine", fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    moved = changed(routine, name="taken", next_fire_at=T0 + 9 * MINUTE, due_at=T0 + 9 * MINUTE)
    with pytest.raises(Conflict):
        store.replace_routine(moved, etag, routine)
    got, got_etag = store.get_routine(routine.id)
    assert got == routine
    assert got_etag == etag
    assert sorted(due_ids(store)) == [(routine.id, T0 + MINUTE)]
    with pytest.raises(Conflict):
        store.create_routine(make_routine("mine"))  # still held by the routine


def test_replace_that_moves_due_at_moves_the_due_entry(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    later = T0 + 30 * MINUTE
    store.replace_routine(changed(routine, next_fire_at=later, due_at=later), etag, routine)
    assert due_ids(store) == [(routine.id, later)]


def test_replace_that_clears_due_at_removes_the_due_entry(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    disabled = changed(routine, state=RoutineState.disabled, next_fire_at=None, due_at=None)
    store.replace_routine(disabled, etag, routine)
    assert due_ids(store) == []
    assert store.get_routine(routine.id)[0].state is RoutineState.disabled


def test_replace_that_sets_due_at_adds_the_due_entry(store: Store) -> None:
    routine = make_routine(state=RoutineState.disabled)
    etag = store.create_routine(routine)
    fire = T0 + 3 * MINUTE
    store.replace_routine(
        changed(routine, state=RoutineState.enabled, next_fire_at=fire, due_at=fire), etag, routine
    )
    assert due_ids(store) == [(routine.id, fire)]


def test_replace_keeping_due_at_updates_what_the_due_entry_carries(store: Store) -> None:
    fire = T0 + MINUTE
    routine = make_routine(fire=fire)
    etag = store.create_routine(routine)
    updated = changed(routine, name="renamed", catchup_window_seconds=60, schedule_version=2)
    store.replace_routine(updated, etag, routine)
    entry = only_entry(store, routine.id)
    assert (entry.name, entry.catchup_window_seconds, entry.schedule_version) == ("renamed", 60, 2)
    assert entry.fire_at == fire


# --- routines: delete -------------------------------------------------------------------------------


def test_delete_frees_the_name_and_removes_the_due_entry(store: Store) -> None:
    routine = make_routine("doomed", fire=T0 + MINUTE)
    store.create_routine(routine)
    store.delete_routine(routine.id)
    with pytest.raises(NotFound):
        store.get_routine(routine.id)
    assert due_ids(store) == []
    assert all_routines(store) == []
    store.create_routine(make_routine("doomed"))


def test_delete_unknown_routine_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.delete_routine(new_routine_id())


def test_delete_twice_is_not_found_the_second_time(store: Store) -> None:
    routine = make_routine()
    store.create_routine(routine)
    store.delete_routine(routine.id)
    with pytest.raises(NotFound):
        store.delete_routine(routine.id)


def test_delete_keeps_the_routines_runs(store: Store) -> None:
    routine = make_routine()
    store.create_routine(routine)
    run = make_run(routine.id, T0)
    store.insert_run(run)
    store.delete_routine(routine.id)
    assert store.get_run(routine.id, run.id)[0] == run
    assert [r.id for r in store.list_runs(routine.id, None, 10, None).items] == [run.id]


# --- routines: list ---------------------------------------------------------------------------------


def collect_pages(store: Store, state: str | None, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    continuation = None
    for _ in range(50):
        page = store.list_routines(state, limit, continuation)
        pages.append([r.id for r in page.items])
        continuation = page.continuation
        if continuation is None:
            return pages
    raise AssertionError("paging never ended")


def test_list_routines_pages_in_id_order_without_duplicates_or_gaps(store: Store) -> None:
    ids = []
    for i in range(5):
        routine = make_routine(f"routine-{i}")
        store.create_routine(routine)
        ids.append(routine.id)
    pages = collect_pages(store, None, 2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == sorted(ids)


def test_list_routines_last_full_page_has_no_continuation(store: Store) -> None:
    for i in range(4):
        store.create_routine(make_routine(f"routine-{i}"))
    assert [len(p) for p in collect_pages(store, None, 2)] == [2, 2]


def test_list_routines_filters_by_state_across_pages(store: Store) -> None:
    disabled = []
    for i in range(7):
        state = RoutineState.disabled if i % 2 else RoutineState.enabled
        routine = make_routine(f"routine-{i}", state=state)
        store.create_routine(routine)
        if state is RoutineState.disabled:
            disabled.append(routine.id)
    pages = collect_pages(store, "disabled", 2)
    assert [len(p) for p in pages] == [2, 1]
    assert [i for p in pages for i in p] == sorted(disabled)
    assert collect_pages(store, "completed", 2) == [[]]


def test_list_routines_on_an_empty_store_is_one_empty_page(store: Store) -> None:
    page = store.list_routines(None, 10, None)
    assert (page.items, page.continuation) == ([], None)


def test_list_routines_skips_name_due_and_lease_rows(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    store.create_routine(routine)
    store.try_lease("tick", "me", T0, T0 + MINUTE)
    assert [r.id for r in all_routines(store)] == [routine.id]


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not a token", id="garbage"),
        pytest.param("'or'1'eq'1", id="odata"),
        pytest.param(codec.encode_continuation("run_0000000000001_abc"), id="runs-token"),
        pytest.param(codec.encode_continuation("name:x"), id="other-prefix"),
        pytest.param(codec.encode_continuation("id:" + "x" * 300), id="too-long"),
        pytest.param("eyJ4IjogMX0", id="json-without-after"),
        pytest.param("W10", id="json-list"),
        pytest.param("_w", id="undecodable"),
    ],
)
def test_list_routines_rejects_a_malformed_continuation(store: Store, token: str) -> None:
    with pytest.raises(ValidationError):
        store.list_routines(None, 2, token)


# --- due index --------------------------------------------------------------------------------------


def test_due_entries_are_those_before_the_bound_oldest_first(store: Store) -> None:
    late = make_routine("late", fire=T0 + 3 * MINUTE)
    early = make_routine("early", fire=T0 + MINUTE)
    middle = make_routine("middle", fire=T0 + 2 * MINUTE)
    for routine in (late, early, middle):
        store.create_routine(routine)
    store.create_routine(make_routine("idle", state=RoutineState.disabled))
    assert due_ids(store, T0 + 2 * MINUTE) == [(early.id, T0 + MINUTE)]  # the bound is exclusive
    assert due_ids(store, T0 + 2 * MINUTE + timedelta(milliseconds=1)) == [
        (early.id, T0 + MINUTE),
        (middle.id, T0 + 2 * MINUTE),
    ]
    assert [e.routine_id for e in store.due_entries(T0 + 10 * MINUTE)] == [early.id, middle.id, late.id]
    assert store.due_entries(T0) == []


def test_due_entry_carries_what_the_tick_needs(store: Store) -> None:
    fire = T0 + MINUTE + timedelta(seconds=30)
    routine = make_routine(
        "carrier",
        fire=fire,
        trigger={"type": "schedule", "cron_expression": "*/30 * * * * *", "time_zone": "Europe/Paris"},
        schedule_version=4,
        version=7,
        catchup_window_seconds=120,
    )
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    assert entry.name == "carrier"
    assert entry.fire_at == fire
    assert entry.trigger == {
        "type": "schedule",
        "cron_expression": "*/30 * * * * *",
        "time_zone": "Europe/Paris",
    }
    assert entry.schedule_version == 4
    assert entry.catchup_window_seconds == 120
    assert entry.etag


# --- advance ----------------------------------------------------------------------------------------


def test_advance_moves_the_entry_and_the_routines_next_fire(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE)]) == [True]
    assert due_ids(store) == [(routine.id, T0 + 2 * MINUTE)]
    got = store.get_routine(routine.id)[0]
    assert (got.next_fire_at, got.due_at, got.state) == (
        T0 + 2 * MINUTE,
        T0 + 2 * MINUTE,
        RoutineState.enabled,
    )
    # The rest of the routine is untouched, and the moved entry keeps its payload.
    assert got.model_copy(update={"next_fire_at": routine.next_fire_at, "due_at": routine.due_at}) == routine
    moved = only_entry(store, routine.id)
    assert (moved.name, moved.trigger, moved.schedule_version) == (entry.name, entry.trigger, 1)


def test_advance_counts_fires_and_the_entry_carries_the_bounds(store: Store) -> None:
    end = T0 + timedelta(days=3)
    routine = make_routine(fire=T0 + MINUTE, jitter_seconds=30, end_at=end, max_fires=9, fire_count=4)
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    assert (entry.jitter_seconds, entry.end_at, entry.max_fires, entry.fire_count) == (30, end, 9, 4)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE, fired=2)]) == [True]
    assert store.get_routine(routine.id)[0].fire_count == 6
    assert only_entry(store, routine.id).fire_count == 6
    done = only_entry(store, routine.id)
    assert store.advance([Advance(done, None, completed=True, fired=3)]) == [True]
    got = store.get_routine(routine.id)[0]
    assert (got.fire_count, got.state, got.next_fire_at) == (9, RoutineState.completed, None)


def test_the_failure_streak_round_trips(store: Store) -> None:
    routine = make_routine(pause_after_failures=3, failures=["run_a", "run_b"], failures_since=T0)
    store.create_routine(routine)
    got = store.get_routine(routine.id)[0]
    assert (got.failures, got.failures_since, got.disabled_reason) == (["run_a", "run_b"], T0, None)
    assert "failures" not in got.public(), "internal"


def test_permits_are_created_once_and_replaced_on_their_etag(store: Store) -> None:
    assert store.get_limit(limits.Permits, "openai.eu-1") is None
    first = limits.Permits("openai.eu-1", 2, {"run_a": "rt_a"}, (limits.Waiter(T0, "run_b", "rt_b"),))
    etag = store.put_limit(first)
    got = store.get_limit(limits.Permits, "openai.eu-1")
    assert got == dataclasses.replace(first, etag=etag)
    with pytest.raises(Conflict):
        store.put_limit(first)  # a second creator loses
    moved = store.put_limit(dataclasses.replace(first, holders={}, etag=etag))
    with pytest.raises(PreconditionFailed):
        store.put_limit(dataclasses.replace(first, etag=etag))  # written on a stale etag
    assert store.get_limit(limits.Permits, "openai.eu-1") == limits.Permits(
        "openai.eu-1", 2, {}, first.waiters, moved
    )
    assert store.get_limit(limits.Permits, "other") is None
    assert list(store.runs_scheduled_before(T0 + timedelta(days=9999))) == [], "not a run"


def test_advance_with_a_stale_entry_is_false_and_changes_nothing(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE)]) == [True]
    before = store.get_routine(routine.id)
    assert store.advance([Advance(entry, T0 + 5 * MINUTE)]) == [False]
    assert store.get_routine(routine.id) == before
    assert due_ids(store) == [(routine.id, T0 + 2 * MINUTE)]


def test_advance_loses_to_an_edit_that_rewrote_the_entry_in_place(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    entry = only_entry(store, routine.id)
    edited = changed(routine, schedule_version=2)  # same fire time, new payload
    store.replace_routine(edited, etag, routine)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE)]) == [False]
    assert store.get_routine(routine.id)[0] == edited
    assert only_entry(store, routine.id).schedule_version == 2


def test_advance_loses_to_an_edit_that_moved_the_entry(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    etag = store.create_routine(routine)
    entry = only_entry(store, routine.id)
    moved = changed(routine, next_fire_at=T0 + 9 * MINUTE, due_at=T0 + 9 * MINUTE)
    store.replace_routine(moved, etag, routine)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE)]) == [False]
    assert store.get_routine(routine.id)[0] == moved
    assert due_ids(store) == [(routine.id, T0 + 9 * MINUTE)]


def test_advance_of_a_deleted_routine_is_false_and_recreates_nothing(store: Store) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    store.delete_routine(routine.id)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE)]) == [False]
    assert due_ids(store) == []
    with pytest.raises(NotFound):
        store.get_routine(routine.id)


def test_advance_completing_a_timer_sets_completed_and_clears_next_fire(store: Store) -> None:
    at = T0 + MINUTE
    routine = make_routine(fire=at, trigger={"type": "timer", "at": at})
    store.create_routine(routine)
    entry = only_entry(store, routine.id)
    assert store.advance([Advance(entry, None, completed=True)]) == [True]
    got = store.get_routine(routine.id)[0]
    assert got.state is RoutineState.completed
    assert got.next_fire_at is None
    assert got.due_at is None
    assert due_ids(store) == []
    assert [r.id for r in store.list_routines("completed", 10, None).items] == [routine.id]


def test_advance_to_nothing_without_completing_keeps_the_shown_next_fire(store: Store) -> None:
    """A timer whose fire is enqueued: out of the due index, still shown until it runs."""
    at = T0 + MINUTE
    routine = make_routine(fire=at, trigger={"type": "timer", "at": at})
    store.create_routine(routine)
    assert store.advance([Advance(only_entry(store, routine.id), None)]) == [True]
    got = store.get_routine(routine.id)[0]
    assert (got.state, got.next_fire_at, got.due_at) == (RoutineState.enabled, at, None)
    assert due_ids(store) == []


def test_several_advances_in_one_call_each_report_their_own_result(store: Store) -> None:
    routines = [make_routine(f"r-{i}", fire=T0 + (i + 1) * MINUTE) for i in range(4)]
    for routine in routines:
        store.create_routine(routine)
    entries = {e.routine_id: e for e in store.due_entries(T0 + timedelta(hours=1))}
    # Someone else moves r-1 first: its advance must lose alone.
    assert store.advance([Advance(entries[routines[1].id], T0 + 30 * MINUTE)]) == [True]
    advances = [Advance(entries[r.id], T0 + (i + 10) * MINUTE) for i, r in enumerate(routines)]
    assert store.advance(advances) == [True, False, True, True]
    assert sorted(due_ids(store), key=lambda p: p[1]) == [
        (routines[0].id, T0 + 10 * MINUTE),
        (routines[2].id, T0 + 12 * MINUTE),
        (routines[3].id, T0 + 13 * MINUTE),
        (routines[1].id, T0 + 30 * MINUTE),
    ]


def test_many_advances_in_one_call_are_all_applied(store: Store) -> None:
    """More advances than one table transaction holds."""
    routines = [make_routine(f"bulk-{i}", fire=T0 + MINUTE + timedelta(seconds=i)) for i in range(40)]
    for routine in routines:
        store.create_routine(routine)
    entries = store.due_entries(T0 + timedelta(hours=1))
    assert len(entries) == 40
    assert store.advance([Advance(e, e.fire_at + timedelta(hours=1)) for e in entries]) == [True] * 40
    assert all(fire >= T0 + timedelta(hours=1) for _, fire in due_ids(store))
    assert len(due_ids(store)) == 40


def test_advance_of_nothing_is_nothing(store: Store) -> None:
    assert store.advance([]) == []


# --- runs ---------------------------------------------------------------------------------------------


def test_insert_then_get_run(store: Store) -> None:
    run = make_run(new_routine_id(), T0)
    etag = store.insert_run(run)
    got, got_etag = store.get_run(run.routine_id, run.id)
    assert got == run
    assert etag and got_etag == etag


def test_insert_duplicate_run_is_conflict_and_keeps_the_first(store: Store) -> None:
    run = make_run(new_routine_id(), T0)
    store.insert_run(run)
    with pytest.raises(Conflict):
        store.insert_run(run.model_copy(update={"status": RunStatus.failed}))
    assert store.get_run(run.routine_id, run.id)[0].status is RunStatus.succeeded


def test_get_unknown_run_is_not_found(store: Store) -> None:
    routine_id = new_routine_id()
    store.insert_run(make_run(routine_id, T0))
    with pytest.raises(NotFound):
        store.get_run(routine_id, run_id_for(T0, "0000000000"))
    with pytest.raises(NotFound):
        store.get_run(new_routine_id(), run_id_for(T0, "0000000000"))


def test_run_is_found_only_under_its_own_routine(store: Store) -> None:
    run = make_run(new_routine_id(), T0)
    store.insert_run(run)
    with pytest.raises(NotFound):
        store.get_run(new_routine_id(), run.id)


def test_replace_run_with_its_etag(store: Store) -> None:
    run = make_run(new_routine_id(), T0, RunStatus.running)
    etag = store.insert_run(run)
    done = run.model_copy(update={"status": RunStatus.succeeded, "ended_at": T0 + MINUTE})
    new_etag = store.replace_run(done, etag)
    assert new_etag and new_etag != etag
    assert store.get_run(run.routine_id, run.id) == (done, new_etag)


def test_replace_run_with_a_stale_etag_is_precondition_failed(store: Store) -> None:
    run = make_run(new_routine_id(), T0, RunStatus.running)
    stale = store.insert_run(run)
    winner = run.model_copy(update={"status": RunStatus.succeeded})
    store.replace_run(winner, stale)
    with pytest.raises(PreconditionFailed):
        store.replace_run(run.model_copy(update={"status": RunStatus.failed}), stale)
    assert store.get_run(run.routine_id, run.id)[0] == winner


def test_list_runs_newest_first_with_status_filter_and_paging(store: Store) -> None:
    routine_id = new_routine_id()
    statuses = [
        RunStatus.succeeded,
        RunStatus.failed,
        RunStatus.succeeded,
        RunStatus.skipped,
        RunStatus.succeeded,
    ]
    runs = [make_run(routine_id, T0 + i * MINUTE, status) for i, status in enumerate(statuses)]
    for run in (runs[2], runs[0], runs[4], runs[1], runs[3]):
        store.insert_run(run)
    store.insert_run(make_run(new_routine_id(), T0 + 3 * MINUTE))  # another routine's run
    newest_first = [r.id for r in reversed(runs)]

    first = store.list_runs(routine_id, None, 2, None)
    second = store.list_runs(routine_id, None, 2, first.continuation)
    third = store.list_runs(routine_id, None, 2, second.continuation)
    assert [r.id for r in first.items + second.items + third.items] == newest_first
    assert (len(third.items), third.continuation) == (1, None)

    ok = store.list_runs(routine_id, RunStatus.succeeded, 2, None)
    ok_next = store.list_runs(routine_id, RunStatus.succeeded, 2, ok.continuation)
    assert [r.id for r in ok.items + ok_next.items] == [runs[4].id, runs[2].id, runs[0].id]
    assert ok_next.continuation is None
    assert [r.id for r in store.list_runs(routine_id, RunStatus.failed, 10, None).items] == [runs[1].id]
    assert store.list_runs(routine_id, RunStatus.cancelled, 10, None).items == []


def test_list_runs_leaves_out_the_slot_row(store: Store) -> None:
    routine_id = new_routine_id()
    run = make_run(routine_id, T0, RunStatus.running)
    store.insert_run(run, SlotWrite(holder=run.id))
    assert [r.id for r in store.list_runs(routine_id, None, 10, None).items] == [run.id]


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param(codec.encode_continuation("id:rt_0123456789abcdef"), id="routines-token"),
        pytest.param(codec.encode_continuation("slot"), id="slot"),
    ],
)
def test_list_runs_rejects_a_malformed_continuation(store: Store, token: str) -> None:
    with pytest.raises(ValidationError):
        store.list_runs(new_routine_id(), None, 2, token)


# --- overlap slot -------------------------------------------------------------------------------------


def test_insert_run_with_a_slot_write_takes_the_slot(store: Store) -> None:
    routine_id = new_routine_id()
    assert store.get_slot(routine_id) is None
    run = make_run(routine_id, T0, RunStatus.running)
    store.insert_run(run, SlotWrite(holder=run.id))
    slot = store.get_slot(routine_id)
    assert slot is not None
    assert (slot.holder, slot.buffered) == (run.id, None)
    assert slot.etag


def test_second_insert_with_a_slot_write_is_slot_taken_and_inserts_nothing(store: Store) -> None:
    routine_id = new_routine_id()
    holder = make_run(routine_id, T0, RunStatus.running)
    store.insert_run(holder, SlotWrite(holder=holder.id))
    before = store.get_slot(routine_id)
    late = make_run(routine_id, T0 + MINUTE, RunStatus.running)
    with pytest.raises(SlotTaken):
        store.insert_run(late, SlotWrite(holder=late.id))
    with pytest.raises(NotFound):
        store.get_run(routine_id, late.id)
    assert store.get_slot(routine_id) == before


def test_slots_of_different_routines_are_independent(store: Store) -> None:
    a, b = make_run(new_routine_id(), T0), make_run(new_routine_id(), T0)
    store.insert_run(a, SlotWrite(holder=a.id))
    store.insert_run(b, SlotWrite(holder=b.id))
    slot_b = store.get_slot(b.routine_id)
    assert slot_b is not None and slot_b.holder == b.id


def test_replace_run_can_buffer_then_release_the_slot(store: Store) -> None:
    routine_id = new_routine_id()
    holder = make_run(routine_id, T0, RunStatus.running)
    run_etag = store.insert_run(holder, SlotWrite(holder=holder.id))
    slot = store.get_slot(routine_id)
    assert slot is not None

    waiting = make_run(routine_id, T0 + MINUTE, RunStatus.queued)
    touched = holder.model_copy(update={"error_message": "one waits"})
    run_etag = store.replace_run(
        touched, run_etag, SlotWrite(holder=holder.id, buffered=waiting.id, etag=slot.etag)
    )
    buffered = store.get_slot(routine_id)
    assert buffered is not None
    assert (buffered.holder, buffered.buffered) == (holder.id, waiting.id)
    assert buffered.etag != slot.etag

    done = touched.model_copy(update={"status": RunStatus.succeeded})
    store.replace_run(done, run_etag, SlotWrite(holder=None, etag=buffered.etag))
    assert store.get_slot(routine_id) is None
    assert store.get_run(routine_id, holder.id)[0].status is RunStatus.succeeded


def test_replace_run_with_a_stale_slot_etag_is_slot_taken_and_writes_nothing(store: Store) -> None:
    routine_id = new_routine_id()
    holder = make_run(routine_id, T0, RunStatus.running)
    run_etag = store.insert_run(holder, SlotWrite(holder=holder.id))
    stale = store.get_slot(routine_id)
    assert stale is not None
    run_etag = store.replace_run(
        holder, run_etag, SlotWrite(holder=holder.id, buffered="run_x", etag=stale.etag)
    )
    current = store.get_slot(routine_id)
    with pytest.raises(SlotTaken):
        store.replace_run(
            holder.model_copy(update={"status": RunStatus.succeeded}),
            run_etag,
            SlotWrite(holder=None, etag=stale.etag),
        )
    assert store.get_slot(routine_id) == current
    assert store.get_run(routine_id, holder.id) == (holder, run_etag)


def test_release_of_a_slot_someone_deleted_is_slot_taken(store: Store) -> None:
    routine_id = new_routine_id()
    holder = make_run(routine_id, T0, RunStatus.running)
    run_etag = store.insert_run(holder, SlotWrite(holder=holder.id))
    slot = store.get_slot(routine_id)
    assert slot is not None
    run_etag = store.replace_run(holder, run_etag, SlotWrite(holder=None, etag=slot.etag))
    with pytest.raises(SlotTaken):
        store.replace_run(holder, run_etag, SlotWrite(holder=None, etag=slot.etag))


def test_replace_run_with_stale_run_etag_and_slot_write_changes_neither(store: Store) -> None:
    routine_id = new_routine_id()
    holder = make_run(routine_id, T0, RunStatus.running)
    stale = store.insert_run(holder, SlotWrite(holder=holder.id))
    slot = store.get_slot(routine_id)
    assert slot is not None
    store.replace_run(holder.model_copy(update={"attempt": 2}), stale)
    with pytest.raises(PreconditionFailed):
        store.replace_run(holder, stale, SlotWrite(holder=None, etag=slot.etag))
    assert store.get_slot(routine_id) == slot


# --- purge support ------------------------------------------------------------------------------------


def test_runs_scheduled_before_finds_old_runs_of_every_routine(store: Store) -> None:
    a, b = new_routine_id(), new_routine_id()
    old = [
        make_run(a, T0 - timedelta(days=40)),
        make_run(b, T0 - timedelta(days=31)),
        make_run(a, T0 - timedelta(days=35)),
    ]
    recent = [make_run(a, T0 - timedelta(days=29)), make_run(b, T0), make_run(b, T0 - timedelta(days=30))]
    for run in old + recent:
        store.insert_run(run)
    holder = make_run(b, T0 - timedelta(days=50), RunStatus.running)
    store.insert_run(holder, SlotWrite(holder=holder.id))  # the slot row is not a run
    found = list(store.runs_scheduled_before(T0 - timedelta(days=30)))
    assert sorted(r.id for r in found) == sorted(r.id for r in [*old, holder])
    assert {r.id: r for r in found}[holder.id] == holder


def test_runs_scheduled_before_compares_instants_within_a_second(store: Store) -> None:
    """Stored times compare as text: whole seconds and fractions must still sort as instants."""
    routine_id = new_routine_id()
    on_the_second = make_run(routine_id, T0)
    half_past = make_run(routine_id, T0 + timedelta(milliseconds=500))
    for run in (on_the_second, half_past):
        store.insert_run(run)
    assert [r.id for r in store.runs_scheduled_before(T0 + timedelta(milliseconds=300))] == [on_the_second.id]
    assert list(store.runs_scheduled_before(T0)) == []
    assert len(list(store.runs_scheduled_before(T0 + timedelta(seconds=1)))) == 2


def test_delete_runs_deletes_and_counts_only_what_was_there(store: Store) -> None:
    routine_id = new_routine_id()
    runs = [make_run(routine_id, T0 + i * MINUTE) for i in range(3)]
    other = make_run(new_routine_id(), T0)
    for run in [*runs, other]:
        store.insert_run(run)
    assert store.delete_runs(runs[:2]) == 2
    assert [r.id for r in store.list_runs(routine_id, None, 10, None).items] == [runs[2].id]
    assert store.delete_runs([runs[0], runs[2], other]) == 2
    assert store.list_runs(routine_id, None, 10, None).items == []
    assert store.list_runs(other.routine_id, None, 10, None).items == []
    assert store.delete_runs([]) == 0


def test_delete_runs_in_bulk_across_routines(store: Store) -> None:
    a, b = new_routine_id(), new_routine_id()
    runs = [make_run(a, T0 + i * MINUTE) for i in range(105)] + [
        make_run(b, T0 + i * MINUTE) for i in range(3)
    ]
    for run in runs:
        store.insert_run(run)
    assert store.delete_runs(runs) == 108
    assert list(store.runs_scheduled_before(T0 + timedelta(days=1))) == []


# --- leases -------------------------------------------------------------------------------------------


def test_try_lease_on_a_free_lease_takes_it(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + MINUTE) is True


def test_try_lease_held_by_another_and_unexpired_is_refused(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + MINUTE)
    assert store.try_lease("tick", "worker-b", T0 + timedelta(seconds=59), T0 + 2 * MINUTE) is False
    # Refused means unchanged: worker-a still holds it and may renew it.
    assert store.try_lease("tick", "worker-b", T0 + timedelta(seconds=30), T0 + 2 * MINUTE) is False
    assert store.try_lease("tick", "worker-a", T0 + timedelta(seconds=30), T0 + 2 * MINUTE) is True


def test_try_lease_that_expired_is_taken_over(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + MINUTE)
    assert store.try_lease("tick", "worker-b", T0 + 2 * MINUTE, T0 + 3 * MINUTE) is True
    assert store.try_lease("tick", "worker-a", T0 + 2 * MINUTE, T0 + 4 * MINUTE) is False


def test_try_lease_expiry_is_exact_within_a_second(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + timedelta(seconds=50))
    assert (
        store.try_lease("tick", "worker-b", T0 + timedelta(seconds=49, milliseconds=900), T0 + MINUTE)
        is False
    )
    assert (
        store.try_lease("tick", "worker-b", T0 + timedelta(seconds=50, milliseconds=500), T0 + MINUTE) is True
    )


def test_try_lease_by_its_owner_renews_it(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + MINUTE)
    assert store.try_lease("tick", "worker-a", T0 + timedelta(seconds=10), T0 + 5 * MINUTE) is True
    assert store.try_lease("tick", "worker-b", T0 + 2 * MINUTE, T0 + 3 * MINUTE) is False  # renewed to +5


def test_leases_with_different_names_are_independent(store: Store) -> None:
    assert store.try_lease("tick", "worker-a", T0, T0 + MINUTE)
    assert store.try_lease("purge", "worker-b", T0, T0 + MINUTE) is True


def test_ping_answers(store: Store) -> None:
    store.ping()


# --- model round trip through the codec ---------------------------------------------------------------


def full_routine(**changes: Any) -> Routine:
    return make_routine(
        "every-field",
        fire=T0 + 10 * MINUTE,
        description="Scan overnight logs \u2014 \u00e9\u00e8 \u65e5\u672c \U0001f600 'quotes' \"double\"",
        trigger={"type": "schedule", "cron_expression": "0 6 * * MON-FRI", "time_zone": "Europe/Paris"},
        actions=[
            {
                "type": "invocation",
                "agent_id": "asst_abc123",
                "input": {
                    "instructions": "Scan",
                    "context": {"region": "us-east-1", "n": [1, 2.5, None, True]},
                },
            },
            {
                "type": "response",
                "agent_name": "weekly-summary",
                "agent_version": "3",
                "thread_id": "conv_0123",
                "input": "Summarise",
                "max_thread_messages": 50,
            },
        ],
        retry_policy={
            "max_attempts": 6,
            "backoff": "exponential",
            "initial_delay_seconds": 30,
            "max_delay_seconds": 3600,
            "jitter": False,
            "max_age_seconds": 7200,
        },
        overlap_policy="buffer_one",
        catchup_window_seconds=120,
        timeout_seconds=900,
        created_at=T0 - timedelta(days=1, milliseconds=250),
        updated_at=T0,
        version=9,
        schedule_version=5,
        **changes,
    )


def full_run() -> Run:
    return make_run(
        new_routine_id(),
        T0,
        RunStatus.retrying,
        trigger=RunTrigger.timer,
        attempt=2,
        max_attempts=4,
        next_attempt_at=T0 + 5 * MINUTE,
        started_at=T0 + timedelta(seconds=1),
        ended_at=T0 + timedelta(seconds=65, milliseconds=5),
        actions=[
            ActionResult(
                index=0,
                id="scan",
                status=StepStatus.succeeded,
                attempt=1,
                started_at=T0 + timedelta(seconds=1),
                ended_at=T0 + timedelta(seconds=5),
                agent_run_id="run_abc",
                thread_id="thread_abc",
                output="\u2026first 4 KiB\u2026 \U0001f600",
                error_message=None,
            ),
            ActionResult(
                index=1,
                id="review",
                status=StepStatus.waiting,
                comment="looks \u2713",
                decided_at=T0 + timedelta(seconds=9),
                error_message="HTTP 503 from the agent",
            ),
        ],
        error_message="HTTP 503 from the agent",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        progress=RunProgress(
            steps={
                "step2": StepProgress(
                    lease_owner="host:42:abcd",
                    lease_until=T0 + 11 * MINUTE,
                    poll={"location": "http://agent/runs/1", "attempt": 2, "nested": {"k": [1, "x"]}},
                    poll_deadline=T0 + 20 * MINUTE,
                    attempt_started_at=T0 + timedelta(seconds=1),
                    decide_by=T0 + 30 * MINUTE,
                )
            },
            input_override={"instructions": "override"},
            routine_version=9,
            holds_slot=True,
        ),
    )


def big_routine(char: str) -> Routine:
    """10 actions with inputs of about 30 KiB each (JSON, UTF-8): far over one 64 KiB table property."""
    size = 30 * 1024 // len(char.encode())
    actions = [
        {"type": "invocation", "agent_id": f"agent-{i}", "input": {"text": char * size, "i": i}}
        for i in range(10)
    ]
    return make_routine("big", fire=T0 + MINUTE, actions=actions)


def test_routine_with_every_field_round_trips(store: Store) -> None:
    routine = full_routine()
    store.create_routine(routine)
    got = store.get_routine(routine.id)[0]
    assert got == routine
    assert got.public() == routine.public()
    assert (got.schedule_version, got.due_at) == (5, T0 + 10 * MINUTE)
    assert store.list_routines(None, 10, None).items == [routine]


def test_timer_routine_round_trips(store: Store) -> None:
    at = T0 + timedelta(days=2, seconds=7)
    routine = make_routine(
        "a-timer", fire=at, trigger={"type": "timer", "at": at}, state=RoutineState.enabled
    )
    store.create_routine(routine)
    assert store.get_routine(routine.id)[0] == routine


def test_run_with_every_field_round_trips(store: Store) -> None:
    run = full_run()
    store.insert_run(run)
    got = store.get_run(run.routine_id, run.id)[0]
    assert got == run
    assert got.progress == run.progress
    assert store.list_runs(run.routine_id, None, 10, None).items == [run]
    assert list(store.runs_scheduled_before(T0 + MINUTE)) == [run]


@pytest.mark.parametrize(
    "char", ["x", "\u00e9", "\u65e5", "\U0001f600"], ids=["ascii", "latin", "cjk", "emoji"]
)
def test_routine_over_64_kib_is_chunked_and_round_trips(store: Store, char: str) -> None:
    routine = big_routine(char)
    assert len(json.dumps(routine.public(), ensure_ascii=False).encode()) > 10 * 30 * 1024
    store.create_routine(routine)
    assert store.get_routine(routine.id)[0] == routine
    etag = store.get_routine(routine.id)[1]
    smaller = changed(routine, actions=routine.actions[:1])
    store.replace_routine(smaller, etag, routine)
    assert store.get_routine(routine.id)[0] == smaller


@pytest.mark.parametrize("char", ["x", "\U0001f600"], ids=["ascii", "emoji"])
def test_codec_chunks_fit_a_table_property(char: str) -> None:
    """Azure Tables caps a string property at 64 KiB of UTF-16."""
    routine = big_routine(char)
    row = codec.routine_row(routine)
    chunks = [v for k, v in row.items() if k.startswith("Data")]
    assert len(chunks) > 1
    assert all(len(v.encode("utf-16-le")) <= 64 * 1024 for v in chunks)
    assert codec.routine_from_row(row) == routine


def test_codec_round_trips_without_a_store() -> None:
    routine = full_routine()
    assert codec.routine_from_row(codec.routine_row(routine)) == routine
    run = full_run()
    assert codec.run_from_row(codec.run_row(run)) == run


# --- hostile ids --------------------------------------------------------------------------------------

HOSTILE_IDS = [
    pytest.param("'or'1'eq'1", id="odata-or"),
    pytest.param("rt_0f3c2a9d6b1e4c7a' or RowKey ne '", id="odata-suffix"),
    pytest.param("' or PartitionKey eq 'r", id="odata-partition"),
    pytest.param("a'b\"c", id="quotes"),
    pytest.param("a/b", id="slash"),
    pytest.param("../r", id="dot-slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("%", id="percent"),
    pytest.param("%2F%27", id="percent-encoded"),
    pytest.param("a#b?c", id="hash-question"),
    pytest.param("\u65e5\u672c\u8a9e\U0001f600", id="unicode"),
    pytest.param("a\tb\x01", id="control"),
    pytest.param("", id="empty"),
    pytest.param("x" * 2000, id="long"),
    pytest.param("run_'or'1'eq'1", id="run-prefix-odata"),
    pytest.param("run_a/b", id="run-prefix-slash"),
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_hostile_ids_are_not_found(store: Store, bad: str) -> None:
    routine = make_routine(fire=T0 + MINUTE)
    store.create_routine(routine)
    run = make_run(routine.id, T0)
    store.insert_run(run)
    with pytest.raises(NotFound):
        store.get_routine(bad)
    with pytest.raises(NotFound):
        store.delete_routine(bad)
    with pytest.raises(NotFound):
        store.get_run(bad, run.id)
    with pytest.raises(NotFound):
        store.get_run(routine.id, bad)
    with pytest.raises(NotFound):
        store.get_run(bad, bad)
    assert store.list_runs(bad, None, 10, None).items == []
    assert store.get_slot(bad) is None
    # Nothing leaked or broke.
    assert store.get_routine(routine.id)[0] == routine
    assert store.get_run(routine.id, run.id)[0] == run


# --- watches (the repair pass's index) -------------------------------------------------------------


def a_watch(routine_id: str, fire: datetime, check_at: datetime, run_id: str | None = None) -> Watch:
    return Watch(
        routine_id=routine_id,
        run_id=run_id or run_id_for(fire, secrets.token_hex(5)),
        scheduled_for=fire,
        trigger="schedule",
        version=3,
        check_at=check_at,
    )


def test_watched_returns_only_watches_due_before_the_instant(store: Store) -> None:
    early, late = a_watch("rt_a", T0, T0 + MINUTE), a_watch("rt_b", T0, T0 + 10 * MINUTE)
    store.watch([early, late])
    assert store.watched(T0 + 2 * MINUTE, 100) == [early]
    assert sorted(w.run_id for w in store.watched(T0 + 11 * MINUTE, 100)) == sorted(
        [early.run_id, late.run_id]
    )
    assert len(store.watched(T0 + 11 * MINUTE, 1)) == 1, "limit"


def test_rewatch_moves_a_watch_and_unwatch_removes_it_both_idempotent(store: Store) -> None:
    w = a_watch("rt_a", T0, T0 + MINUTE)
    store.watch([w])
    store.rewatch(w, T0 + 5 * MINUTE)
    assert store.watched(T0 + 2 * MINUTE, 100) == []
    [moved] = store.watched(T0 + 6 * MINUTE, 100)
    assert moved.check_at == T0 + 5 * MINUTE and moved.version == 3 and moved.scheduled_for == T0
    store.unwatch(w.routine_id, w.run_id)
    store.unwatch(w.routine_id, w.run_id)  # gone already: not an error
    store.rewatch(w, T0)  # a watch already gone stays gone
    assert store.watched(T0 + 60 * MINUTE, 100) == []


def test_watching_again_replaces_the_watch(store: Store) -> None:
    w = a_watch("rt_a", T0, T0 + MINUTE)
    store.watch([w])
    store.watch([Watch(**{**w.__dict__, "check_at": T0 + 3 * MINUTE})])
    [again] = store.watched(T0 + 60 * MINUTE, 100)
    assert again.check_at == T0 + 3 * MINUTE


def test_advance_and_routine_writes_carry_their_watches_atomically(store: Store) -> None:
    routine = make_routine(fire=T0)
    created = a_watch(routine.id, T0, T0 + MINUTE)
    store.create_routine(routine, [created])
    entry = only_entry(store, routine.id)
    advanced = a_watch(routine.id, T0 + MINUTE, T0 + 2 * MINUTE)
    assert store.advance([Advance(entry, T0 + 2 * MINUTE, watches=(advanced,))]) == [True]
    # A lost advance writes none of its watches.
    lost = a_watch(routine.id, T0 + 2 * MINUTE, T0 + 3 * MINUTE)
    assert store.advance([Advance(entry, T0 + 5 * MINUTE, watches=(lost,))]) == [False]
    current, etag = store.get_routine(routine.id)
    edited = a_watch(routine.id, T0 + 3 * MINUTE, T0 + 4 * MINUTE)
    store.replace_routine(changed(current, description="x"), etag, current, [edited])
    watched = {w.run_id for w in store.watched(T0 + 60 * MINUTE, 100)}
    assert watched == {created.run_id, advanced.run_id, edited.run_id}


def test_write_run_returns_the_slot_etag_that_releases_it_without_a_read(store: Store) -> None:
    run = make_run("rt_slot", T0, RunStatus.running)
    etag, slot_etag = store.write_run(run, None, SlotWrite(holder=run.id))
    assert slot_etag is not None
    done = run.model_copy(update={"status": RunStatus.succeeded})
    assert store.write_run(done, etag, SlotWrite(holder=None, etag=slot_etag))[1] is None
    assert store.get_slot("rt_slot") is None
    plain = make_run("rt_plain", T0)
    plain_etag, none = store.write_run(plain, None)
    assert none is None and store.get_run("rt_plain", plain.id)[1] == plain_etag


def test_a_row_that_no_longer_parses_is_left_out_of_lists_not_fatal(store: Store) -> None:
    good = make_routine("good")
    bad = make_routine("bad")
    store.create_routine(good)
    store.create_routine(bad)
    row = codec.routine_row(bad)
    row["Data0"] = json.dumps({**json.loads(row["Data0"]), "name": "x" * 500})  # fails validation
    store._write("routines", [("replace", row, None)], "corrupt")  # type: ignore[attr-defined]
    assert [r.name for r in store.list_routines(None, 50, None).items] == ["good"]


def test_a_version_bounded_unwatch_keeps_a_watch_written_for_a_newer_schedule(store: Store) -> None:
    w = a_watch("rt_a", T0, T0 + MINUTE)  # version 3
    store.watch([w])
    store.unwatch(w.routine_id, w.run_id, up_to_version=2)  # a stale fire of version 2: not its watch
    assert store.watched(T0 + 60 * MINUTE, 100) == [w]
    store.unwatch(w.routine_id, w.run_id, up_to_version=3)
    assert store.watched(T0 + 60 * MINUTE, 100) == []
    store.unwatch(w.routine_id, w.run_id, up_to_version=3)  # gone: not an error


# --- webhook deliveries ------------------------------------------------------------------------------


def _event_run(routine_id: str, at: datetime, body: Any = None, **changes: Any) -> Run:
    event = {"id": "msg_1", "received_at": at, "headers": {"x-event": "push"}, "body": body or {"a": "é🙂"}}
    return make_run(routine_id, at, RunStatus.queued, trigger=RunTrigger.webhook, event=event, **changes)


def _delivery(routine_id: str, run_id: str, delivery_id: str = "msg_1", at: datetime = T0) -> Delivery:
    return Delivery(routine_id, delivery_id, run_id, "ab" * 32, at)


def test_a_routine_is_found_by_its_name(store: Store) -> None:
    routine = make_routine("by-name")
    store.create_routine(routine)
    assert store.get_routine_by_name("by-name")[0] == routine
    with pytest.raises(NotFound):
        store.get_routine_by_name("nobody")


def test_record_delivery_writes_the_run_and_claims_the_delivery_id(store: Store) -> None:
    run = _event_run("rt_d1", T0)
    etag = store.record_delivery(run, None, _delivery("rt_d1", run.id))
    got, got_etag = store.get_run("rt_d1", run.id)
    assert got == run and got_etag == etag and got.event is not None and got.event.body == {"a": "é🙂"}
    assert store.get_delivery("rt_d1", "msg_1") == _delivery("rt_d1", run.id)
    assert store.get_delivery("rt_d1", "msg_2") is None
    # The same delivery again, with another run: refused whole (that run is not written).
    other = _event_run("rt_d1", T0 + MINUTE)
    with pytest.raises(Conflict):
        store.record_delivery(other, None, _delivery("rt_d1", other.id))
    with pytest.raises(NotFound):
        store.get_run("rt_d1", other.id)
    # Delivery rows and the debounce pointer are not runs.
    assert [r.id for r in store.list_runs("rt_d1", None, 50, None).items] == [run.id]


def test_record_delivery_replaces_on_the_etag_only(store: Store) -> None:
    run = _event_run("rt_d2", T0)
    etag = store.record_delivery(run, None, _delivery("rt_d2", run.id))
    folded = run.model_copy(update={"coalesced_fires": 1})
    new_etag = store.record_delivery(folded, etag, _delivery("rt_d2", run.id, "msg_2"))
    assert store.get_run("rt_d2", run.id) == (folded, new_etag)
    with pytest.raises(PreconditionFailed):
        store.record_delivery(folded, etag, _delivery("rt_d2", run.id, "msg_3"))
    assert store.get_delivery("rt_d2", "msg_3") is None  # nothing half-written


def test_the_debounce_pointer_is_created_once_and_moved_on_its_etag(store: Store) -> None:
    first, second = _event_run("rt_d3", T0), _event_run("rt_d3", T0 + MINUTE)
    assert store.get_debounce("rt_d3") is None
    store.record_delivery(first, None, _delivery("rt_d3", first.id, "m1"), DebounceWrite(first.id))
    pointer = store.get_debounce("rt_d3")
    assert pointer is not None and pointer[0] == first.id
    with pytest.raises(PreconditionFailed):  # someone opened a window meanwhile
        store.record_delivery(second, None, _delivery("rt_d3", second.id, "m2"), DebounceWrite(second.id))
    with pytest.raises(NotFound):
        store.get_run("rt_d3", second.id)
    store.record_delivery(
        second, None, _delivery("rt_d3", second.id, "m2"), DebounceWrite(second.id, pointer[1])
    )
    assert store.get_debounce("rt_d3") is not None and store.get_debounce("rt_d3")[0] == second.id  # type: ignore[index]


def test_old_deliveries_are_forgotten(store: Store) -> None:
    for n, at in enumerate((T0, T0 + MINUTE, T0 + 3 * MINUTE)):
        run = _event_run("rt_d4", at)
        store.record_delivery(run, None, _delivery("rt_d4", run.id, f"m{n}", at))
    assert store.delete_deliveries_before(T0 + 2 * MINUTE) == 2
    assert [store.get_delivery("rt_d4", f"m{n}") is not None for n in range(3)] == [False, False, True]
    assert len(store.list_runs("rt_d4", None, 50, None).items) == 3  # runs are the purge's to delete


def test_a_run_holding_the_largest_event_round_trips(store: Store) -> None:
    """256 KiB of body (the delivery limit) plus headers, in the run row with a full run."""
    body = {f"k{i:05d}": "v" * 40 + "é" for i in range(4600)}
    assert 256 * 1024 - 10_000 < len(json.dumps(body, ensure_ascii=False).encode()) <= 256 * 1024
    run = _event_run("rt_d5", T0, body)
    store.record_delivery(run, None, _delivery("rt_d5", run.id))
    assert store.get_run("rt_d5", run.id)[0] == run
