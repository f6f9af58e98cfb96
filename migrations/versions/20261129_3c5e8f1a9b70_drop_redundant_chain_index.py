"""drop the redundant index on updates.chain_id

The unique key on (chain_id, version) already serves every lookup by chain (its leading
column), so the single-column index only cost an index insertion per publish.

Revision ID: 3c5e8f1a9b70
Revises: 7a1c0e9b2d34
Create Date: 2026-11-29 19:10:00.000000

"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '3c5e8f1a9b70'
down_revision: Union[str, Sequence[str], None] = '7a1c0e9b2d34'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.drop_index(op.f('ix_updates_chain_id'), table_name='updates')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index(op.f('ix_updates_chain_id'), 'updates', ['chain_id'], unique=False)
