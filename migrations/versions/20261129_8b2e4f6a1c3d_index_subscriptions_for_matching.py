"""index subscriptions for matching

Routing's matching reads subscriptions in organisation order and tests a few small columns
of each. The plain index on `organisation_id` becomes one that also carries those columns
(PostgreSQL's INCLUDE), so that the scan needs the index alone (an index-only scan) instead
of visiting each wide row. SQLite keeps a plain index on `organisation_id`.

Revision ID: 8b2e4f6a1c3d
Revises: 7a1c0e9b2d34
Create Date: 2026-11-29 21:40:00.000000

"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '8b2e4f6a1c3d'
down_revision: Union[str, Sequence[str], None] = '7a1c0e9b2d34'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

MATCHED_COLUMNS = ["id", "active", "has_topic_filter", "has_publisher_filter",
                   "publisher_levels_mask", "prevention_levels_mask", "min_priority_rank",
                   "roles_mask"]


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index('ix_subscriptions_matching', 'subscriptions', ['organisation_id'],
                    unique=False, postgresql_include=MATCHED_COLUMNS)
    op.drop_index('ix_subscriptions_organisation_id', table_name='subscriptions')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index('ix_subscriptions_organisation_id', 'subscriptions', ['organisation_id'],
                    unique=False)
    op.drop_index('ix_subscriptions_matching', table_name='subscriptions')
