"""reasons as id arrays

`inbox_items.reasons` and `bundle_entries.reasons` (a JSON list of {"kind", "id"}) become
three columns: `subscription_ids` and `rule_ids` (`uuid[]` on PostgreSQL, a JSON array of
hex ids on SQLite, the form its UUID columns have) and `via_audience`. Routing builds them
for every recipient in one INSERT … SELECT, where an aggregated array of ids costs far less
than JSON text (benchmark P1). Existing rows are converted both ways.

Revision ID: 3f6c9d2a7b18
Revises: 8b2e4f6a1c3d
Create Date: 2026-11-30 00:00:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


# revision identifiers, used by Alembic.
revision: str = '3f6c9d2a7b18'
down_revision: Union[str, Sequence[str], None] = '8b2e4f6a1c3d'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("inbox_items", "bundle_entries")


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _rebuild_safely(table: str) -> None:
    """Before a batch rebuild of `table` on SQLite: its rename would fail on the trigger
    (migration 04d198f3cacc) that names `bundle_entries`, so that is dropped for it."""
    if table == "bundle_entries" and not _postgresql():
        op.execute("DROP TRIGGER bundles_delete_entries")


def _rebuilt(table: str) -> None:
    if table == "bundle_entries" and not _postgresql():
        op.execute("CREATE TRIGGER bundles_delete_entries AFTER DELETE ON bundles FOR EACH ROW "
                   "BEGIN DELETE FROM bundle_entries WHERE bundle_id = OLD.id; END")


def upgrade() -> None:
    """Upgrade schema."""
    ids_type = postgresql.ARRAY(sa.Uuid()) if _postgresql() else sa.JSON()
    for table in TABLES:
        op.add_column(table, sa.Column("subscription_ids", ids_type, nullable=True))
        op.add_column(table, sa.Column("rule_ids", ids_type, nullable=True))
        op.add_column(table, sa.Column("via_audience", sa.Boolean(), nullable=True))
        if _postgresql():
            op.execute(f"""
                UPDATE {table} SET
                  subscription_ids = ARRAY(SELECT (r->>'id')::uuid FROM json_array_elements(reasons) r
                                           WHERE r->>'kind' = 'subscription'),
                  rule_ids = ARRAY(SELECT (r->>'id')::uuid FROM json_array_elements(reasons) r
                                   WHERE r->>'kind' = 'rule'),
                  via_audience = EXISTS(SELECT FROM json_array_elements(reasons) r
                                        WHERE r->>'kind' = 'audience')""")
        else:
            ids = ("(SELECT json_group_array(lower(replace(json_extract(r.value, '$.id'), "
                   "'-', ''))) FROM json_each({table}.reasons) r "
                   "WHERE json_extract(r.value, '$.kind') = '{kind}')")
            op.execute(f"""
                UPDATE {table} SET
                  subscription_ids = {ids.format(table=table, kind='subscription')},
                  rule_ids = {ids.format(table=table, kind='rule')},
                  via_audience = EXISTS(SELECT 1 FROM json_each({table}.reasons) r
                                        WHERE json_extract(r.value, '$.kind') = 'audience')""")
        _rebuild_safely(table)
        with op.batch_alter_table(table) as batch:
            batch.alter_column("subscription_ids", existing_type=ids_type, nullable=False)
            batch.alter_column("rule_ids", existing_type=ids_type, nullable=False)
            batch.alter_column("via_audience", existing_type=sa.Boolean(), nullable=False)
            batch.drop_column("reasons")
        _rebuilt(table)


def downgrade() -> None:
    """Downgrade schema."""
    ids_type = postgresql.ARRAY(sa.Uuid()) if _postgresql() else sa.JSON()
    for table in TABLES:
        op.add_column(table, sa.Column("reasons", sa.JSON(), nullable=True))
        if _postgresql():
            op.execute(f"""
                UPDATE {table} SET reasons = (SELECT coalesce(json_agg(r), '[]'::json) FROM (
                  SELECT json_build_object('kind', 'subscription', 'id', id) r
                    FROM unnest(subscription_ids) id
                  UNION ALL SELECT json_build_object('kind', 'rule', 'id', id)
                    FROM unnest(rule_ids) id
                  UNION ALL SELECT json_build_object('kind', 'audience', 'id', update_id)
                    WHERE via_audience) reasons)""")
        else:
            # Ids as SQLite's routing wrote them (bare hex), which the old code read too.
            op.execute(f"""
                UPDATE {table} SET reasons = (SELECT json_group_array(json(r)) FROM (
                  SELECT json_object('kind', 'subscription', 'id', s.value) r
                    FROM json_each({table}.subscription_ids) s
                  UNION ALL SELECT json_object('kind', 'rule', 'id', s.value)
                    FROM json_each({table}.rule_ids) s
                  UNION ALL SELECT json_object('kind', 'audience', 'id', {table}.update_id)
                    WHERE {table}.via_audience))""")
        _rebuild_safely(table)
        with op.batch_alter_table(table) as batch:
            batch.alter_column("reasons", existing_type=sa.JSON(), nullable=False)
            batch.drop_column("via_audience")
            batch.drop_column("rule_ids")
            batch.drop_column("subscription_ids")
        _rebuilt(table)
