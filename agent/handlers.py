"""What each command does on the device; the ``commands`` thread calls these one at a time.

Each handler takes the command's typed arguments (already validated against
``protocol.COMMAND_ARGS``) and returns the reply's ``result``, or raises
``CommandFailed`` with an error code a controller can act on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edgefleet.runtime import EdgefleetError

from .commands import CommandFailed, Handler
from .config import AgentConfig, ConfigError, apply_environment, check_files, parse_config
from .configfile import ConfigFileError, apply_patch, replace_config
from .durable import write_atomically
from .modelstore import NothingToRollBack
from .pipeline import StreamRunner
from .protocol import (
    BenchModelArgs,
    CommandName,
    ErrorCode,
    NoArgs,
    RollbackModelArgs,
    SetConfigArgs,
    SnapshotArgs,
    StreamArgs,
)
from .snapshots import SnapshotFailed, SnapshotTooLarge, jpeg_budget, snapshot_fields
from .updates import UpdateBusy, UpdateRefused
from .validation import ValidationRefused, validate_model

if TYPE_CHECKING:
    from .app import Agent


def handlers(agent: Agent) -> dict[CommandName, Handler]:
    """The handler of every command, bound to ``agent``."""
    h = _Handlers(agent)
    return {
        CommandName.PING: h.ping,
        CommandName.GET_STATUS: h.get_status,
        CommandName.GET_CONFIG: h.get_config,
        CommandName.SET_CONFIG: h.set_config,
        CommandName.SNAPSHOT: h.snapshot,
        CommandName.RESTART_STREAM: h.restart_stream,
        CommandName.LIST_MODELS: h.list_models,
        CommandName.BENCH_MODEL: h.bench_model,
        CommandName.ROLLBACK_MODEL: h.rollback_model,
    }


class _Handlers:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _stream(self, name: str) -> StreamRunner:
        runner = self.agent.stream(name)
        if runner is None:
            known = ", ".join(s.name for s in self.agent.streams) or "none"
            raise CommandFailed(ErrorCode.NOT_FOUND, f"no stream {name!r}; streams: {known}")
        return runner

    def ping(self, args: NoArgs) -> dict[str, Any]:
        return {"pong": True, "uptime_s": round(time.monotonic() - self.agent.started_at, 1)}

    def get_status(self, args: NoArgs) -> dict[str, Any]:
        return {
            "health": self.agent.health().model_dump(mode="json"),
            "reported": self.agent.reported().model_dump(mode="json"),
        }

    def get_config(self, args: NoArgs) -> dict[str, Any]:
        return {"config": self.agent.config.model_dump(mode="json")}

    def set_config(self, args: SetConfigArgs) -> dict[str, Any]:
        path = self.agent.config_path
        if path is None:
            raise CommandFailed(ErrorCode.REFUSED, "this agent runs without a config file")
        current = _read_config_file(path, whole=args.config is not None)
        try:
            if args.patch is not None:
                written = apply_patch(current, args.patch)
            else:
                written = replace_config(current, args.config or {})
        except ConfigFileError as exc:
            raise CommandFailed(ErrorCode.REFUSED, f"{path}: {exc.message}", hint=exc.hint) from exc
        new = _validated(written, base_dir=path.parent)
        changed = written != current
        if changed:
            try:
                write_atomically(path, written.encode())
            except OSError as exc:  # not applied: the file and the running config stay as they were
                raise CommandFailed(
                    ErrorCode.FAILED,
                    f"cannot write {path}: {exc.strerror or exc}",
                    hint="check the disk and the file's permissions",
                ) from exc
        applied = self.agent.apply_config(new)
        return {"written": str(path), "changed": changed, **applied}

    def snapshot(self, args: SnapshotArgs) -> dict[str, Any]:
        runner = self._stream(args.stream)
        limit = self.agent.link.max_packet_size
        budget = jpeg_budget(args.max_bytes, limit)
        try:
            shot = runner.snapshot(size=args.size, max_bytes=budget)
        except SnapshotFailed as exc:
            message, hint = exc.message, exc.hint
            if isinstance(exc, SnapshotTooLarge) and budget < args.max_bytes:
                message += (
                    f": the broker accepts packets of at most {limit} bytes, which leaves "
                    f"{budget} for the JPEG"
                )
                hint = "ask with size=model, or raise the broker's max_packet_size"
            raise CommandFailed(exc.code, f"stream {args.stream}: {message}", hint=hint) from exc
        return {
            "stream": args.stream,
            "capture_ts": shot.capture_ts,
            "size": args.size.value,
            "max_bytes": budget,
            **snapshot_fields(shot),
        }

    def restart_stream(self, args: StreamArgs) -> dict[str, Any]:
        self._stream(args.stream)
        try:
            self.agent.restart_stream(args.stream)
        except EdgefleetError as exc:
            raise CommandFailed(ErrorCode.FAILED, str(exc)) from exc
        return {"stream": args.stream, "restarted": True}

    def list_models(self, args: NoArgs) -> dict[str, Any]:
        store = self.agent.store
        stored = []
        for model in store.models():
            stored.append({"sha256": model.sha256, "size": model.size, "streams": model.streams})
        current = {}
        for runner in self.agent.streams:
            pointer = store.current(runner.name)
            current[runner.name] = {
                "running": runner.model.model_dump(mode="json"),
                "previous": list(pointer.previous) if pointer else [],
            }
        return {"streams": current, "stored": stored}

    def bench_model(self, args: BenchModelArgs) -> dict[str, Any]:
        runner = self._stream(args.stream)
        model = runner.settings.model
        content = self.agent.store.load(runner.model.sha256).content
        try:
            report = validate_model(
                content,
                manifest=None,
                delegate=model.delegate,
                threads=model.threads,
                backend=model.backend,
                frame=runner.latest_frame,
                bench_runs=args.runs,
                timeout_s=self.agent.config.updates.validation_timeout_s,
            )
        except ValidationRefused as exc:
            raise CommandFailed(ErrorCode.FAILED, f"{exc.code}: {exc.message}") from exc
        return {
            "stream": args.stream,
            "sha256": runner.model.sha256,
            "backend": report.backend,
            "delegate": report.delegate,
            "runs": report.runs,
            "latency_p50_ms": report.latency_p50_ms,
            "latency_p90_ms": report.latency_p90_ms,
        }

    def rollback_model(self, args: RollbackModelArgs) -> dict[str, Any]:
        self._stream(args.stream)
        try:
            sha = self.agent.updater.rollback(args.stream, f"operator: {args.reason}")
        except NothingToRollBack as exc:
            raise CommandFailed(ErrorCode.REFUSED, exc.message, hint=exc.hint) from exc
        except (UpdateBusy, UpdateRefused) as exc:  # refused: the previous model's signer
            raise CommandFailed(ErrorCode.REFUSED, exc.message, hint=exc.hint) from exc
        return {"stream": args.stream, "sha256": sha}


def _read_config_file(path: Path, *, whole: bool) -> str:
    """The config file's text, to patch; a whole new config replaces one that cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        if whole:
            return ""  # only its comments are lost: the new config says everything
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandFailed(
            ErrorCode.FAILED,
            f"cannot read {path}, so there is nothing to patch: {reason}",
            hint="restore the file, or send the whole configuration (config) instead of a patch",
        ) from exc


def _validated(text: str, *, base_dir: Path) -> AgentConfig:
    """The config ``text`` says, read as the agent reads its file, or INVALID_ARGS naming why."""
    try:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = f"the result does not read back as YAML ({exc})"
            raise ConfigError("set_config", [problem]) from exc
        if not isinstance(data, dict):
            raise ConfigError("set_config", ["the top level must be a mapping of fields"])
        problems = apply_environment(data, os.environ)
        if problems:
            raise ConfigError("set_config", problems)
        new = parse_config(data, "set_config", base_dir=base_dir)
        problems = check_files(new)
        if problems:
            raise ConfigError("set_config", problems)
    except ConfigError as exc:
        raise CommandFailed(
            ErrorCode.INVALID_ARGS,
            f"{exc.message}\n(the config file is left as it was)",
            hint=exc.hint,
        ) from exc
    return new
