"""What a test needs from the set-up: on a developer's machine a missing piece skips the
test with the reason; under ``CI=true`` (``.ci/run``) it fails, since `make setup` must
have provided it there and a silently skipped test proves nothing."""

from __future__ import annotations

import os

import pytest


def missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: the set-up must provide it)")
    pytest.skip(why)
