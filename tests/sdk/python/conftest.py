"""Shared fixtures for the E2B Python SDK conformance suite.

The suite drives a real envd through the unchanged official SDK in debug mode
(`E2B_DEBUG=true`: `Sandbox.create()` talks to http://localhost:49983 and no
control plane). Nothing is started here: scripts/test.sh starts envd. The
session fails at once, with a clear message, when envd is not up.
"""

import os
import pwd
import uuid

import httpx
import pytest

from e2b import AsyncSandbox, Sandbox

from helpers import ENVD_URL, SANDBOX_USER, TEST_ROOT


def pytest_configure(config):
    if os.environ.get("E2B_DEBUG", "").lower() != "true":
        raise pytest.UsageError(
            "run the SDK suite with E2B_DEBUG=true (scripts/test.sh does): "
            "debug mode makes the SDK talk to envd on localhost:49983"
        )


def pytest_sessionstart(session):
    try:
        r = httpx.get(f"{ENVD_URL}/health", timeout=5)
    except httpx.HTTPError as e:
        pytest.exit(
            f"envd is not reachable at {ENVD_URL}/health ({e!r}). "
            "Start it first, e.g. with `bash scripts/test.sh` or "
            "`target/debug/envd --addr 127.0.0.1 --port 49983`.",
            returncode=3,
        )
    if r.status_code != 204:
        pytest.exit(
            f"{ENVD_URL}/health answered {r.status_code}, expected 204: is that envd?",
            returncode=3,
        )


@pytest.fixture(scope="session")
def user_ids():
    """uid/gid of the sandbox user: looked up, never assumed to be 1000."""
    entry = pwd.getpwnam(SANDBOX_USER)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture(scope="session")
def sandbox():
    sbx = Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx


@pytest.fixture
async def async_sandbox():
    return await AsyncSandbox.create()


@pytest.fixture
def test_dir(sandbox, request):
    """A fresh directory owned by the sandbox user, removed afterwards."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    path = f"{TEST_ROOT}/{name}-{uuid.uuid4().hex[:8]}"
    assert sandbox.files.make_dir(path) is True
    yield path
    try:
        sandbox.files.remove(path)
    except Exception:
        pass
