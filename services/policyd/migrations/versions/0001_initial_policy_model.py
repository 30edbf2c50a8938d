"""Initial policy model: policies, rules, filter lists and actions, revision, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 10:49:59.819587
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=129), nullable=False),
        sa.Column("via", sa.String(length=80), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_revision"), ["revision"], unique=False)

    op.create_table(
        "filter_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("accept_unsecured", sa.Boolean(), nullable=False),
        sa.Column("allow_fallback", sa.Boolean(), nullable=False),
        sa.Column("initiate", sa.Boolean(), nullable=False),
        sa.Column("session_key_pfs", sa.Boolean(), nullable=False),
        sa.Column("pfs_group", sa.String(length=32), nullable=False),
        sa.Column("modified_revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_filter_actions")),
        sa.UniqueConstraint("name", name=op.f("uq_filter_actions_name")),
    )
    op.create_table(
        "filter_lists",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("modified_revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_filter_lists")),
        sa.UniqueConstraint("name", name=op.f("uq_filter_lists_name")),
    )
    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("mm_proposals", sa.JSON(), nullable=False),
        sa.Column("mm_lifetime_minutes", sa.Integer(), nullable=False),
        sa.Column("mm_lifetime_sessions", sa.Integer(), nullable=False),
        sa.Column("mm_pfs", sa.Boolean(), nullable=False),
        sa.Column("assigned_to", sa.JSON(), nullable=False),
        sa.Column("modified_revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
        sa.UniqueConstraint("name", name=op.f("uq_policies_name")),
    )
    op.create_table(
        "revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revision")),
    )
    op.create_table(
        "filters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("filter_list_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("destination", sa.String(length=100), nullable=False),
        sa.Column("protocol", sa.Integer(), nullable=True),
        sa.Column("source_port_first", sa.Integer(), nullable=True),
        sa.Column("source_port_last", sa.Integer(), nullable=True),
        sa.Column("destination_port_first", sa.Integer(), nullable=True),
        sa.Column("destination_port_last", sa.Integer(), nullable=True),
        sa.Column("mirrored", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["filter_list_id"],
            ["filter_lists.id"],
            name=op.f("fk_filters_filter_list_id_filter_lists"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_filters")),
        sa.UniqueConstraint("filter_list_id", "position", name=op.f("uq_filters_filter_list_id")),
    )
    with op.batch_alter_table("filters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_filters_filter_list_id"), ["filter_list_id"], unique=False
        )

    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("filter_list_id", sa.Integer(), nullable=False),
        sa.Column("filter_action_id", sa.Integer(), nullable=False),
        sa.Column("tunnel_endpoint", sa.String(length=100), nullable=True),
        sa.Column("local_tunnel_endpoint", sa.String(length=100), nullable=True),
        sa.Column("connection_type", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("modified_revision", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["filter_action_id"],
            ["filter_actions.id"],
            name=op.f("fk_rules_filter_action_id_filter_actions"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["filter_list_id"],
            ["filter_lists.id"],
            name=op.f("fk_rules_filter_list_id_filter_lists"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
            name=op.f("fk_rules_policy_id_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
        sa.UniqueConstraint("policy_id", "name", name=op.f("uq_rules_policy_id")),
    )
    with op.batch_alter_table("rules", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rules_filter_action_id"), ["filter_action_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_rules_filter_list_id"), ["filter_list_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_rules_policy_id"), ["policy_id"], unique=False)

    op.create_table(
        "security_methods",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("filter_action_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=8), nullable=False),
        sa.Column("esp", sa.String(length=64), nullable=True),
        sa.Column("ah", sa.String(length=16), nullable=True),
        sa.Column("lifetime_seconds", sa.Integer(), nullable=False),
        sa.Column("lifetime_kilobytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["filter_action_id"],
            ["filter_actions.id"],
            name=op.f("fk_security_methods_filter_action_id_filter_actions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_methods")),
        sa.UniqueConstraint(
            "filter_action_id", "position", name=op.f("uq_security_methods_filter_action_id")
        ),
    )
    with op.batch_alter_table("security_methods", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_security_methods_filter_action_id"), ["filter_action_id"], unique=False
        )

    op.create_table(
        "auth_methods",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("ca", sa.String(length=1024), nullable=True),
        sa.Column("psk_ref", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["rules.id"],
            name=op.f("fk_auth_methods_rule_id_rules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_methods")),
        sa.UniqueConstraint("rule_id", "position", name=op.f("uq_auth_methods_rule_id")),
    )
    with op.batch_alter_table("auth_methods", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_auth_methods_rule_id"), ["rule_id"], unique=False)

    op.execute(sa.text("INSERT INTO revision (id, value) VALUES (1, 0)"))


def downgrade() -> None:
    with op.batch_alter_table("auth_methods", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_methods_rule_id"))

    op.drop_table("auth_methods")
    with op.batch_alter_table("security_methods", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_security_methods_filter_action_id"))

    op.drop_table("security_methods")
    with op.batch_alter_table("rules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rules_policy_id"))
        batch_op.drop_index(batch_op.f("ix_rules_filter_list_id"))
        batch_op.drop_index(batch_op.f("ix_rules_filter_action_id"))

    op.drop_table("rules")
    with op.batch_alter_table("filters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_filters_filter_list_id"))

    op.drop_table("filters")
    op.drop_table("revision")
    op.drop_table("policies")
    op.drop_table("filter_lists")
    op.drop_table("filter_actions")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_revision"))

    op.drop_table("audit_log")
