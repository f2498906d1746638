"""Constants and small helpers shared by the SDK conformance tests."""

import time
import uuid

ENVD_URL = "http://localhost:49983"
SANDBOX_USER = "user"
SANDBOX_HOME = "/home/user"
# Every test that touches files works in its own directory below this one.
TEST_ROOT = f"{SANDBOX_HOME}/kiln-sdk-tests"


def unique(prefix: str = "kiln") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Polls `predicate` until it returns a truthy value; returns that value or
    the last falsy one after `timeout` seconds (tests assert on the result)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
