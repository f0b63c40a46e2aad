"""The agent: starts the parts in order, stops them in reverse, reloads on SIGHUP.

Threads: the main thread runs ``Agent.run`` (signals, reload, shutdown);
``health`` (``Agent._health_loop``) publishes metrics and the systemd status
line; the others belong to the parts (``mqtt``, ``publisher``, ``commands``,
``updates``, ``capture-<stream>``, ``infer-<stream>``, ``events-<stream>``,
``watchdog``). The stream list is replaced whole under ``_streams_lock`` by
whoever changes it (reload on the main thread, ``set_config`` and
``restart_stream`` on the commands thread, an update that changes the input
size on the updates thread); readers take the list as it is.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Literal

from edgefleet.runtime import EdgefleetError, TaskName, select_backend

from . import prometheus
from .acceptance import Clock, trusted_now
from .commands import CommandJournal, Commands
from .config import DELEGATE_TYPES, SOURCE_TYPES, AgentConfig, StreamSettings, load_config
from .handlers import handlers
from .homeassistant import HomeAssistant, state_file
from .identity import Renewer, device_files, prepare_identity
from .metrics import SystemMetrics
from .modelstore import ModelStore
from .mqtt import Inbound, MqttLink, OutboxPublisher
from .outbox import Outbox
from .pipeline import LoadedModel, StreamRunner
from .protocol import (
    Capabilities,
    ErrorCode,
    HealthMessage,
    MqttHealth,
    OutboxHealth,
    PartHealth,
    RemoteHealth,
    ReportedState,
    SnapshotMessage,
    StatusMessage,
    SystemHealth,
    Topics,
    key_set_topic,
)
from .snapshots import Snapshot, SnapshotFailed, Trigger, snapshot_fields
from .supervisor import SUPERVISOR, fault_point
from .systemd import Notifier, Watchdog
from .trust import KeySetTrust, device_trust
from .updates import Updater

log = logging.getLogger(__name__)

AGENT_VERSION = metadata.version("edgefleet")
_OFFLINE_ACK_TIMEOUT_S = 2.0
_THREAD_JOIN_S = 5.0


class _OutboxSink:
    """Streams write events here: durable first, then the publisher is woken."""

    def __init__(self, outbox: Outbox, publisher: OutboxPublisher) -> None:
        self._outbox = outbox
        self._publisher = publisher

    def emit(self, stream: str, topic: str, payloads: list[bytes]) -> None:
        self._outbox.put_many(stream, topic, payloads)
        self._publisher.wake()


class Agent:
    """The device daemon."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.topics = Topics(config.device_id, config.broker.topic_root)
        self.notifier = notifier or Notifier()
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._ready = False
        self._announced_fallbacks: str | None = None  # what the retained status last said
        self.streams: list[StreamRunner] = []
        self._streams_lock = threading.RLock()
        # Why each stream that is not running could not start: the degraded status says it.
        self._stream_failures: dict[str, str] = {}
        # Off while the streams are being set up: a report then would list no model.
        self._reporting = False
        self._system = SystemMetrics()
        self.watchdog = Watchdog(
            self.notifier,
            stale_after_s=config.systemd.watchdog_stale_s,
            failed_parts=SUPERVISOR.failed,
        )
        self._running = ExitStack()

    # -- lifetime ---------------------------------------------------------------

    def start(self) -> None:
        """Open the outbox, load the models, connect, start the streams. Undone by ``stop``."""
        if not prepare_identity(
            self.config,
            source=str(self.config_path or "the configuration"),
            stop=self._stop,
            notifier=self.notifier,
        ):
            return  # stopped while waiting to be enrolled: nothing was opened
        updates = self.config.updates
        with ExitStack() as steps:
            self.outbox = Outbox(self.config.outbox)
            steps.callback(self.outbox.close)
            self.store = ModelStore(updates.store_dir, keep_previous=updates.keep_previous)
            self.journal = CommandJournal(
                updates.store_dir / "commands.sqlite3",
                keep_s=self.config.commands.journal_days * 86400,
                keep_count=self.config.commands.journal_max_ids,
            )
            steps.callback(self.journal.close)
            self.link = MqttLink(
                self.config.broker,
                will_topic=self.topics.status,
                will_payload=self._status("offline", reason="connection lost"),
                on_connected=self._on_connected,
                subscriptions=[self.topics.commands, self.topics.desired],
                on_message=self._on_message,
            )
            self.homeassistant = HomeAssistant(
                self.config,
                self.link,
                agent_version=AGENT_VERSION,
                state_file=state_file(self.config),
            )
            files = device_files(self.config)
            self.renewer = (
                Renewer(files, self.config, self.link, self.topics) if files is not None else None
            )
            self.publisher = OutboxPublisher(
                self.outbox, self.link, window=self.config.broker.max_inflight
            )
            self.sink = _OutboxSink(self.outbox, self.publisher)
            self.trust = device_trust(updates, now=self._trusted_time)
            if isinstance(self.trust, KeySetTrust):  # newer key sets come retained
                self.link.route(key_set_topic(self.config.broker.topic_root), self.trust.on_message)
            self.updater = Updater(
                updates,
                store=self.store,
                keys=self.trust,
                streams=lambda: {s.name: s for s in self.streams},
                replace_stream=self._replace_stream,
                on_change=self._publish_reported,
                agent_version=AGENT_VERSION,
                broker=self.link,
                topic_root=self.config.broker.topic_root,
            )
            self.trust.load()
            self.commands = Commands(
                handlers(self),
                journal=self.journal,
                command_name=self.topics.command_name,
                send=self._send_reply,
                settings=self.config.commands,
                clock=lambda: Clock(now=time.time(), floor=self.updater.marks.clock_floor),
            )
            self.streams = self._make_streams(self.config.streams)
            self._reporting = True
            self.link.start()
            steps.callback(self.link.stop)
            if self.renewer is not None:
                self.renewer.start()
                steps.callback(self.renewer.stop)
            self.publisher.start()
            steps.callback(self.publisher.stop)
            self.commands.start()
            steps.callback(self.commands.stop)
            self.updater.start()
            steps.callback(self.updater.stop)
            steps.callback(self._publish_offline)
            steps.callback(self._flush)
            for stream in self.streams:
                stream.start()
            steps.callback(self._stop_streams)
            self._health_thread = SUPERVISOR.start("health", self._health_loop, self._stop)
            steps.callback(self._health_thread.join, _THREAD_JOIN_S)
            self.watchdog.start()
            steps.callback(self.watchdog.stop)
            if self.config.health.prometheus_port is not None:
                stop_serving = prometheus.serve(
                    self.health,
                    port=self.config.health.prometheus_port,
                    bind=self.config.health.prometheus_bind,
                )
                steps.callback(stop_serving)
            if not self.streams:
                log.error(
                    "no stream could start (%s): the agent stays connected and reports "
                    "'degraded' so the config can be fixed (set_config) without a visit",
                    self._failures_line(),
                    extra={"device": self.config.device_id},
                )
                self.notifier.ready("no stream could start; see the log")
            self._running = steps.pop_all()
        log.info(
            "agent %s started: device %s, %s, broker %s:%s",
            AGENT_VERSION,
            self.config.device_id,
            f"{len(self.streams)} stream(s)" if self.streams else "degraded (no stream runs)",
            self.config.broker.host,
            self.config.broker.port,
            extra={"device": self.config.device_id},
        )

    def stop(self) -> None:
        """Stop streams, send what is queued (bounded), say offline, disconnect, close."""
        self.notifier.stopping()
        self._stop.set()
        self._running.close()
        log.info("agent stopped")

    def _stop_streams(self) -> None:
        for stream in reversed(self.streams):
            stream.stop()

    def _flush(self) -> None:
        if self.link.connected and not self.publisher.flush(self.config.shutdown_flush_s):
            log.warning("%d event(s) stay in the outbox for the next start", self.outbox.depth)

    def _make_streams(self, settings: list[StreamSettings]) -> list[StreamRunner]:
        """The streams at start; one whose model or source fails is logged and left out."""
        streams = []
        for s in settings:
            try:
                streams.append(self._make_stream(s, initial=True))
            except EdgefleetError as exc:
                log.error("stream %s cannot start: %s", s.name, exc, extra={"stream": s.name})
                self._stream_failures[s.name] = exc.message
        return streams

    def _failures_line(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self._stream_failures.items())

    def stream(self, name: str) -> StreamRunner | None:
        """The running stream called ``name``."""
        return next((s for s in self.streams if s.name == name), None)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Main thread only."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        self.start()
        try:
            while not self._stop.is_set():
                if self._reload.wait(0.5):
                    self._reload.clear()
                    self.reload()
                if SUPERVISOR.failed() and not self.watchdog.running:
                    # Under a systemd watchdog, withholding it restarts the unit; without, exit.
                    log.critical("stopping, a part cannot run: %s", SUPERVISOR.failures_line())
                    return 1
        finally:
            self.stop()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def reload(self) -> None:
        """Re-read the config file; restart only the streams whose settings changed."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except EdgefleetError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready(self._status_line())
            return
        applied = self.apply_config(new)
        log.info(
            "config reloaded: %d stream(s) restarted, %d removed",
            len(applied["restarted"]),
            len(applied["removed"]),
        )
        self.notifier.ready(self._status_line())

    def apply_config(self, new: AgentConfig) -> dict[str, list[str]]:
        """Run ``new``: restart the streams whose settings changed, keep the rest.

        A stream whose new settings cannot start keeps running with its old ones.
        Returns the stream names restarted, refused and removed.
        """
        if new.broker != self.config.broker or new.device_id != self.config.device_id:
            log.warning("broker or device id changed: restart the service to apply them")
        with self._streams_lock:
            old = {s.settings.name: s for s in self.streams}
            kept, started, refused = [], [], []
            for settings in new.streams:
                running = old.pop(settings.name, None)
                if running is not None and running.settings == settings:
                    kept.append(running)
                    continue
                try:
                    replacement = self._make_stream(settings)
                except EdgefleetError as exc:
                    log.error("stream %s: new settings refused: %s", settings.name, exc)
                    refused.append(settings.name)
                    if running is not None:
                        kept.append(running)
                    else:
                        self._stream_failures[settings.name] = exc.message
                    continue
                self._stream_failures.pop(settings.name, None)
                if running is not None:
                    running.stop()
                replacement.start()
                started.append(replacement)
            for removed in old.values():
                removed.stop()
            self.streams = kept + started
            configured = {s.name for s in new.streams}
            self._stream_failures = {
                n: why for n, why in self._stream_failures.items() if n in configured
            }
            # Topics and the broker session are built from these: they apply at the next start.
            self.config = new.model_copy(
                update={"broker": self.config.broker, "device_id": self.config.device_id}
            )
        self._publish_birth()
        self._publish_reported()
        self.homeassistant.apply(self.config)
        return {
            "restarted": [s.name for s in started],
            "refused": refused,
            "removed": list(old),
        }

    def restart_stream(self, name: str) -> None:
        """Stop a stream and start it again with the same settings and its current model."""
        with self._streams_lock:
            running = self.stream(name)
            if running is None:
                raise KeyError(name)
            running.stop()
            replacement = self._make_stream(running.settings)
            replacement.start()
            self.streams = [replacement if s is running else s for s in self.streams]

    def _replace_stream(self, name: str, model: LoadedModel) -> None:  # updates thread
        with self._streams_lock:
            running = self.stream(name)
            if running is None:
                model.predictor.close()
                return
            replacement = self._make_stream(running.settings, model=model)
            running.stop()
            replacement.start()
            self.streams = [replacement if s is running else s for s in self.streams]

    def _make_stream(
        self,
        settings: StreamSettings,
        *,
        model: LoadedModel | None = None,
        initial: bool = False,
    ) -> StreamRunner:
        if model is None:
            choose = self.updater.initial_model if initial else self.updater.current_model
            try:
                model = choose(settings)
            except EdgefleetError as exc:
                if not settings.model.fallbacks:
                    raise
                # The stream's own chain tries the model again, then its fallback builds.
                log.warning("stream %s: %s; trying its fallback builds", settings.name, exc)
        return StreamRunner(
            settings,
            topics=self.topics,
            sink=self.sink,
            on_result=self._on_result,
            model=model,
            on_events=self.homeassistant.stream_events(settings.name),
            publish_snapshot=self._publish_snapshot,
        )

    def _publish_snapshot(self, stream: str, shot: Snapshot, why: Trigger) -> None:
        """A stream rule's snapshot to its topic and Home Assistant (its snapshots thread).

        Sent now or not at all: paho would keep a snapshot handed over while the broker is
        away in memory, a few hundred kB each, until it is back."""
        if not self.link.connected:
            raise SnapshotFailed(
                ErrorCode.REFUSED,
                "not sent: the broker is not connected",
                hint="the next track start while connected takes another",
            )
        message = SnapshotMessage(
            device_id=self.config.device_id,
            stream=stream,
            capture_ts=shot.capture_ts,
            track_id=why.track_id,
            label=why.label,
            **snapshot_fields(shot),
        )
        topic, payload = self.topics.snapshots(stream), message.model_dump_json().encode()
        if not self.link.fits(topic, payload):
            raise SnapshotFailed(
                ErrorCode.REFUSED,
                f"not sent: {len(payload)} bytes, more than the broker accepts in one packet "
                f"({self.link.max_packet_size})",
                hint="lower the stream's snapshots.max_bytes",
            )
        self.link.publish(topic, payload, qos=1)
        self.homeassistant.snapshot(stream, shot.jpeg)

    # -- commands and desired state ------------------------------------------------------

    def _on_message(self, message: Inbound) -> None:  # mqtt thread
        if message.topic == self.topics.desired:
            self.updater.on_desired(message)
        elif self.topics.command_name(message.topic) is not None:
            self.commands.receive(message)
        else:  # e.g. a model chunk that arrived after its transfer ended
            log.debug("ignored a message on %s", message.topic)

    def _send_reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.link.publish(topic, payload, qos=1, correlation_data=correlation)

    def reported(self) -> ReportedState:
        """What this device runs and how its updates go."""
        return ReportedState(
            device_id=self.config.device_id,
            ts=time.time(),
            agent_version=AGENT_VERSION,
            desired_revision=self.updater.desired_revision,
            models={s.name: s.model for s in self.streams},
            updates=dict(self.updater.reports),
            marks=self.updater.marks.snapshot(),
        )

    def _publish_reported(self) -> None:  # any thread
        if not self._reporting:
            return  # the first one goes out on connect, once the streams run
        payload = self.reported().model_dump_json(exclude_none=True).encode()
        self.link.publish(self.topics.reported, payload, qos=1, retain=True)

    def _on_connected(self) -> None:  # mqtt thread
        self._publish_birth()
        self._publish_reported()
        self.homeassistant.sync()  # after the birth: its availability is the status
        if self.link.problem is not None:
            # The other client may take the connection back before the next health interval.
            self._publish_health()

    # -- status and health -------------------------------------------------------

    def _on_result(self) -> None:  # infer threads
        self.watchdog.progress()
        if not self._ready:
            self._ready = True
            self.notifier.ready(self._status_line())
            log.info("first result: pipeline ready")

    def _status(self, state: Literal["online", "offline"], *, reason: str | None = None) -> bytes:
        online = state == "online"
        shown: Literal["online", "degraded", "offline"] = state
        if online and not self.streams:
            shown, reason = "degraded", f"no stream could start: {self._failures_line()}"
        elif online and self._fallbacks_line():
            shown, reason = "degraded", self._fallbacks_line()
        message = StatusMessage(
            state=shown,
            device_id=self.config.device_id,
            ts=time.time(),
            reason=reason,
            agent_version=AGENT_VERSION,
            capabilities=self._capabilities() if online else None,
            models=[s.model for s in self.streams] if online else [],
            streams=[s.name for s in self.streams] if online else [],
        )
        return message.model_dump_json(exclude_none=True).encode()

    def _capabilities(self) -> Capabilities:
        return Capabilities(
            backends=[select_backend().label],
            tasks=[t.value for t in TaskName],
            sources=SOURCE_TYPES,
            delegates=DELEGATE_TYPES,
        )

    def _publish_birth(self) -> None:  # mqtt thread (on connect) or main thread (reload)
        self.link.publish(self.topics.status, self._status("online"), qos=1, retain=True)

    def _publish_offline(self) -> None:
        if not self.link.connected:
            return
        acked = threading.Event()
        self.link.publish(
            self.topics.status,
            self._status("offline", reason="shutdown"),
            qos=1,
            retain=True,
            on_ack=acked.set,
        )
        if not acked.wait(_OFFLINE_ACK_TIMEOUT_S):
            log.warning("the broker did not acknowledge the offline status in time")

    def health(self) -> HealthMessage:
        """The current health message."""
        system = self._system.snapshot()
        return HealthMessage(
            device_id=self.config.device_id,
            ts=time.time(),
            uptime_s=round(time.monotonic() - self.started_at, 1),
            streams={s.name: s.health() for s in self.streams},
            outbox=OutboxHealth(
                depth=self.outbox.depth,
                dropped=self.outbox.dropped,
                not_stored=self.outbox.not_stored,
                salvaged=self.outbox.salvaged,
                lost=self.outbox.lost,
                undeliverable=self.publisher.undeliverable,
                problem=self.outbox.problem or self.publisher.ack_problem,
            ),
            mqtt=MqttHealth(
                connected=self.link.connected,
                reconnects=self.link.reconnects,
                published=self.publisher.published,
                id_conflicts=self.link.id_conflicts,
                problem=self.link.problem,
            ),
            system=SystemHealth(
                cpu_percent=system.cpu_percent,
                rss_mb=system.rss_mb,
                cpu_temperature_c=system.cpu_temperature_c,
                throttled=system.throttled,
                load_1m=system.load_1m,
            ),
            models=[s.model for s in self.streams],
            remote=RemoteHealth(
                commands_answered=self.commands.answered,
                commands_unanswered=self.commands.unanswered,
                desired_malformed=self.updater.malformed_desired,
            ),
            clock=self.updater.clock_health(),
            trust=self.trust.health(),
            parts={
                name: PartHealth(state=s.state.value, restarts=s.restarts, last_error=s.last_error)
                for name, s in SUPERVISOR.parts().items()
            },
            certificate_days_left=self.renewer.days_left if self.renewer is not None else None,
        )

    def _trusted_time(self) -> float:  # any thread: when a key set's expiry is judged
        """The clock, never before the newest trusted time (as manifests' expiry)."""
        return trusted_now(Clock(now=time.time(), floor=self.updater.marks.clock_floor))

    def _status_line(self) -> str:
        parts = [f"{s.name}: {s.capture.stats.state}" for s in self.streams]
        broker = "connected" if self.link.connected else "disconnected"
        return f"{', '.join(parts)}; broker {broker}; outbox {self.outbox.depth}"

    def _health_loop(self) -> None:  # health thread
        interval = self.config.health.interval_s
        while not self._stop.wait(interval):
            fault_point()
            self.notifier.status(self._status_line())
            if not self.link.connected:
                continue  # health is a snapshot: nothing to keep for later
            self._publish_health()

    def _publish_health(self) -> None:  # health thread, or mqtt thread on connect
        message = self.health()
        self.link.publish(
            self.topics.health, message.model_dump_json(exclude_none=True).encode(), qos=0
        )
        fallbacks = self._fallbacks_line()
        if fallbacks != self._announced_fallbacks:
            # A stream lost or regained its accelerator: the retained status says so.
            self._announced_fallbacks = fallbacks
            self._publish_birth()

    def _fallbacks_line(self) -> str | None:
        """``stream kite: accelerator lost: ...`` for each stream on a fallback build."""
        lost = [f"stream {s.name}: {s.fallback_reason}" for s in self.streams if s.fallback_reason]
        return "; ".join(lost) or None
