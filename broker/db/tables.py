"""The broker's tables (SQLAlchemy 2 typed models). Key material is LargeBinary, never text.

Nothing here holds a plaintext key: root keys are sealed under the master key, resource keys under
their root (see broker.keys.key_wrapping). Times are UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python on every engine (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ResourceRow(Base):
    """A resource and its service-managed root key (sealed by the master key `master_key_id`)."""

    __tablename__ = "resources"
    __table_args__ = (
        CheckConstraint("state IN ('active', 'delete_scheduled', 'destroyed')", name="state"),
    )

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    imported: Mapped[bool]
    state: Mapped[str] = mapped_column(String(20))
    purge_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    destroy_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # NULL once destroyed: without it no resource key of this resource can be opened again.
    root_key_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    master_key_id: Mapped[str | None] = mapped_column(String(64), index=True)


class KeyRingRow(Base):
    """Per (resource, purpose): which version is current, what root wraps it, when it rotates."""

    __tablename__ = "key_rings"
    __table_args__ = (
        CheckConstraint("purpose IN ('models', 'results')", name="purpose"),
        CheckConstraint("key_source IN ('service_managed', 'customer_managed')", name="key_source"),
    )

    resource_id: Mapped[str] = mapped_column(
        ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True
    )
    purpose: Mapped[str] = mapped_column(String(16), primary_key=True)
    current_version: Mapped[int] = mapped_column(Integer)
    key_source: Mapped[str] = mapped_column(String(20))
    root_key_id: Mapped[str] = mapped_column(String(512))
    rotation_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class KeyVersionRow(Base):
    """One resource-key version, wrapped by the root `root_key_id` (key NULL once destroyed)."""

    __tablename__ = "key_versions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["resource_id", "purpose"],
            ["key_rings.resource_id", "key_rings.purpose"],
            ondelete="CASCADE",
        ),
        CheckConstraint("state IN ('enabled', 'destroy_scheduled', 'destroyed')", name="state"),
    )

    resource_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(20))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    destroy_time: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    destroy_event_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    root_key_id: Mapped[str | None] = mapped_column(String(512))


class CustomerKeyRow(Base):
    """A resource's customer-managed key, while enabled. Every resource-key version of the
    purposes in `scope` is stored wrapped by the key version named here (one transaction moves
    them all whenever this row changes)."""

    __tablename__ = "customer_keys"
    __table_args__ = (CheckConstraint("scope IN ('models', 'models,results')", name="scope"),)

    resource_id: Mapped[str] = mapped_column(
        ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True
    )
    provider: Mapped[str] = mapped_column(String(32))
    vault: Mapped[str] = mapped_column(String(512))
    key_name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(256))
    identity: Mapped[str] = mapped_column(String(256))
    follow_latest: Mapped[bool]
    # "models" for a resource imported with the legacy scope, else "models,results".
    scope: Mapped[str] = mapped_column(String(32))
    enable_time: Mapped[datetime] = mapped_column(UTCDateTime)
    checked_time: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditRow(Base):
    """One audited call or state change. Written in bulk (Core executemany), never edited."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_chain", "writer", "chain_seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    writer: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    caller: Mapped[str] = mapped_column(String(256))
    on_behalf_of: Mapped[str | None] = mapped_column(String(256))
    operation: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str | None] = mapped_column(String(256), index=True)
    item_count: Mapped[int] = mapped_column(Integer)
    failed_count: Mapped[int] = mapped_column(Integer)
    key_ids: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    # The tamper-evident chain (broker.audit.chain); NULL on records written before it existed.
    chain_seq: Mapped[int | None] = mapped_column(BigInteger)
    chain_mac: Mapped[bytes | None] = mapped_column(LargeBinary)
    audit_key_id: Mapped[str | None] = mapped_column(String(64))


class AuditKeyRow(Base):
    """A random audit HMAC key, sealed under the master key `master_key_id` (broker.audit.chain)."""

    __tablename__ = "audit_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
