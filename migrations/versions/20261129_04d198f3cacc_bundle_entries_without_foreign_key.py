"""bundle entries without foreign key

bundle_entries.bundle_id no longer has a foreign key to bundles: checking it (a lookup and
a row lock of the bundle per entry) took 40 % of the INSERT that writes the 2,000,000
entries of 10,000 daily bundles (benchmark P5). Nothing needs the check: entries are only
written by `run_due_bundles`, from a SELECT over the bundles it inserted in the same
transaction. The cascade stays, as a trigger: deleting a bundle (or its subscription or
organisation) deletes its entries.

Revision ID: 04d198f3cacc
Revises: 5c1d2e3f4a5b
Create Date: 2026-11-29 13:17:33.122004

"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '04d198f3cacc'
down_revision: Union[str, Sequence[str], None] = '5c1d2e3f4a5b'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Batch mode: SQLite cannot drop a constraint in place (it rebuilds the table).
    with op.batch_alter_table('bundle_entries') as batch:
        batch.drop_constraint(batch.f('fk_bundle_entries_bundle_id_bundles'), type_='foreignkey')
    # Row by row, as the foreign key's ON DELETE CASCADE did (a primary key lookup each).
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION bundles_delete_entries() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                DELETE FROM bundle_entries WHERE bundle_id = OLD.id;
                RETURN NULL;
            END $$;
            CREATE TRIGGER bundles_delete_entries AFTER DELETE ON bundles
                FOR EACH ROW EXECUTE FUNCTION bundles_delete_entries();
            """
        )
    else:
        op.execute(
            """
            CREATE TRIGGER bundles_delete_entries AFTER DELETE ON bundles FOR EACH ROW
            BEGIN
                DELETE FROM bundle_entries WHERE bundle_id = OLD.id;
            END
            """
        )


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER bundles_delete_entries ON bundles")
        op.execute("DROP FUNCTION bundles_delete_entries()")
    else:
        op.execute("DROP TRIGGER bundles_delete_entries")
    with op.batch_alter_table('bundle_entries') as batch:
        batch.create_foreign_key(batch.f('fk_bundle_entries_bundle_id_bundles'), 'bundles',
                                 ['bundle_id'], ['id'], ondelete='CASCADE')
