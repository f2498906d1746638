"""The control API through the official SDK: create, list, info, kill,
timeouts, pause/resume/connect, metrics, errors."""

import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from e2b import (
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxQuery,
    SandboxState,
)

from conftest import API_URL


def test_create_with_metadata_and_env_vars():
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(metadata={"tag": tag, "kind": "test"}, envs={"GREETING": "hello kiln"}, timeout=60)
    try:
        assert sbx.commands.run("echo $GREETING").stdout == "hello kiln\n"
        info = sbx.get_info()
        assert info.metadata == {"tag": tag, "kind": "test"}
        assert info.template_id == "base"
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count >= 1 and info.memory_mb >= 128
        # The end time is the timeout from the start.
        assert 55 <= (info.end_at - info.started_at).total_seconds() <= 65
    finally:
        sbx.kill()


def test_each_sandbox_is_its_own_machine():
    a = Sandbox.create(timeout=60)
    b = Sandbox.create(timeout=60)
    try:
        assert a.sandbox_id != b.sandbox_id
        a.files.write("/home/user/only-in-a", "a")
        assert a.files.exists("/home/user/only-in-a")
        assert not b.files.exists("/home/user/only-in-a")
    finally:
        a.kill()
        b.kill()


def test_list_filters_by_metadata_and_state():
    tag = uuid.uuid4().hex
    running = Sandbox.create(metadata={"tag": tag, "which": "running"}, timeout=60)
    paused = Sandbox.create(metadata={"tag": tag, "which": "paused"}, timeout=60)
    try:
        paused.pause()
        all_tagged = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert {s.sandbox_id for s in all_tagged} == {running.sandbox_id, paused.sandbox_id}
        only_paused = Sandbox.list(
            query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])
        ).next_items()
        assert [s.sandbox_id for s in only_paused] == [paused.sandbox_id]
        assert only_paused[0].state == SandboxState.PAUSED
        only_running = Sandbox.list(
            query=SandboxQuery(metadata={"tag": tag, "which": "running"}, state=[SandboxState.RUNNING])
        ).next_items()
        assert [s.sandbox_id for s in only_running] == [running.sandbox_id]
    finally:
        running.kill()
        Sandbox.kill(paused.sandbox_id)


def test_list_metadata_values_with_spaces_and_symbols():
    value = "a value & more=yes/%"
    sbx = Sandbox.create(metadata={"odd": value}, timeout=60)
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"odd": value})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
        assert found[0].metadata["odd"] == value
    finally:
        sbx.kill()


def test_list_paginates():
    tag = uuid.uuid4().hex
    sandboxes = [Sandbox.create(metadata={"tag": tag}, timeout=60) for _ in range(5)]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=2)
        seen = []
        pages = 0
        while paginator.has_next:
            page = paginator.next_items()
            assert len(page) <= 2
            seen.extend(s.sandbox_id for s in page)
            pages += 1
        assert pages == 3
        assert sorted(seen) == sorted(s.sandbox_id for s in sandboxes)
        # Newest first by default.
        assert seen == [s.sandbox_id for s in reversed(sandboxes)]
    finally:
        for s in sandboxes:
            s.kill()


def test_list_started_after():
    tag = uuid.uuid4().hex
    first = Sandbox.create(metadata={"tag": tag}, timeout=60)
    time.sleep(0.05)
    cut = datetime.now(timezone.utc)
    time.sleep(0.05)
    second = Sandbox.create(metadata={"tag": tag}, timeout=60)
    try:
        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, started_after=cut)).next_items()
        assert [s.sandbox_id for s in found] == [second.sandbox_id]
    finally:
        first.kill()
        second.kill()


def test_kill_and_kill_again():
    sbx = Sandbox.create(timeout=60)
    assert sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_set_timeout_moves_the_end(sandbox):
    before = sandbox.get_info().end_at
    sandbox.set_timeout(600)
    after = sandbox.get_info().end_at
    assert (after - before).total_seconds() > 400
    sandbox.set_timeout(30)
    shorter = sandbox.get_info().end_at
    assert (shorter - datetime.now(timezone.utc)).total_seconds() <= 31


def test_expired_sandbox_is_gone():
    sbx = Sandbox.create(timeout=2)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sbx.is_running():
        time.sleep(0.25)
    assert not sbx.is_running()
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_auto_pause_on_timeout_keeps_state():
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"})
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            time.sleep(0.25)
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert resumed.files.read("/home/user/kept.txt") == "still here"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_pause_resume_keeps_processes_and_files(sandbox):
    sandbox.files.write("/home/user/notes.txt", "remember me")
    handle = sandbox.commands.run(
        "python3 -c 'import os, time\ni=0\nwhile True:\n    i+=1; open(\"/tmp/c.t\",\"w\").write(str(i)); os.replace(\"/tmp/c.t\", \"/tmp/counter\"); time.sleep(0.05)'",
        background=True,
    )
    time.sleep(0.5)
    sandbox.pause()
    assert not sandbox.is_running()
    # Pausing twice: the SDK maps 409 to False.
    assert Sandbox.pause(sandbox.sandbox_id) is False
    resumed = Sandbox.connect(sandbox.sandbox_id, timeout=120)
    assert resumed.is_running()
    assert resumed.files.read("/home/user/notes.txt") == "remember me"
    first = int(resumed.files.read("/tmp/counter"))
    time.sleep(0.5)
    second = int(resumed.files.read("/tmp/counter"))
    assert second > first, "the background process did not keep running after resume"
    procs = [p.pid for p in resumed.commands.list()]
    assert handle.pid in procs
    resumed.commands.kill(handle.pid)


def test_connect_to_running_returns_200_and_extends(api, sandbox):
    r = api.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={"timeout": 500})
    assert r.status_code == 200, r.text
    assert r.json()["sandboxID"] == sandbox.sandbox_id
    assert r.json()["envdAccessToken"]
    end = sandbox.get_info().end_at
    assert (end - datetime.now(timezone.utc)).total_seconds() > 400
    # Connecting never shortens the end time.
    r = api.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={"timeout": 10})
    assert r.status_code == 200
    assert sandbox.get_info().end_at == end


def test_connect_resumes_with_201(api, sandbox):
    sandbox.pause()
    r = api.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={})
    assert r.status_code == 201, r.text
    assert sandbox.commands.run("echo back").stdout == "back\n"


def test_metrics(sandbox):
    sandbox.commands.run("python3 -c 'sum(range(3_000_000))'")
    deadline = time.monotonic() + 15
    metrics = []
    while time.monotonic() < deadline and not metrics:
        metrics = sandbox.get_metrics()
        time.sleep(0.5)
    assert metrics, "no metrics"
    m = metrics[-1]
    assert m.mem_total > 0 and 0 < m.mem_used <= m.mem_total
    assert m.cpu_count >= 1
    assert 0 <= m.cpu_used_pct <= 100


def test_logs_record_the_lifecycle(api, sandbox):
    sandbox.pause()
    Sandbox.connect(sandbox.sandbox_id).commands.run("true")
    r = api.get(f"/sandboxes/{sandbox.sandbox_id}/logs")
    assert r.status_code == 200
    messages = [e["message"] for e in r.json()["logEntries"]]
    assert any("created" in m for m in messages)
    assert any("paused" in m for m in messages)
    assert any("resumed" in m for m in messages)
    # envd's own log of the sandbox's current run.
    assert any("process started" in m and "cmd=/bin/bash" in m for m in messages), messages
    # RFC 3339 with trailing zeros of the fraction trimmed (as Go's RFC3339Nano,
    # E2B's format): compare instants, not strings ("49.9Z" sorts after "49.997Z").
    times = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in r.json()["logEntries"]]
    assert times == sorted(times)


def test_unknown_sandbox_errors(api):
    with pytest.raises(NotFoundException):
        Sandbox.connect("aaaaaaaaaaaaaaaaaaaa")
    with pytest.raises(NotFoundException):
        Sandbox.get_info("aaaaaaaaaaaaaaaaaaaa")
    for method, path in [
        ("GET", "/sandboxes/aaaaaaaaaaaaaaaaaaaa"),
        ("DELETE", "/sandboxes/aaaaaaaaaaaaaaaaaaaa"),
        ("POST", "/sandboxes/aaaaaaaaaaaaaaaaaaaa/pause"),
        ("POST", "/sandboxes/aaaaaaaaaaaaaaaaaaaa/timeout"),
    ]:
        r = api.request(method, path, json={"timeout": 10})
        assert r.status_code == 404, (method, path, r.text)
        body = r.json()
        assert body["code"] == 404 and body["message"]


def test_bad_requests_have_e2b_error_shape(api):
    r = api.post("/v2/sandboxes", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == 400
    r = api.post("/v2/sandboxes", json={"templateID": "no-such-template"})
    assert r.status_code == 404 and r.json()["code"] == 404
    assert "no-such-template" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 10**9})
    assert r.status_code == 400 and "lifetime" in r.json()["message"]
    r = api.get("/v2/sandboxes", params={"state": "sleeping"})
    assert r.status_code == 400 and r.json()["code"] == 400


def test_bad_api_key():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)
    r = httpx.get(f"{API_URL}/v2/sandboxes", headers={"X-API-KEY": "e2b_" + "1" * 40})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "Invalid API key"}
    r = httpx.get(f"{API_URL}/v2/sandboxes")
    assert r.status_code == 401 and r.json()["code"] == 401


def test_health_metrics_and_openapi():
    assert httpx.get(f"{API_URL}/health").status_code == 200
    text = httpx.get(f"{API_URL}/metrics").text
    assert "kiln_sandboxes_running" in text and "kiln_server_resident_memory_bytes" in text
    doc = httpx.get(f"{API_URL}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ["/v2/sandboxes", "/sandboxes/{id}", "/sandboxes/{id}/pause", "/v2/sandboxes/{id}/connect"]:
        assert path in doc["paths"]


def test_v1_paths(api):
    r = api.post("/sandboxes", json={"templateID": "base", "timeout": 60, "secure": False})
    assert r.status_code == 201, r.text
    sid = r.json()["sandboxID"]
    assert r.json().get("envdAccessToken") is None
    try:
        listed = api.get("/sandboxes").json()
        assert sid in [s["sandboxID"] for s in listed]
        r = api.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})
        assert r.status_code == 200
        assert api.post(f"/sandboxes/{sid}/pause").status_code == 204
        assert api.post(f"/sandboxes/{sid}/pause").status_code == 409
        assert "paused" not in [s["state"] for s in api.get("/sandboxes").json() if s["sandboxID"] == sid]
        r = api.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
        assert r.status_code == 201, r.text
        assert api.post(f"/sandboxes/{sid}/resume", json={"timeout": 60}).status_code == 409
    finally:
        api.delete(f"/sandboxes/{sid}")


def test_no_internet_access_is_recorded(api):
    sbx = Sandbox.create(allow_internet_access=False, timeout=60)
    try:
        assert sbx.get_info().allow_internet_access is False
    finally:
        sbx.kill()
