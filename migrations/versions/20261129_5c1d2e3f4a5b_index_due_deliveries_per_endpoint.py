"""index due deliveries per endpoint

The webhook sender claims the oldest due deliveries of each endpoint, a few per endpoint;
this index lets it read exactly those instead of ranking every pending delivery.

Revision ID: 5c1d2e3f4a5b
Revises: f03bc8fd0f2a
Create Date: 2026-11-29 13:20:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '5c1d2e3f4a5b'
down_revision: Union[str, Sequence[str], None] = 'f03bc8fd0f2a'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_deliveries_endpoint_due', 'deliveries',
                    ['endpoint_id', 'next_attempt_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'pending'"),
                    sqlite_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_index('ix_deliveries_endpoint_due', table_name='deliveries',
                  postgresql_where=sa.text("status = 'pending'"),
                  sqlite_where=sa.text("status = 'pending'"))
