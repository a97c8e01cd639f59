"""Schema version control: upgrade to the newest revision, or check that a database is there.

Servers call `require_current` and refuse to start on an un-migrated or newer schema, naming the
command that fixes it; `keybroker migrate` (and `keybroker up`, for its embedded SQLite) calls
`upgrade`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from broker.core.errors import ConfigurationError


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def head_revision() -> str:
    """The newest revision this build knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None when it has never been migrated)."""

    def read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine) -> None:
    """Migrates the database to the newest revision (a no-op when it is there)."""
    cfg = _config()

    def run(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def require_current(engine: AsyncEngine) -> None:
    """Raises ConfigurationError unless the database is at this build's head revision."""
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if current is not None and current not in known:
        raise ConfigurationError(
            f"the database schema is at revision {current}, which this keybroker does not know "
            f"(newer than {head}?): upgrade keybroker, or point it at another database"
        )
    raise ConfigurationError(
        f"the database schema is at revision {current or 'none (empty database)'}, "
        f"this keybroker needs {head}: run `keybroker migrate` first"
    )
