"""The workers' tables, in the same schema history as the broker's (migrations/).

Objects keep their wrapped data key beside the blob's key; the plaintext data key is never
stored. Deleting an object first sets `wrapped_data_key` to NULL (crypto-shredding: without it
the blob can never be opened), then removes the blob, then the row, each step idempotent.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from broker.db.tables import Base, UTCDateTime


class ModelRow(Base):
    """A stored custom model (one row per model name; an upload replaces the content)."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(63), index=True)
    blob_key: Mapped[str] = mapped_column(String(512))
    # NULL once deletion has begun: the model is gone for readers from that moment.
    wrapped_data_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)


class AnalyzeOperationRow(Base):
    """An analyze operation; its result blob and wrapped data key once it succeeded."""

    __tablename__ = "analyze_operations"
    __table_args__ = (
        CheckConstraint(
            "status IN ('not_started', 'running', 'succeeded', 'failed', 'canceled')",
            name="status",
        ),
        Index("ix_analyze_operations_expire_time", "expire_time"),
    )

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    last_update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    complete_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Stored (not derived on read) so the sweeper finds expired rows through an index.
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime)
    error_message: Mapped[str] = mapped_column(String(1024), default="")
    blob_key: Mapped[str | None] = mapped_column(String(512))
    wrapped_data_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str | None] = mapped_column(String(256))
    result_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Set when deletion began (on request or by retention): readers see NOT_FOUND from then on.
    deleted: Mapped[bool] = mapped_column(default=False)


class JobRow(Base):
    """A durable job, claimed with a lease (see workers.jobs)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'running', 'succeeded', 'failed')", name="state"),
        Index("ix_jobs_claimable", "state", "not_before"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(63), index=True)
    # What the job works on (e.g. a blob key); JSON text.
    payload: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    # Where a resumable job has got to (the last object name done).
    cursor: Mapped[str] = mapped_column(String(256), default="")
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    error_message: Mapped[str] = mapped_column(String(1024), default="")
