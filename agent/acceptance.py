"""Whether a verified manifest may be installed: the update's decision, without I/O.

Given what the stream accepted before (its high-water marks), the trusted clock and
what the stream runs, :func:`refusal` says why a manifest whose signature verified must
not be installed, or nothing. It is the only place that decides; the updater
(``updates.py``) gathers the inputs and acts. The checks, in order:

1. ``issued_at`` no further than ``max_clock_skew_s`` past the trusted time,
   ``max(clock, floor)`` (clock-dependent: a clock that is behind is corrected
   by time sync);
2. not expired at the trusted time (clock-dependent when the clock, not the
   floor, decides it);
3. the stream's model line: a ``model_id`` other than the stream's only with
   ``replaces_model_id`` naming the stream's line;
4. ``sequence`` strictly above the highest the stream accepted for the line
   (0, no sequence, is refused);
5. a release: ``version`` strictly above the highest installed of the line;
   a rollback (``rollback_from``): it names the release installed now;
6. ``min_agent_version``; a URL this agent can fetch.

The marks come from the marks file (``marks.py``) and, so that marks lost or never
written (an agent upgraded from before them) cannot reopen a replay, from the installed
manifest too: the higher of both counts. :func:`accept` gives the marks after a manifest
is accepted. Marks only go up; nothing here lowers them, so a rollback (signed, by
probation or by the operator) never reopens a newer release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .protocol import MQTT_MODEL_URL, LineMark, Manifest, StreamMarks

__all__ = [
    "Clock",
    "Installed",
    "Refusal",
    "accept",
    "line_of",
    "refusal",
    "trusted_now",
    "usable_url",
]


@dataclass(frozen=True)
class Clock:
    """The device's clock as the decision sees it."""

    now: float
    """``time.time()``: may be wrong (a board without RTC boots in the past)."""
    floor: float = 0.0
    """The newest trusted time seen: ``issued_at`` of the manifests accepted."""
    max_skew_s: float = 300.0
    """How far in the future an ``issued_at`` may be (clocks differ a little)."""


@dataclass(frozen=True)
class Installed:
    """What the stream runs: the model's sha256 and the manifest it was installed with."""

    sha256: str | None = None
    manifest: Manifest | None = None
    """None for the config file's model (or no model)."""


@dataclass(frozen=True)
class Refusal:
    """Why a manifest is refused; ``clock_dependent`` ones are checked again later."""

    reason: str
    clock_dependent: bool = False


def trusted_now(clock: Clock) -> float:
    """The time expiry is judged at: the clock, never before the newest trusted time."""
    return max(clock.now, clock.floor)


def line_of(marks: StreamMarks, installed: Installed) -> str | None:
    """The stream's model line: the installed manifest's, else the last one accepted."""
    if installed.manifest is not None:
        return installed.manifest.model_id
    return marks.line


def refusal(
    manifest: Manifest,
    *,
    marks: StreamMarks,
    installed: Installed,
    clock: Clock,
    agent_version: str,
) -> Refusal | None:
    """Why a verified ``manifest`` must not be installed on the stream, or None."""
    for check in (_time_refusal(manifest, clock), _order_refusal(manifest, marks, installed)):
        if check is not None:
            return check
    if _version_tuple(agent_version) < _version_tuple(manifest.min_agent_version):
        return Refusal(
            f"needs agent {manifest.min_agent_version} or newer; this is {agent_version}"
        )
    if not any(usable_url(url) for url in manifest.urls):
        return Refusal(
            f"no http(s) or {MQTT_MODEL_URL} URL in the manifest: this agent has no other way"
        )
    return None


def accept(
    manifest: Manifest, marks: StreamMarks, installed: Installed, *, installs: bool
) -> StreamMarks:
    """The stream's marks once ``manifest`` is accepted: its line, its sequence as the
    line's sequence mark and, when it ``installs`` (its model now runs), its version as
    the line's version mark; no mark is ever lowered.

    The sequence counts from acceptance, so a manifest refused later (a bad download, a
    failed validation) is never tried again; the version from installation, so a release
    that never ran does not use up its version number.
    """
    mark = _mark(marks, installed, manifest.model_id)
    raised = LineMark(
        sequence=max(mark.sequence, manifest.sequence),
        version=max(mark.version, manifest.version) if installs else mark.version,
    )
    return StreamMarks(line=manifest.model_id, lines={**marks.lines, manifest.model_id: raised})


def usable_url(url: str) -> bool:
    """Whether this agent can fetch from ``url``."""
    return url.startswith(("http://", "https://")) or url == MQTT_MODEL_URL


# -- the checks ---------------------------------------------------------------------------


def _time_refusal(manifest: Manifest, clock: Clock) -> Refusal | None:
    now = trusted_now(clock)
    ahead = manifest.issued_at - now
    if ahead > clock.max_skew_s:
        return Refusal(
            f"issued {ahead:.0f} s in this device's future (more than the "
            f"{clock.max_skew_s:.0f} s clock skew allowed): the device's clock is behind, or "
            "the signer's ahead; checked again when the clock changes",
            clock_dependent=True,
        )
    if manifest.expires_at < now:
        by_clock = manifest.expires_at >= clock.floor  # the floor alone never expires it
        return Refusal(
            f"manifest expired {now - manifest.expires_at:.0f} s ago; sign a new one",
            clock_dependent=by_clock,
        )
    return None


def _order_refusal(manifest: Manifest, marks: StreamMarks, installed: Installed) -> Refusal | None:
    line = line_of(marks, installed)
    if line is not None and line not in (manifest.model_id, manifest.replaces_model_id):
        return Refusal(
            f"model_id {manifest.model_id} is not the stream's model line {line}; a manifest "
            f"that changes the line says so (replaces_model_id {line})"
        )
    if manifest.sequence < 1:
        return Refusal(
            "the manifest carries no sequence; sign it with 'edgefleet manifest create', "
            "which numbers every manifest of a model line"
        )
    mark = _mark(marks, installed, manifest.model_id)
    if manifest.sequence <= mark.sequence:
        return Refusal(
            f"sequence {manifest.sequence} is not newer than {mark.sequence}, the newest "
            f"accepted for {manifest.model_id} on this stream (a replayed manifest?); sign a "
            "new one"
        )
    if manifest.rollback_from is not None:
        return _rollback_refusal(manifest, installed)
    if manifest.version <= mark.version:
        return Refusal(
            f"version {manifest.version} is not newer than {mark.version}, the newest "
            f"installed of {manifest.model_id} on this stream; give a new release a higher "
            "version, or sign a rollback naming the release it steps back from"
        )
    return None


def _rollback_refusal(manifest: Manifest, installed: Installed) -> Refusal | None:
    source = manifest.rollback_from
    assert source is not None
    runs = installed.manifest
    names = f"version {source.version} (sha256 {source.sha256[:12]})"
    if installed.sha256 != source.sha256 or (runs is not None and runs.version != source.version):
        what = (
            f"version {runs.version} (sha256 {runs.sha256[:12]})"
            if runs is not None
            else f"sha256 {(installed.sha256 or 'none')[:12]}"
        )
        return Refusal(
            f"a rollback from {names}, but the stream runs {what}; a rollback applies only "
            "to the release it names"
        )
    return None


def _mark(marks: StreamMarks, installed: Installed, model_id: str) -> LineMark:
    """The line's high-water mark: the marks file's, raised to the installed manifest's."""
    mark = marks.lines.get(model_id, LineMark(sequence=0, version=0))
    runs = installed.manifest
    if runs is None or runs.model_id != model_id:
        return mark
    return LineMark(
        sequence=max(mark.sequence, runs.sequence), version=max(mark.version, runs.version)
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:4])
