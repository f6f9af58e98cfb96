"""outbox notifies the relay

A statement that inserts outbox rows notifies the channel `doorstroom_outbox` (PostgreSQL
delivers the notification when the transaction commits, and not at all if it rolls back).
The relay listens on it and dispatches at once, so the API no longer hands rows to the
broker itself. SQLite has no notifications: there the API still wakes its own dispatch
thread (`api/dispatch.py`).

Revision ID: 7a1c0e9b2d34
Revises: 04d198f3cacc
Create Date: 2026-11-29 16:30:00.000000

"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '7a1c0e9b2d34'
down_revision: Union[str, Sequence[str], None] = '04d198f3cacc'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    if op.get_bind().dialect.name != "postgresql":
        return
    # Once per statement, not per row; identical notifications in one transaction are
    # delivered once.
    op.execute(
        """
        CREATE FUNCTION outbox_notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('doorstroom_outbox', '');
            RETURN NULL;
        END $$;
        """)
    op.execute("CREATE TRIGGER outbox_notify_relay AFTER INSERT ON outbox "
               "FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_relay()")


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER outbox_notify_relay ON outbox")
    op.execute("DROP FUNCTION outbox_notify_relay()")
