"""Alembic migrations for the whole keybroker schema (one history). Run with `keybroker migrate`."""
