"""The official Python SDK against a running `kiln serve` (no debug mode).

scripts/test.sh starts the server and exports:
  E2B_API_URL, E2B_SANDBOX_URL   the server
  E2B_API_KEY                    a key of the team "default"
  KILN_TEST_OTHER_KEY            a key of a second team
  KILN_TEST_LIMITED_KEY          a key of a team that may run 2 sandboxes at once
"""

import os

import httpx
import pytest

from e2b import Sandbox

REQUIRED = ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "KILN_TEST_OTHER_KEY", "KILN_TEST_LIMITED_KEY"]


def pytest_configure(config):
    missing = [v for v in REQUIRED if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(
            f"missing {', '.join(missing)}: run this suite through scripts/test.sh, "
            "which starts kiln serve and makes the keys"
        )
    if os.environ.get("E2B_DEBUG"):
        raise pytest.UsageError("E2B_DEBUG must not be set: these tests go through the control API")


def pytest_sessionstart(session):
    url = os.environ["E2B_API_URL"]
    try:
        r = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError as e:
        pytest.exit(f"kiln serve is not reachable at {url}/health ({e!r})", returncode=3)
    if r.status_code != 200:
        pytest.exit(f"{url}/health answered {r.status_code}: is the base template ready?", returncode=3)


API_URL = os.environ.get("E2B_API_URL", "")
API_KEY = os.environ.get("E2B_API_KEY", "")
OTHER_KEY = os.environ.get("KILN_TEST_OTHER_KEY", "")
LIMITED_KEY = os.environ.get("KILN_TEST_LIMITED_KEY", "")


@pytest.fixture
def sandbox():
    sbx = Sandbox.create(timeout=120)
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


@pytest.fixture
def api():
    """Raw HTTP access to the control API, for status codes and bodies."""
    with httpx.Client(base_url=API_URL, headers={"X-API-KEY": API_KEY}, timeout=60) as client:
        yield client
