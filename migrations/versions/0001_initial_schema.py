"""initial schema: resources, key rings, key versions, audit

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("writer", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("caller", sa.String(length=256), nullable=False),
        sa.Column("on_behalf_of", sa.String(length=256), nullable=True),
        sa.Column("operation", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=256), nullable=True),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("key_ids", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_records_resource"), ["resource"], unique=False)

    op.create_table(
        "resources",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("imported", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("purge_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroy_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("root_key_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("master_key_id", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "state IN ('active', 'delete_scheduled', 'destroyed')", name=op.f("ck_resources_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resources")),
    )
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_resources_master_key_id"), ["master_key_id"], unique=False
        )

    op.create_table(
        "key_rings",
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("key_source", sa.String(length=20), nullable=False),
        sa.Column("root_key_id", sa.String(length=512), nullable=False),
        sa.Column("rotation_time", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "key_source IN ('service_managed', 'customer_managed')",
            name=op.f("ck_key_rings_key_source"),
        ),
        sa.CheckConstraint("purpose IN ('models', 'results')", name=op.f("ck_key_rings_purpose")),
        sa.ForeignKeyConstraint(
            ["resource_id"],
            ["resources.id"],
            name=op.f("fk_key_rings_resource_id_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_id", "purpose", name=op.f("pk_key_rings")),
    )
    with op.batch_alter_table("key_rings", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_key_rings_rotation_time"), ["rotation_time"], unique=False
        )

    op.create_table(
        "key_versions",
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroy_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroy_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("root_key_id", sa.String(length=512), nullable=True),
        sa.CheckConstraint(
            "state IN ('enabled', 'destroy_scheduled', 'destroyed')",
            name=op.f("ck_key_versions_state"),
        ),
        sa.ForeignKeyConstraint(
            ["resource_id", "purpose"],
            ["key_rings.resource_id", "key_rings.purpose"],
            name=op.f("fk_key_versions_resource_id_key_rings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_id", "purpose", "version", name=op.f("pk_key_versions")),
    )
    with op.batch_alter_table("key_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_key_versions_destroy_time"), ["destroy_time"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("key_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_versions_destroy_time"))

    op.drop_table("key_versions")
    with op.batch_alter_table("key_rings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_rings_rotation_time"))

    op.drop_table("key_rings")
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resources_master_key_id"))

    op.drop_table("resources")
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_records_resource"))

    op.drop_table("audit_records")
