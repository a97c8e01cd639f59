"""customer-managed keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "customer_keys",
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("vault", sa.String(length=512), nullable=False),
        sa.Column("key_name", sa.String(length=256), nullable=False),
        sa.Column("version", sa.String(length=256), nullable=False),
        sa.Column("identity", sa.String(length=256), nullable=False),
        sa.Column("follow_latest", sa.Boolean(), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("enable_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope IN ('models', 'models,results')", name=op.f("ck_customer_keys_scope")
        ),
        sa.ForeignKeyConstraint(
            ["resource_id"],
            ["resources.id"],
            name=op.f("fk_customer_keys_resource_id_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_customer_keys")),
    )


def downgrade() -> None:
    op.drop_table("customer_keys")
