"""Queue triggers: a poller per function with the ``host.json`` ``extensions.queues`` semantics."""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as FuncQueueMessage
from azure.storage.queue import LinearRetry, QueueClient
from azure.storage.queue import QueueMessage as StorageQueueMessage

from routines.devhost.functions import FunctionSpec, _InFlight
from routines.devhost.settings import MIN_POLLING_INTERVAL, DevHostError, QueueOptions

log = logging.getLogger("routines.devhost")

# Like the Functions host: a received message stays invisible this long while it is processed (read at
# each receive, so setting it on this module, as bench/soak.py does, changes it).
PROCESSING_VISIBILITY_SECONDS = 600

QUEUE_NAME_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


class _UndecodableMessage(ValueError):
    pass


class QueuePoller:
    """Feeds one queue-trigger function from its storage queue, with the host.json queue semantics.

    A batch of up to ``batch_size`` messages is received (invisible for 10 minutes while processed)
    and processed concurrently; a new batch is fetched when the in-flight count drops to
    ``new_batch_threshold``. An empty queue backs the polling off exponentially from 100 ms to
    ``max_polling_interval``; a message resets it. Success deletes the message. Failure makes it
    visible again after ``visibility_timeout``, and at the ``max_dequeue_count``-th delivery moves it to
    ``<queue>-poison``. A message that cannot be decoded goes to poison at once. Storage errors are
    logged and retried with back-off; the poller never stops before ``stop`` is set.
    """

    def __init__(
        self,
        spec: FunctionSpec,
        queue_name: str,
        connection_string: str,
        options: QueueOptions,
        stop: threading.Event,
    ) -> None:
        self.spec = spec
        self.queue_name = queue_name
        self.poison_name = f"{queue_name}-poison"
        self.options = options
        self.in_flight = _InFlight()
        self._stop = stop
        client_options: dict[str, Any] = {
            # A few quick retries: the poll loop has its own back-off for longer outages.
            "retry_policy": LinearRetry(backoff=1, retry_total=2, random_jitter_range=0),
            "connection_timeout": 10,
            "read_timeout": 30,
        }
        # No encode/decode policies: decoding is ours, so an undecodable message is still seen.
        self._queue = QueueClient.from_connection_string(connection_string, queue_name, **client_options)
        self._poison = QueueClient.from_connection_string(
            connection_string, self.poison_name, **client_options
        )
        self._queue_ready = False
        self._poison_ready = False
        self.thread = threading.Thread(target=self._run, name=f"queue-{spec.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # The poll loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        idle_delay = 0.0
        failures = 0
        last_error_log = 0.0
        while not self._stop.is_set():
            if not self.in_flight.wait_at_most(self.options.new_batch_threshold, stop=self._stop):
                break
            try:
                messages = self._receive()
            except AzureError as exc:
                failures += 1
                if failures == 1 or time.monotonic() - last_error_log > 30:
                    log.warning(
                        "queue %s (function %s): storage error, retrying: %s",
                        self.queue_name,
                        self.spec.name,
                        _first_line(exc),
                    )
                    last_error_log = time.monotonic()
                self._stop.wait(min(0.5 * 2 ** min(failures - 1, 5), 10.0))
                continue
            if failures:
                log.info("queue %s: storage reachable again after %d failed polls", self.queue_name, failures)
                failures = 0
            if messages:
                idle_delay = 0.0
                for message in messages:
                    self._dispatch(message)
                continue
            idle_delay = min(max(idle_delay * 2, MIN_POLLING_INTERVAL), self.options.max_polling_interval)
            self._stop.wait(idle_delay)

    def _receive(self) -> list[StorageQueueMessage]:
        if not self._queue_ready:
            _create_queue(self._queue)
            self._queue_ready = True
        try:
            pages = self._queue.receive_messages(
                messages_per_page=self.options.batch_size,
                max_messages=self.options.batch_size,
                visibility_timeout=PROCESSING_VISIBILITY_SECONDS,
            ).by_page()
            return list(next(pages, []))
        except ResourceNotFoundError:
            self._queue_ready = False  # deleted under us (e.g. storage reset): create it again
            raise

    def _dispatch(self, message: StorageQueueMessage) -> None:
        self.in_flight.enter()
        worker = threading.Thread(
            target=self._process, args=(message,), name=f"{self.spec.name}-{message.id}", daemon=True
        )
        try:
            worker.start()
        except BaseException:
            self.in_flight.leave()
            raise

    # One message ------------------------------------------------------------------------------

    def _process(self, message: StorageQueueMessage) -> None:
        try:
            self._process_one(message)
        except Exception:  # storage calls are guarded; this is a bug guard so in_flight stays right
            log.exception("queue %s: unexpected error handling message %s", self.queue_name, message.id)
        finally:
            self.in_flight.leave()

    def _process_one(self, message: StorageQueueMessage) -> None:
        text = message.content if isinstance(message.content, str) else str(message.content or "")
        try:
            body = self._decode(text)
        except _UndecodableMessage as exc:
            log.error(
                "queue %s: message %s cannot be decoded (%s); moving it to %s",
                self.queue_name,
                message.id,
                exc,
                self.poison_name,
            )
            self._move_to_poison(message, text)
            return
        trigger_value = FuncQueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        try:
            self.spec.invoke(trigger_value)
        except Exception as exc:
            self._failed(message, text, exc)
            return
        self._storage_call("delete", lambda: self._queue.delete_message(message.id, message.pop_receipt))

    def _decode(self, text: str) -> bytes:
        if self.options.message_encoding == "none":
            return text.encode("utf-8")
        try:
            body = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise _UndecodableMessage(f"not valid base64: {exc}") from exc
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _UndecodableMessage(f"not UTF-8 after base64 decoding: {exc}") from exc
        return body

    def _failed(self, message: StorageQueueMessage, text: str, exc: Exception) -> None:
        count = message.dequeue_count or 1
        limit = self.options.max_dequeue_count
        poison = count >= limit
        log.log(
            logging.ERROR if poison else logging.WARNING,
            "function %s failed on message %s (delivery %d of %d): %s: %s; %s",
            self.spec.name,
            message.id,
            count,
            limit,
            type(exc).__name__,
            exc,
            f"moving it to {self.poison_name}"
            if poison
            else f"it comes back in {self.options.visibility_timeout:.1f} s",
            exc_info=exc,
        )
        if poison:
            self._move_to_poison(message, text)
            return
        self._storage_call(
            "release",
            lambda: self._queue.update_message(
                message.id,
                pop_receipt=message.pop_receipt,
                visibility_timeout=round(self.options.visibility_timeout),
            ),
        )

    def _move_to_poison(self, message: StorageQueueMessage, text: str) -> None:
        def send() -> None:
            if not self._poison_ready:
                _create_queue(self._poison)
                self._poison_ready = True
            self._poison.send_message(text)

        # Copy first, then delete: a crash in between leaves a duplicate, never a loss.
        if self._storage_call("move to poison", send):
            self._storage_call("delete", lambda: self._queue.delete_message(message.id, message.pop_receipt))

    def _storage_call(self, what: str, call: Callable[[], object]) -> bool:
        try:
            call()
            return True
        except AzureError as exc:
            log.warning(
                "queue %s: %s failed (the message reappears after its visibility timeout): %s",
                self.queue_name,
                what,
                _first_line(exc),
            )
            return False


def _create_queue(client: QueueClient) -> None:
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _queue_connection(spec: FunctionSpec, env: Mapping[str, str]) -> str:
    setting = str(spec.trigger.get("connection") or "AzureWebJobsStorage")
    for name in (setting, f"AzureWebJobs{setting}"):
        value = env.get(name, "").strip()
        if value:
            if "=" not in value:
                raise DevHostError(
                    f"function {spec.name}: app setting {name} must be a storage connection string"
                )
            return value
    raise DevHostError(
        f"function {spec.name}: connection {setting!r} is not set (the devhost needs a connection string "
        f"in app setting {setting}; identity-based connections are not supported locally)"
    )
