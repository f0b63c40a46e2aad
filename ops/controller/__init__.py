"""The fleet controller (``edgefleet controller run``): registry, releases, rollouts, API.

One module per concern (design.md, fleet controller): ``db`` (SQLAlchemy 2 models and
sessions, Alembic migrations in ``migrations/``), ``registry`` (devices, groups, tags, their
latest facts), ``ingest`` (MQTT subscriptions written to the registry in batches),
``releases`` (content-addressed artifacts, signed manifests, HTTP with Range), ``rollouts``
(the wave engine: a pure decision over registry facts), ``reconcile`` (the loop that stores
its decisions, tables in ``rollout_tables``, and writes them to devices' desired states).
"""
