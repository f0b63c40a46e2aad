"""Fetch a model over the broker: the chunked transfer a manifest URL ``mqtt:`` names.

Where a device reaches only the broker, the controller publishes the model once for the
whole fleet (``edgefleet transfer publish MODEL``), every message retained, QoS 1::

    <root>/_models/<sha256>/meta      ChunkedModelMeta (JSON): sha256, size, chunk_bytes, chunks
    <root>/_models/<sha256>/<index>   raw bytes of chunk index (0, 1, ...): chunk_bytes long,
                                      except the last, which holds the rest

:func:`fetch_over_mqtt` subscribes to ``<root>/_models/<sha256>/#``, writes each chunk at
``index * chunk_bytes`` into the staging file, and once every chunk is in, fsyncs the file,
reads it back and checks its length and sha256 against the manifest's. Chunks may arrive
before the meta (the broker sends retained messages in its own order): those wait in memory,
never more than the manifest's size. Duplicates are ignored; an empty payload (a retained
message being cleared) is not a chunk.

Why retained: the retained messages are the resume. A device that was offline when the model
was published, or that restarts (or reconnects) mid-transfer, subscribes again and the broker
sends it every chunk again; nothing about a transfer needs to survive on the device. So the
staging file starts empty on every call, and is deleted when a call fails: an HTTP download
must not mistake its scattered chunks for a prefix to resume from.

Threads: the agent's update thread calls :func:`fetch_over_mqtt` and does everything here,
writing included (``on_progress`` runs on it too, after each new chunk). The handler the
``mqtt`` thread runs for the subscription only puts each message on a queue.

Errors are those of :mod:`edgefleet.agent.download`, with ``url`` ``"mqtt:"``:

- ``DownloadTooLarge``: more bytes than the manifest allows (a chunk index past the meta's
  count, a chunk longer than its place, chunks before the meta adding up past ``size``);
- ``DownloadHashMismatch``: every chunk in, but the bytes are not the manifest's;
- ``DownloadIncomplete``: no meta, or no new chunk, for ``timeout_s`` (transient);
- ``DownloadFailed``: ``permanent`` for a meta that is malformed or disagrees with the
  manifest, or a chunk shorter than its place; transient when stopped, when the publication
  changed mid-transfer, or for a staging file I/O error.

A bug (a malformed ``sha256`` argument, a callback raising) surfaces as the ordinary Python
exception.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from .download import (
    DownloadFailed,
    DownloadIncomplete,
    DownloadTooLarge,
    staging_failed,
    verified_staging,
)
from .mqtt import Inbound
from .protocol import (
    MODEL_META_LEVEL,
    MQTT_MODEL_URL,
    SCHEMA_VERSION,
    SHA256_PATTERN,
    ChunkedModelMeta,
    describe_errors,
    model_transfer_topic,
)

__all__ = ["Subscriber", "fetch_over_mqtt"]

log = logging.getLogger(__name__)

# How often the waiting update thread looks at its stop event.
_STOP_POLL_S = 0.1
# Decimal; longer than any real index could be, a level is not taken for one.
_CHUNK_INDEX = re.compile(r"[0-9]{1,18}")
_PUBLISH_HINT = (
    "publish it on the controller with `edgefleet transfer publish MODEL` (to this broker "
    "and topic root); a retry receives every chunk again"
)
_REPUBLISH_HINT = (
    "the publication under {base} is wrong: on the controller, `edgefleet transfer clear "
    "{sha256}`, then `edgefleet transfer publish MODEL` with the model the manifest names"
)


class Subscriber(Protocol):
    """What the transfer needs of the broker link (``MqttLink`` offers it)."""

    def route(self, topic_filter: str, handler: Callable[[Inbound], None]) -> None:
        """Subscribe, and hand every message on ``topic_filter`` to ``handler``."""

    def unroute(self, topic_filter: str) -> None:
        """Undo :meth:`route`."""


def fetch_over_mqtt(
    link: Subscriber,
    topic_root: str,
    *,
    sha256: str,
    size: int,
    staging: Path,
    timeout_s: float = 60.0,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> bytes:
    """Receive the model ``sha256`` (``size`` bytes) from the broker via ``staging``.

    Returns the verified bytes; the staging file is kept then, deleted on any error.
    ``timeout_s`` bounds the wait for the meta and between new chunks, not the transfer.
    """
    if size <= 0 or timeout_s <= 0 or not re.fullmatch(SHA256_PATTERN, sha256):
        raise ValueError(
            f"need a sha256, size > 0, timeout_s > 0; not {sha256!r}, {size}, {timeout_s}"
        )
    base = model_transfer_topic(topic_root, sha256)
    assembly = _Assembly(base, sha256, size, staging, on_progress)
    inbox: queue.Queue[Inbound] = queue.Queue()
    assembly.open()
    topic_filter = f"{base}/#"
    try:
        link.route(topic_filter, inbox.put)
        try:
            _receive(assembly, inbox, timeout_s, stop)
        finally:
            link.unroute(topic_filter)
        assembly.finish()
        return assembly.verify()
    except BaseException:
        assembly.abandon()
        raise


def _receive(
    assembly: _Assembly,
    inbox: queue.Queue[Inbound],
    timeout_s: float,
    stop: threading.Event | None,
) -> None:
    """Hand messages to ``assembly`` until it is complete; the update thread's loop."""
    deadline = time.monotonic() + timeout_s
    while not assembly.complete:
        if stop is not None and stop.is_set():
            raise DownloadFailed(
                MQTT_MODEL_URL,
                f"stopped ({assembly.progress()})",
                hint="the agent is stopping; the next try receives every chunk again",
                permanent=False,
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadIncomplete(
                MQTT_MODEL_URL,
                f"{assembly.progress()}, nothing new for {timeout_s:g} s on {assembly.base}/#",
                hint=_PUBLISH_HINT,
            )
        try:
            message = inbox.get(timeout=min(remaining, _STOP_POLL_S))
        except queue.Empty:
            continue
        if assembly.take(message):
            deadline = time.monotonic() + timeout_s


class _Assembly:
    """One transfer: the meta, the chunks in, the staging file. The update thread's alone."""

    def __init__(
        self,
        base: str,
        sha256: str,
        size: int,
        staging: Path,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.base = base
        self.sha256 = sha256
        self.size = size
        self.staging = staging
        self.on_progress = on_progress
        self.meta: ChunkedModelMeta | None = None
        self.early: dict[int, bytes] = {}  # chunks that came before the meta
        self.early_bytes = 0
        self.received: set[int] = set()
        self.bytes_done = 0
        self._fd: int | None = None

    @property
    def complete(self) -> bool:
        """Whether every chunk the meta announces is in the staging file."""
        return self.meta is not None and len(self.received) == self.meta.chunks

    def progress(self) -> str:
        """How far the transfer got, for messages."""
        if self.meta is None:
            return f"no meta arrived ({len(self.early)} chunks did) for model {self.sha256[:12]}"
        return (
            f"{len(self.received)} of {self.meta.chunks} chunks arrived "
            f"({self.bytes_done:,} of {self.size:,} bytes) for model {self.sha256[:12]}"
        )

    def take(self, message: Inbound) -> bool:
        """Use one message of the subscription; whether it brought something new."""
        level = message.topic[len(self.base) + 1 :]
        if not message.payload:
            return False  # a retained message being cleared
        if level == MODEL_META_LEVEL:
            return self._take_meta(message)
        if _CHUNK_INDEX.fullmatch(level):
            return self._take_chunk(int(level), message.payload)
        log.warning("model transfer: ignoring %s (neither a meta nor a chunk)", message.topic)
        return False

    # -- the meta ------------------------------------------------------------------------

    def _take_meta(self, message: Inbound) -> bool:
        meta = self._parse_meta(message)
        if self.meta is not None:
            if meta == self.meta:
                return False
            raise DownloadFailed(
                MQTT_MODEL_URL,
                f"the model {self.sha256[:12]} was published again, cut another way, "
                f"mid-transfer ({self.progress()})",
                hint="the next try receives the new publication from the start",
                permanent=False,
            )
        self._check_meta(meta, message.topic)
        self.meta = meta
        log.info(
            "model transfer %s: %d bytes in %d chunks of %d",
            self.sha256[:12],
            meta.size,
            meta.chunks,
            meta.chunk_bytes,
        )
        early, self.early, self.early_bytes = self.early, {}, 0
        for index in sorted(early):
            self._take_chunk(index, early[index])
        return True

    def _parse_meta(self, message: Inbound) -> ChunkedModelMeta:
        try:
            meta = ChunkedModelMeta.model_validate_json(message.payload)
        except ValidationError as exc:
            raise self._bad_publication(
                f"the meta on {message.topic} is malformed: {describe_errors(exc)}"
            ) from exc
        if meta.schema_version != SCHEMA_VERSION:
            raise self._bad_publication(
                f"the meta on {message.topic} has schema version {meta.schema_version}; "
                f"this agent reads {SCHEMA_VERSION}"
            )
        return meta

    def _check_meta(self, meta: ChunkedModelMeta, topic: str) -> None:
        if meta.sha256 != self.sha256 or meta.size != self.size:
            raise self._bad_publication(
                f"the meta on {topic} describes sha256 {meta.sha256[:12]}, {meta.size:,} bytes; "
                f"the manifest says sha256 {self.sha256[:12]}, {self.size:,} bytes"
            )

    def _bad_publication(self, message: str) -> DownloadFailed:
        hint = _REPUBLISH_HINT.format(base=self.base, sha256=self.sha256)
        return DownloadFailed(MQTT_MODEL_URL, message, hint=hint, permanent=True)

    # -- the chunks ----------------------------------------------------------------------

    def _take_chunk(self, index: int, payload: bytes) -> bool:
        if self.meta is None:
            return self._keep_early(index, payload)
        if index in self.received:
            return False
        self._check_chunk(self.meta, index, len(payload))
        self._write(payload, index * self.meta.chunk_bytes)
        self.received.add(index)
        self.bytes_done += len(payload)
        if self.on_progress is not None:
            self.on_progress(self.bytes_done)
        return True

    def _keep_early(self, index: int, payload: bytes) -> bool:
        if index in self.early:
            return False
        self.early[index] = payload
        self.early_bytes += len(payload)
        if self.early_bytes > self.size:
            raise self._too_large(
                f"chunks adding up to {self.early_bytes:,} bytes arrived before the meta"
            )
        return True

    def _check_chunk(self, meta: ChunkedModelMeta, index: int, length: int) -> None:
        if index >= meta.chunks:
            raise self._too_large(f"chunk {index} arrived; the meta announces {meta.chunks}")
        expected = meta.chunk_length(index)
        if length > expected:
            raise self._too_large(f"chunk {index} holds {length:,} bytes, its place {expected:,}")
        if length < expected:
            raise self._bad_publication(
                f"chunk {index} of model {self.sha256[:12]} holds {length:,} bytes; "
                f"the meta says {expected:,}"
            )

    def _too_large(self, what: str) -> DownloadTooLarge:
        return DownloadTooLarge(
            MQTT_MODEL_URL,
            f"{what}: more than the manifest's {self.size:,} bytes of model {self.sha256[:12]}",
            hint=_REPUBLISH_HINT.format(base=self.base, sha256=self.sha256),
        )

    # -- the staging file ----------------------------------------------------------------

    def open(self) -> None:
        """Create (or empty) the staging file: a transfer never resumes from it."""
        try:
            self.staging.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise staging_failed(MQTT_MODEL_URL, self.staging, "create", exc) from exc

    def _write(self, payload: bytes, offset: int) -> None:
        assert self._fd is not None, "open() first"
        view = memoryview(payload)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise staging_failed(MQTT_MODEL_URL, self.staging, "write", exc) from exc

    def finish(self) -> None:
        """fsync and close the staging file."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            raise staging_failed(MQTT_MODEL_URL, self.staging, "write", exc) from exc
        finally:
            os.close(fd)

    def verify(self) -> bytes:
        """The staged bytes, if their length and sha256 are the manifest's."""
        data = verified_staging(
            MQTT_MODEL_URL,
            self.staging,
            size=self.size,
            sha256=self.sha256,
            hint=_REPUBLISH_HINT.format(base=self.base, sha256=self.sha256),
        )
        log.info("model transfer %s: %d bytes, sha256 verified", self.sha256[:12], self.size)
        return data

    def abandon(self) -> None:
        """Close and delete the staging file (after a failure); never raises."""
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
            self.staging.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("model transfer: cannot delete %s (%s)", self.staging, exc)
