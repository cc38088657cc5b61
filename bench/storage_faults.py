"""Storage faults at the SDK transport, for the soak's worker processes (never imported by the app).

``install(seed)`` swaps the azure-core transport of every storage client ``routines.runtime`` builds
for one that fails requests (the storage SDKs take no extra pipeline policies). Each
request, independently: 1% are refused before they are sent (``ServiceRequestError``: never applied),
1% are sent and their answer is lost (``ServiceResponseError``: applied, but the caller cannot know),
and for 3 s of every 40 s every request is refused (an outage longer than one SDK retry cycle). The
counts go to the log every 20 s, so the soak can report them. Faults stop once the file named by
``SOAK_FAULTS_OFF_FILE`` exists (the soak's calm phase).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from typing import Any

from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport

log = logging.getLogger("soak.faults")
REFUSED, LOST = 0.01, 0.01
BURST_EVERY, BURST_SECONDS = 40.0, 3.0


class Faults:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.reported = time.monotonic()

    def _count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if time.monotonic() - self.reported > 20:
                self.reported = time.monotonic()
                log.warning("storage faults injected so far: %s", dict(self.counts))

    def send(self, send: Any, request: Any, **kwargs: Any) -> Any:
        off = os.environ.get("SOAK_FAULTS_OFF_FILE")
        if off and os.path.exists(off):  # the calm phase
            return send(request, **kwargs)
        with self.lock:
            draw = self.rng.random()
        if time.time() % BURST_EVERY < BURST_SECONDS:
            self._count("burst")
            raise ServiceRequestError("injected: storage unreachable (burst)")
        if draw < REFUSED:
            self._count("refused")
            raise ServiceRequestError("injected: connection refused")
        response = send(request, **kwargs)
        if draw > 1 - LOST:
            self._count("answer lost")
            raise ServiceResponseError("injected: the answer was lost")
        return response


def install(seed: int) -> None:
    from routines import runtime

    faults = Faults(seed)

    class FaultyTransport(RequestsTransport):
        def send(self, request: Any, **kwargs: Any) -> Any:
            return faults.send(super().send, request, **kwargs)

    runtime.RequestsTransport = FaultyTransport  # type: ignore[misc]  # what storage_clients builds
