"""workers: models, analyze operations, jobs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "analyze_operations",
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error_message", sa.String(length=1024), nullable=False),
        sa.Column("blob_key", sa.String(length=512), nullable=True),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(length=256), nullable=True),
        sa.Column("result_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.CheckConstraint(
            "status IN ('not_started', 'running', 'succeeded', 'failed', 'canceled')",
            name=op.f("ck_analyze_operations_status"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_analyze_operations")),
    )
    with op.batch_alter_table("analyze_operations", schema=None) as batch_op:
        batch_op.create_index("ix_analyze_operations_expire_time", ["expire_time"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_analyze_operations_resource_id"), ["resource_id"], unique=False
        )

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cursor", sa.String(length=256), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error_message", sa.String(length=1024), nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'succeeded', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_claimable", ["state", "not_before"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_resource_id"), ["resource_id"], unique=False)

    op.create_table(
        "models",
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("resource_id", sa.String(length=63), nullable=False),
        sa.Column("blob_key", sa.String(length=512), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(length=256), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_models")),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_resource_id"), ["resource_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_resource_id"))

    op.drop_table("models")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_resource_id"))
        batch_op.drop_index("ix_jobs_claimable")

    op.drop_table("jobs")
    with op.batch_alter_table("analyze_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analyze_operations_resource_id"))
        batch_op.drop_index("ix_analyze_operations_expire_time")

    op.drop_table("analyze_operations")
