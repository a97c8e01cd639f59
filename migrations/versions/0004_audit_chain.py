"""audit chain: per-record chain sequence and HMAC, and the sealed audit keys

Every audit record written from this revision on carries `chain_seq` (1, 2, ... per writer),
`chain_mac` (HMAC-SHA256, broker.audit.chain) and `audit_key_id` (which audit key made the MAC).
Records written before it keep NULL in all three: they were never chained, so nothing can show
whether they were edited. `keybroker audit verify` reports them as "unchained (written before
the audit chain)" without failing, but only while they precede every chained record (by id); an
unchained record among chained ones is reported as a finding. `audit_keys` holds the random HMAC
keys, each sealed under the master key (re-sealed by `keybroker master-key rotate`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("master_key_id", sa.String(length=64), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_keys")),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chain_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("chain_mac", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("audit_key_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_audit_records_chain", ["writer", "chain_seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_records_chain")
        batch_op.drop_column("audit_key_id")
        batch_op.drop_column("chain_mac")
        batch_op.drop_column("chain_seq")
    op.drop_table("audit_keys")
