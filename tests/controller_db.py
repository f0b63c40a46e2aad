"""The controller database on both backends, for tests: a SQLite file or a fresh PostgreSQL
database.

PostgreSQL is the server at ``$EDGEFLEET_TEST_POSTGRES`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``, trust auth): each test gets its own
``edgefleet_test_<random>`` database, dropped afterwards. A server that cannot be reached skips
the PostgreSQL half with the reason; under CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_ENV = "EDGEFLEET_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")
_CONNECT_TIMEOUT_S = 5


def postgres_admin_url() -> str:
    """The URL of the server's maintenance database that test databases are made from."""
    return os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT


def _admin_connection() -> psycopg.Connection:
    url = make_url(postgres_admin_url())
    try:
        return psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            dbname=url.database or "postgres",
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT_S,
        )
    except psycopg.OperationalError as exc:
        reason = (
            f"no PostgreSQL at {url.render_as_string(hide_password=True)} ({exc}); start one "
            f"or set {POSTGRES_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run every test)")
        pytest.skip(reason)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, by URL; dropped on leaving."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url()).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def controller_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend`` (sqlite: a file under ``tmp_path``)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.sqlite3'}"
        return
    with postgres_database() as url:
        yield url
