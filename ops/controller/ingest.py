"""MQTT ingest: every device's status, health and reported state, written to the registry in
batches.

::

    broker --paho network thread--> parse at the edge --queue--> "registry-writer" thread
           (<root>/+/status,             (pydantic models;         (up to batch_max_messages
            <root>/+/health,              bad payloads counted,     or batch_max_ms per
            <root>/+/reported)            logged, dropped)          transaction)

Payloads are parsed once, in :func:`parse_message`, into the protocol models
(``agent/protocol.py``); the writer receives typed :class:`~.registry.Received` items only.
A payload that does not parse, or that names another device than its topic, is counted
(``malformed``) and logged, never raised. An empty payload is a cleared retained message:
ignored.

Threads:

- paho's network thread (``loop_start``, stopped by :meth:`Ingest.stop`) runs the callbacks:
  it parses and puts on the queue (waiting at most ``queue_put_timeout_s`` when the queue is
  full, then dropping and counting), and resubscribes after every reconnection (paho
  reconnects by itself).
- ``registry-writer`` (:class:`RegistryWriter`, started and stopped by its owner) takes
  batches off the queue and commits each in one transaction. A database that is unreachable
  or locked (``OperationalError``) is retried with backoff, the batch kept (on stop, for
  half of ``stop_timeout_s``); a device another controller inserted first
  (``IntegrityError``) is retried once; any other database error drops the batch, counted.
  An unexpected exception ends the thread: it is logged with its traceback and shown in
  :attr:`IngestStats.writer_problem` for the owner (``controller run``'s supervisor) to
  report and restart.
- Counters live in one lock-guarded :class:`_Counters`; :meth:`RegistryWriter.stats`
  hands out frozen snapshots, and :meth:`RegistryWriter.wait_for` lets a caller wait on them.

Shared subscriptions (``shared_group``): several controllers split the health traffic
(``$share/<group>/<root>/+/health``). Status and reported state stay plain subscriptions on
every instance: a broker sends no retained messages to a shared subscription, and those two
are retained state (writing them twice is harmless; the registry orders by the messages'
own times).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import (
    TOPIC_LEVEL_PATTERN,
    HealthMessage,
    ReportedState,
    StatusMessage,
    describe_errors,
)
from edgefleet.ops.connection import connect_client, prepare_client
from edgefleet.ops.errors import BrokerError, ContractBroken
from edgefleet.ops.profile import ResolvedProfile

from . import registry
from .db import Database
from .registry import Fact, Received

log = logging.getLogger(__name__)

Kind = Literal["status", "health", "reported"]
MESSAGE_TYPES: dict[str, type[StatusMessage] | type[HealthMessage] | type[ReportedState]] = {
    "status": StatusMessage,
    "health": HealthMessage,
    "reported": ReportedState,
}
"""The model of each topic's last level."""
_SHARE_PREFIX = "$share"
_WARNED_TOPICS_MAX = 10_000


class IngestSettings(BaseModel):
    """How the controller reads the fleet's messages and writes them to the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_max_messages: int = Field(
        500, ge=1, le=100_000, description="Most messages written in one transaction."
    )
    batch_max_ms: float = Field(
        100.0,
        gt=0,
        le=60_000,
        description="Longest a message waits for its batch to fill before it is written.",
    )
    queue_max_messages: int = Field(
        50_000, ge=1, description="Messages parsed and waiting for the writer, at most."
    )
    queue_put_timeout_s: float = Field(
        1.0,
        ge=0,
        description="How long the network thread waits for room in a full queue before "
        "dropping a message (holding it back holds back the broker's acknowledgements).",
    )
    poll_s: float = Field(
        0.2, gt=0, le=10, description="How often the idle writer looks at its stop event."
    )
    retry_backoff_s: float = Field(
        0.5, gt=0, description="First wait before writing a batch again after a database error."
    )
    retry_backoff_max_s: float = Field(10.0, gt=0, description="Longest wait between retries.")
    stop_timeout_s: float = Field(
        10.0, gt=0, description="Longest stop() waits for the writer to write what is queued."
    )
    shared_group: str | None = Field(
        None,
        pattern=TOPIC_LEVEL_PATTERN,
        description="MQTT 5 shared subscription group for health messages "
        "($share/<group>/<root>/+/health), so several controllers split them; status and "
        "reported (retained) stay plain subscriptions.",
    )
    client_id: str | None = Field(
        None,
        max_length=64,
        description="MQTT client id; default edgefleet-controller-<random>.",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="How long start() waits for the broker's CONNACK."
    )


def subscriptions(topic_root: str, shared_group: str | None = None) -> list[str]:
    """The topic filters ingest subscribes to."""
    health = f"{topic_root}/+/health"
    if shared_group is not None:
        health = f"{_SHARE_PREFIX}/{shared_group}/{health}"
    return [f"{topic_root}/+/status", health, f"{topic_root}/+/reported"]


def parse_message(topic_root: str, topic: str, payload: bytes) -> Fact | None:
    """The protocol message on ``topic``, or None for a cleared retained message.

    Raises :class:`~edgefleet.ops.errors.ContractBroken` for a topic not under
    ``topic_root``, a payload that does not parse, or one that names another device than
    its topic.
    """
    prefix = f"{topic_root}/"
    device, _, kind = topic.removeprefix(prefix).partition("/")
    model = MESSAGE_TYPES.get(kind)
    if not topic.startswith(prefix) or model is None or not device:
        raise ContractBroken(f"{topic}: not a device's status, health or reported topic")
    if not payload:
        return None
    try:
        message = model.model_validate_json(payload)
    except ValidationError as exc:
        raise ContractBroken(
            f"{topic}: not a {model.__name__} ({describe_errors(exc)})",
            hint="check the device's agent version: this controller reads schema version 1",
        ) from exc
    if message.device_id != device:
        raise ContractBroken(
            f"{topic}: the payload names device {message.device_id!r}",
            hint="two devices may share a configuration; give each its own device_id",
        )
    return message


@dataclass(frozen=True)
class IngestStats:
    """What ingest has done since it started (a snapshot)."""

    received: int = 0  # messages offered, parsed or not
    malformed: int = 0  # did not parse, or named another device
    cleared: int = 0  # empty retained payloads
    queue_full: int = 0  # dropped for want of room in the queue
    written: int = 0  # parsed messages committed (applied or not)
    applied: int = 0  # of those, newer than what the registry held
    batches: int = 0  # transactions committed
    retries: int = 0  # batches written again after a database error
    dropped: int = 0  # messages of batches that failed for good
    connected: bool = False
    subscribed: int = 0  # SUBACKs granting every subscription: 1, then one per reconnection
    last_malformed: str | None = None
    writer_problem: str | None = None  # the exception that ended the writer thread

    @property
    def settled(self) -> int:
        """Messages offered that are done with: written, malformed, cleared or dropped."""
        return self.written + self.malformed + self.cleared + self.queue_full + self.dropped


@dataclass
class _Counters:
    lock: threading.Condition = field(default_factory=threading.Condition)
    stats: IngestStats = field(default_factory=IngestStats)

    def count(self, **increments: int) -> None:
        with self.lock:
            values = {name: getattr(self.stats, name) + n for name, n in increments.items()}
            self.stats = replace(self.stats, **values)
            self.lock.notify_all()

    def set(self, **values: bool | str | None) -> None:
        with self.lock:
            self.stats = replace(self.stats, **values)  # type: ignore[arg-type]
            self.lock.notify_all()


class RegistryWriter:
    """The queue of parsed messages and the ``registry-writer`` thread that commits them."""

    def __init__(self, database: Database, topic_root: str, settings: IngestSettings) -> None:
        self._database = database
        self._topic_root = topic_root
        self._settings = settings
        self._queue: queue.Queue[Received] = queue.Queue(settings.queue_max_messages)
        self._stop = threading.Event()
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()  # topics warned about; offer's thread only
        self._full = False  # the last offer found the queue full; offer's thread only

    # -- the thread that offers (paho's network thread)

    def offer(self, topic: str, payload: bytes, *, received_at: float | None = None) -> bool:
        """Parse one message and queue it for writing; False when it was not queued."""
        self._counters.count(received=1)
        try:
            message = parse_message(self._topic_root, topic, payload)
        except ContractBroken as exc:
            self._log_malformed(topic, exc)
            self._counters.count(malformed=1)
            self._counters.set(last_malformed=str(exc))
            return False
        if message is None:
            self._counters.count(cleared=1)
            return False
        item = Received(message, time.time() if received_at is None else received_at)
        try:
            self._queue.put(item, timeout=self._settings.queue_put_timeout_s)
        except queue.Full:
            if not self._full:  # once per spell of a full queue, not per message
                log.warning("registry queue full: messages dropped until it drains")
            self._full = True
            self._counters.count(queue_full=1)
            return False
        self._full = False
        return True

    def _log_malformed(self, topic: str, exc: ContractBroken) -> None:
        # Once per topic at WARNING: a device that keeps sending garbage must not flood the
        # log (the counter and last_malformed keep counting).
        if topic in self._warned:
            log.debug("malformed message ignored: %s", exc)
            return
        if len(self._warned) < _WARNED_TOPICS_MAX:
            self._warned.add(topic)
        log.warning("malformed message ignored (further ones on this topic at DEBUG): %s", exc)

    # -- any thread

    def stats(self) -> IngestStats:
        """A snapshot of the counters."""
        with self._counters.lock:
            return self._counters.stats

    def wait_for(self, ready: Callable[[IngestStats], bool], timeout_s: float) -> IngestStats:
        """Wait until ``ready(stats)`` holds (or ``timeout_s`` passed); the last snapshot."""
        with self._counters.lock:
            self._counters.lock.wait_for(lambda: ready(self._counters.stats), timeout_s)
            return self._counters.stats

    def count_subscribed(self) -> None:
        """Record that the broker granted every subscription (at start, on each reconnection)."""
        self._counters.count(subscribed=1)

    def set_connected(self, connected: bool) -> None:
        """Record whether the broker connection is up (shown in the stats)."""
        self._counters.set(connected=connected)

    # -- the owner's thread

    def start(self) -> None:
        """Start the writer thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="registry-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued (within ``stop_timeout_s``), then end the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._settings.stop_timeout_s)
            if self._thread.is_alive():
                log.error(
                    "registry writer did not finish within %.1f s: %d messages unwritten",
                    self._settings.stop_timeout_s,
                    self._queue.qsize(),
                )
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- the registry-writer thread

    def _run(self) -> None:
        try:
            while not (self._stop.is_set() and self._queue.empty()):
                batch = self._next_batch()
                if batch:
                    self._write(batch)
        except Exception as exc:  # the owner sees it in the stats and restarts the writer
            log.exception("registry writer stopped by an unexpected error")
            self._counters.set(writer_problem=f"{type(exc).__name__}: {exc}")

    def _next_batch(self) -> list[Received]:
        s = self._settings
        try:
            batch = [self._queue.get(timeout=s.poll_s)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + s.batch_max_ms / 1000
        while len(batch) < s.batch_max_messages:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or self._stop.is_set():
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[Received]) -> None:
        s = self._settings
        backoff, give_up_at, conflicts = s.retry_backoff_s, None, 0
        while True:
            try:
                with self._database.session() as session:
                    applied = registry.record(session, batch)
            except IntegrityError as exc:
                # Another controller (a shared subscription) added one of these devices
                # first; written again, the batch updates it instead.
                conflicts += 1
                if conflicts > 1:
                    self._drop(batch, exc)
                    return
                self._counters.count(retries=1)
                continue
            except OperationalError as exc:  # unreachable, locked: the batch is kept
                if self._stop.is_set() and give_up_at is None:
                    give_up_at = time.monotonic() + s.stop_timeout_s / 2
                if give_up_at is not None and time.monotonic() > give_up_at:
                    self._drop(batch, exc)
                    return
                log.warning("registry write failed, retrying in %.1f s: %s", backoff, exc.orig)
                self._counters.count(retries=1)
                if self._stop.wait(backoff):  # stopping: still try until give_up_at
                    time.sleep(s.retry_backoff_s)
                backoff = min(backoff * 2, s.retry_backoff_max_s)
                continue
            except SQLAlchemyError as exc:
                self._drop(batch, exc)
                return
            self._counters.count(written=len(batch), applied=applied, batches=1)
            return

    def _drop(self, batch: list[Received], exc: SQLAlchemyError) -> None:
        log.error("registry write failed: %d messages dropped: %s", len(batch), exc)
        self._counters.count(dropped=len(batch))


class Ingest:
    """The MQTT subscriber and its registry writer: ``start()`` / ``stop()``, or ``with``."""

    def __init__(
        self, database: Database, resolved: ResolvedProfile, settings: IngestSettings | None = None
    ) -> None:
        self.settings = settings or IngestSettings()
        self.topic_root = resolved.profile.topic_root
        self.writer = RegistryWriter(database, self.topic_root, self.settings)
        self._resolved = resolved
        self._filters = subscriptions(self.topic_root, self.settings.shared_group)
        self._connack = threading.Event()
        self._connack_code: ReasonCode | None = None
        self._subscribed = threading.Event()
        self._suback_codes: list[ReasonCode] = []
        client_id = self.settings.client_id or f"edgefleet-controller-{uuid.uuid4().hex[:12]}"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        prepare_client(self._client, resolved)

    def start(self) -> None:
        """Start the writer, connect, subscribe (:class:`BrokerError` when the broker refuses)."""
        self.writer.start()
        try:
            connect_client(self._client, self._resolved)
            self._client.loop_start()
            self._wait_for_connack()
            self._wait_for_suback()
        except BaseException:
            close_client(self._client)
            self.writer.stop()
            raise

    def stop(self) -> None:
        """Disconnect, stop paho's thread, then let the writer write what is queued."""
        self._client.disconnect()
        close_client(self._client)
        self.writer.stop()

    def stats(self) -> IngestStats:
        """The writer's counters."""
        return self.writer.stats()

    def __enter__(self) -> Ingest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_for_connack(self) -> None:
        p = self._resolved.profile
        if not self._connack.wait(self.settings.connect_timeout_s):
            raise BrokerError(
                f"no CONNACK from the broker at {p.address} within "
                f"{self.settings.connect_timeout_s:g} s",
                hint="check the broker's load and the network",
            )
        code = self._connack_code
        if code is not None and code.is_failure:
            raise BrokerError(
                f"the broker at {p.address} refused the controller's connection: {code}",
                hint="check that this identity may connect and read the devices' topics "
                "(the broker ACL)",
            )

    def _wait_for_suback(self) -> None:
        p = self._resolved.profile
        if not self._subscribed.wait(self.settings.connect_timeout_s):
            raise BrokerError(
                f"no SUBACK from the broker at {p.address} within "
                f"{self.settings.connect_timeout_s:g} s",
                hint="check the broker's load and the network",
            )
        refused = [
            f for f, c in zip(self._filters, self._suback_codes, strict=False) if c.is_failure
        ]
        if refused:
            raise BrokerError(
                f"the broker at {p.address} refused the subscriptions {', '.join(refused)}",
                hint="check that this identity may read every device's topics (the broker "
                "ACL); shared subscriptions need MQTT 5 and a broker that allows them",
            )

    # paho's network thread from here on.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack_code = reason_code
        if not reason_code.is_failure:
            options = SubscribeOptions(qos=1)
            client.subscribe([(topic, options) for topic in self._filters])
            log.info("ingest connected; subscribing to %s", ", ".join(self._filters))
        self.writer.set_connected(not reason_code.is_failure)
        self._connack.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._suback_codes = list(reason_codes)
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("ingest subscriptions refused by the broker: %s", refused)
        else:
            self.writer.count_subscribed()
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.writer.set_connected(False)
        if reason_code.is_failure:
            log.warning("ingest lost the broker (%s); paho reconnects", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.writer.offer(message.topic, bytes(message.payload))
