"""The fleet controller (``edgefleet controller run``): registry, releases, rollouts, API.

One module per concern (design.md, fleet controller): ``db`` (SQLAlchemy 2 models and
sessions, Alembic migrations in ``migrations/``), ``registry`` (devices, groups, tags, their
latest facts), ``ingest`` (MQTT subscriptions written to the registry in batches),
``releases`` (content-addressed artifacts, signed manifests, HTTP with Range), ``rollouts``
(the wave engine: a pure decision over registry facts), ``reconcile`` (the loop that stores
its decisions, tables in ``rollout_tables``, and writes them to devices' desired states),
``service`` (the config file; start and stop of the database, ingest and the HTTP server),
``api`` (the FastAPI app: devices, groups, releases, audit, artifacts; mTLS or bearer
tokens; every error ``{code, message}``), ``cli`` (``edgefleet controller run|openapi|token``).

The public surface is these modules (:data:`__all__`), imported when first named
(``edgefleet.ops.controller.api``): importing the package loads no FastAPI, SQLAlchemy or
paho, so the operator CLI starts without the [controller] extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "api",
    "artifacts",
    "cli",
    "db",
    "ingest",
    "reconcile",
    "registry",
    "releases",
    "rollout_tables",
    "rollouts",
    "service",
]


def __getattr__(name: str) -> ModuleType:
    """The public module ``name``, imported on first use."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
