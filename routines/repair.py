"""The repair pass: every run that is not terminal is watched, and a run with nothing in flight is
resumed, so no run stays non-terminal for ever whatever happens to its messages (lost, poisoned, a
worker killed mid-dispatch).

A *watch* is written with (or before) the write that makes a fire valid (the tick's advance, the
API's routine write, a manual dispatch) and deleted when the run ends. This pass reads only the
watches that are due (``check_at`` passed), so its cost grows with the runs not yet terminal, not
with all runs or routines. For each it reads the run and lets ``decide.repair`` say what to do: send
the message the run waits for again (every handler is idempotent: a message that was only late costs
a no-op), look again later, or drop the watch of a finished run. It runs on its own timer every 15 s,
so an attempt whose worker died is taken over within its lease (45 s) and one pass: about a minute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from routines import decide, lifecycle, limits, scheduler
from routines.errors import NotFound
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import Run, RunStatus
from routines.store import Store, Watch

log = logging.getLogger(__name__)

REPAIR_LEASE = timedelta(seconds=12)  # shorter than the timer's 15 s period
BATCH = 500  # watches per pass; the rest are due on the next pass


@dataclass
class RepairReport:
    due: int = 0
    resent: int = 0
    dropped: int = 0
    skipped: bool = False
    why: list[str] = field(default_factory=list)


def fire_of(watch: Watch) -> DispatchMessage:
    """The fire message a watch stands for."""
    return DispatchMessage(
        kind="fire",
        routine_id=watch.routine_id,
        scheduled_for=watch.scheduled_for,
        dispatch_at=watch.dispatch_at,
        routine_version=watch.version,
        attempt=1,
        run_id=watch.run_id,
    )


def repair(
    store: Store, queue: DispatchQueue, now: datetime, repair_after: timedelta, owner: str = scheduler.OWNER
) -> RepairReport:
    """One pass over the due watches. Safe to run concurrently (a lease lets one pass work at a time,
    and everything it does is idempotent)."""
    report = RepairReport()
    if not store.try_lease("repair", owner, now, now + REPAIR_LEASE):
        report.skipped = True
        return report
    watches = store.watched(now, BATCH)
    report.due = len(watches)
    for watch in watches:
        try:
            run: Run | None = store.get_run(watch.routine_id, watch.run_id)[0]
        except NotFound:
            run = None
        decision = decide.repair(run, fire_of(watch), now, repair_after)
        report.why.append(f"{watch.run_id}: {decision.why}")
        for message in decision.sends:
            queue.send(message, 0)
            report.resent += 1
        if decision.sends:
            log.warning("repair: run %s of routine %s: %s", watch.run_id, watch.routine_id, decision.why)
        if decision.check_at is None:
            if run is not None and run.progress.permit:  # its worker may have died before giving it back
                limits.give_back(store, queue, run.progress.permit, run.id)
            if run is not None and run.status in (RunStatus.failed, RunStatus.succeeded):
                # Its worker may have died before counting it (``decide.CountOutcome``): counted here.
                lifecycle.record_outcome(
                    store, run.routine_id, run.id, run.status, run.ended_at or now, lambda: now
                )
            store.unwatch(watch.routine_id, watch.run_id)
            report.dropped += 1
        else:
            store.rewatch(watch, decision.check_at)
    if watches:
        log.info(
            "repair: %d due, %d messages sent again, %d finished", report.due, report.resent, report.dropped
        )
    return report
