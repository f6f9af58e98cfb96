"""The long fuzzing run: `make fuzz` sets SCHEMATHESIS_MAX_EXAMPLES=500 and runs this folder.

It reuses tests/security/test_fuzz_openapi.py (the same harness, checks and world) with far
more cases per operation and fresh randomness on every run. Without SCHEMATHESIS_MAX_EXAMPLES
(`make test`) it is skipped: the short version already runs in tests/security.
"""

from __future__ import annotations

import os

import pytest

from tests.security.test_fuzz_openapi import (  # noqa: F401 - fixtures, used by name
    FUZZ_SETTINGS,
    db_session,
    fuzz_world,
    module_world,
    schema,
    send_and_check,
    world,
    world_connection,
)

pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.skipif("SCHEMATHESIS_MAX_EXAMPLES" not in os.environ,
                       reason="the long fuzzing run is `make fuzz`"),
    pytest.mark.timeout(0),
]


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_answers_within_its_documented_contract_at_length(
        case, fuzz_world):  # noqa: F811 - the imported fixture, by name
    send_and_check(case, fuzz_world)
