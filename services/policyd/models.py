"""policyd's SQL model (SQLAlchemy 2 typed ORM): the Windows IPsec policy concepts as tables.

* ``policies`` — name, description, main-mode settings (IKE proposals, master-key lifetime in
  minutes and in sessions, master-key PFS) and the nodes/workers it is assigned to; owns
  ``rules``.
* ``rules`` — one filter list + one filter action, ordered authentication methods
  (``auth_methods``), tunnel endpoints (none = transport), connection type, enabled.
* ``filter_lists`` / ``filters`` — ordered filters: source and destination, IP protocol, ports,
  mirrored. Filter lists are shared by rules of any policy, as in Windows.
* ``filter_actions`` / ``security_methods`` — permit, block or negotiate with ordered security
  methods (ESP and/or AH, algorithms, lifetimes); the two Windows check boxes.
* ``revision`` — one row, the policy revision: bumped by one in the same transaction as each
  committed change. ``audit_log`` — one row per object changed, tagged with that revision, so
  the changes after revision N are ``audit_log WHERE revision > N``.

Every object carries ``modified_revision`` (the revision of its last change), which is also
its ETag. A consumer reads a whole revision with one query per table in one transaction
(:func:`services.policyd.store.export_document`). Secrets are never stored: a pre-shared key
is a *reference* (``psk_ref``) to a secret held elsewhere.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAME_LEN = 64
DESC_LEN = 1024
ADDR_LEN = 100

# An auto-incrementing 64-bit key (SQLite only auto-increments INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Revision(Base):
    """The single policy revision counter (row id 1)."""

    __tablename__ = "revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AuditEntry(Base):
    """Who changed what, when, and at which revision (``detail`` holds before/after)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    actor: Mapped[str] = mapped_column(String(NAME_LEN), nullable=False)
    operation: Mapped[str] = mapped_column(String(16), nullable=False)  # create/update/delete
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    name: Mapped[str] = mapped_column(String(2 * NAME_LEN + 1), nullable=False)
    via: Mapped[str] = mapped_column(String(80), nullable=False)  # the request that did it
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


class Policy(Base):
    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(String(DESC_LEN), nullable=False, default="")
    # main mode (IKE SA): strongSwan-style proposal strings in order of preference
    mm_proposals: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    mm_lifetime_minutes: Mapped[int] = mapped_column(Integer, nullable=False)
    mm_lifetime_sessions: Mapped[int] = mapped_column(Integer, nullable=False)  # 0 = no limit
    mm_pfs: Mapped[bool] = mapped_column(Boolean, nullable=False)
    assigned_to: Mapped[list[str]] = mapped_column(JSON, nullable=False)  # node/worker names
    modified_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)

    rules: Mapped[list[Rule]] = relationship(
        back_populates="policy",
        cascade="all, delete-orphan",
        order_by="Rule.name",
        passive_deletes=True,
    )


class FilterList(Base):
    __tablename__ = "filter_lists"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(String(DESC_LEN), nullable=False, default="")
    modified_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)

    filters: Mapped[list[Filter]] = relationship(
        back_populates="filter_list",
        cascade="all, delete-orphan",
        order_by="Filter.position",
        passive_deletes=True,
    )


class Filter(Base):
    """One filter. Addresses are canonical text: ``any``, ``me``, an address, a prefix, or
    ``first-last``; ports are inclusive ranges, NULL = any."""

    __tablename__ = "filters"
    __table_args__ = (UniqueConstraint("filter_list_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filter_list_id: Mapped[int] = mapped_column(
        ForeignKey("filter_lists.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    description: Mapped[str] = mapped_column(String(DESC_LEN), nullable=False, default="")
    source: Mapped[str] = mapped_column(String(ADDR_LEN), nullable=False)
    destination: Mapped[str] = mapped_column(String(ADDR_LEN), nullable=False)
    protocol: Mapped[int | None] = mapped_column(Integer)  # NULL = any
    source_port_first: Mapped[int | None] = mapped_column(Integer)
    source_port_last: Mapped[int | None] = mapped_column(Integer)
    destination_port_first: Mapped[int | None] = mapped_column(Integer)
    destination_port_last: Mapped[int | None] = mapped_column(Integer)
    mirrored: Mapped[bool] = mapped_column(Boolean, nullable=False)

    filter_list: Mapped[FilterList] = relationship(back_populates="filters")


class FilterAction(Base):
    __tablename__ = "filter_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(String(DESC_LEN), nullable=False, default="")
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # permit/block/negotiate
    # "Accept unsecured communication, but always respond using IPsec"
    accept_unsecured: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # "Allow fallback to unsecured communication" (with non-IPsec-aware computers)
    allow_fallback: Mapped[bool] = mapped_column(Boolean, nullable=False)
    # False: only answer peers that negotiate (Client, respond only)
    initiate: Mapped[bool] = mapped_column(Boolean, nullable=False)
    session_key_pfs: Mapped[bool] = mapped_column(Boolean, nullable=False)
    pfs_group: Mapped[str] = mapped_column(String(32), nullable=False)
    modified_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)

    security_methods: Mapped[list[SecurityMethod]] = relationship(
        back_populates="filter_action",
        cascade="all, delete-orphan",
        order_by="SecurityMethod.position",
        passive_deletes=True,
    )


class SecurityMethod(Base):
    __tablename__ = "security_methods"
    __table_args__ = (UniqueConstraint("filter_action_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filter_action_id: Mapped[int] = mapped_column(
        ForeignKey("filter_actions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    protocol: Mapped[str] = mapped_column(String(8), nullable=False)  # esp / ah / esp+ah
    esp: Mapped[str | None] = mapped_column(String(64))  # ESP proposal string
    ah: Mapped[str | None] = mapped_column(String(16))  # AH integrity keyword
    lifetime_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    lifetime_kilobytes: Mapped[int] = mapped_column(BigInteger, nullable=False)  # 0 = none

    filter_action: Mapped[FilterAction] = relationship(back_populates="security_methods")


class Rule(Base):
    __tablename__ = "rules"
    __table_args__ = (UniqueConstraint("policy_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy_id: Mapped[int] = mapped_column(
        ForeignKey("policies.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_LEN), nullable=False)
    description: Mapped[str] = mapped_column(String(DESC_LEN), nullable=False, default="")
    filter_list_id: Mapped[int] = mapped_column(
        ForeignKey("filter_lists.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    filter_action_id: Mapped[int] = mapped_column(
        ForeignKey("filter_actions.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    tunnel_endpoint: Mapped[str | None] = mapped_column(String(ADDR_LEN))  # NULL = transport
    local_tunnel_endpoint: Mapped[str | None] = mapped_column(String(ADDR_LEN))
    connection_type: Mapped[str] = mapped_column(String(16), nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    modified_revision: Mapped[int] = mapped_column(BigInteger, nullable=False)

    policy: Mapped[Policy] = relationship(back_populates="rules")
    filter_list: Mapped[FilterList] = relationship()
    filter_action: Mapped[FilterAction] = relationship()
    auth_methods: Mapped[list[AuthMethod]] = relationship(
        back_populates="rule",
        cascade="all, delete-orphan",
        order_by="AuthMethod.position",
        passive_deletes=True,
    )


class AuthMethod(Base):
    """Kerberos, a certificate from a named CA, or a PSK by reference (never the secret)."""

    __tablename__ = "auth_methods"
    __table_args__ = (UniqueConstraint("rule_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(
        ForeignKey("rules.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    method: Mapped[str] = mapped_column(String(16), nullable=False)  # kerberos/certificate/psk
    ca: Mapped[str | None] = mapped_column(String(DESC_LEN))  # certificate: CA name (DN)
    psk_ref: Mapped[str | None] = mapped_column(String(NAME_LEN * 2))  # psk: secret reference

    rule: Mapped[Rule] = relationship(back_populates="auth_methods")
