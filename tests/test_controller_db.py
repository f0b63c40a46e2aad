"""The controller database: migrated on open, the same schema on SQLite and PostgreSQL, and a
database from a newer edgefleet refused untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from edgefleet.ops.controller.db import (
    Base,
    DatabaseError,
    DatabaseTooNew,
    DatabaseUrlError,
    current_revisions,
    database_url,
    head_revisions,
    migrate,
    open_database,
)

REGISTRY_TABLES = {
    "devices",
    "device_streams",
    "groups",
    "group_members",
    "device_tags",
    "audit_log",
}


def test_open_migrates_an_empty_database_to_the_head(controller_db_url: str) -> None:
    assert current_revisions(controller_db_url) == []
    with open_database(controller_db_url) as database:
        tables = set(inspect(database.engine).get_table_names())
    assert tables >= REGISTRY_TABLES
    assert current_revisions(controller_db_url) == head_revisions()


def test_migrated_schema_is_what_the_models_say(controller_db_url: str) -> None:
    migrate(controller_db_url)
    engine = create_engine(database_url(controller_db_url))
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_opening_a_migrated_database_again_changes_nothing(controller_db_url: str) -> None:
    assert migrate(controller_db_url) == head_revisions()
    with open_database(controller_db_url):
        pass
    assert current_revisions(controller_db_url) == head_revisions()


def test_a_database_from_a_newer_edgefleet_is_refused_untouched(controller_db_url: str) -> None:
    migrate(controller_db_url)
    engine = create_engine(database_url(controller_db_url))
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()

    with pytest.raises(DatabaseTooNew, match="9999_future") as refused:
        open_database(controller_db_url)

    assert "newer edgefleet" in refused.value.message
    assert refused.value.hint
    assert current_revisions(controller_db_url) == ["9999_future"]


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    with open_database(tmp_path / "controller.sqlite3") as database, database.session() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA busy_timeout")).scalar() > 0


def test_a_file_path_means_sqlite_and_postgresql_means_psycopg() -> None:
    assert database_url("/var/lib/edgefleet/c.sqlite3").drivername == "sqlite+pysqlite"
    assert database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"


def test_a_database_other_than_sqlite_or_postgresql_is_bad_input() -> None:
    with pytest.raises(DatabaseUrlError, match="not mysql"):
        database_url("mysql://u@h/db")


def test_a_database_in_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="cannot open the database"):
        open_database(tmp_path / "missing" / "controller.sqlite3")
