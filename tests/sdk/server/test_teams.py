"""Teams: a team never sees another's sandboxes; concurrency limits."""

import pytest

from e2b import NotFoundException, RateLimitException, Sandbox

from conftest import LIMITED_KEY, OTHER_KEY


def test_teams_cannot_see_each_other(sandbox):
    others = Sandbox.list(api_key=OTHER_KEY).next_items()
    assert sandbox.sandbox_id not in [s.sandbox_id for s in others]
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sandbox.sandbox_id, api_key=OTHER_KEY)
    assert Sandbox.kill(sandbox.sandbox_id, api_key=OTHER_KEY) is False
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id, api_key=OTHER_KEY)
    assert sandbox.is_running()
    theirs = Sandbox.create(api_key=OTHER_KEY, timeout=60)
    try:
        mine = [s.sandbox_id for s in Sandbox.list().next_items()]
        assert theirs.sandbox_id not in mine
        assert theirs.commands.run("echo theirs").stdout == "theirs\n"
    finally:
        theirs.kill()


def test_concurrency_limit_gives_429():
    made = [Sandbox.create(api_key=LIMITED_KEY, timeout=60) for _ in range(2)]
    try:
        with pytest.raises(RateLimitException):
            Sandbox.create(api_key=LIMITED_KEY, timeout=60)
        # Paused sandboxes do not count against the limit.
        made[0].pause()
        third = Sandbox.create(api_key=LIMITED_KEY, timeout=60)
        made.append(third)
    finally:
        for s in made:
            Sandbox.kill(s.sandbox_id, api_key=LIMITED_KEY)
