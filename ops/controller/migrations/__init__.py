"""Alembic migrations of the controller database (run by edgefleet.ops.controller.db)."""
