"""Template builds through the official Python SDK (E2B's v2 builder API) and
`kiln template build`, against a running `kiln serve` (see conftest.py).

Optional env: KILN_BIN (the kiln binary; default target/debug/kiln of this
repository), KILN_TEST_REGISTRY (default 127.0.0.1:5000, started by
scripts/test-registry.sh).
"""

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from e2b import BuildException, Sandbox, Template, wait_for_port

from conftest import API_KEY, API_URL, OTHER_KEY

SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", API_URL)
REGISTRY = os.environ.get("KILN_TEST_REGISTRY", "127.0.0.1:5000")
REPO_ROOT = Path(__file__).resolve().parents[3]


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def names(api):
    """Template names used by a test; their templates are deleted afterwards."""
    used = []
    yield used
    for name in used:
        r = api.get(f"/templates/aliases/{name}")
        if r.status_code == 200:
            api.delete(f"/templates/{r.json()['templateID']}")


def build(template, name, logs=None, **kw):
    kw.setdefault("cpu_count", 1)
    kw.setdefault("memory_mb", 512)
    started = time.monotonic()
    Template.build(template, alias=name, on_build_logs=(logs.append if logs is not None else None), **kw)
    return time.monotonic() - started


def run(sbx, cmd, **kw):
    r = sbx.commands.run(cmd, **kw)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


def test_every_step_shows_in_the_sandbox_and_a_rebuild_is_cached(tmp_path, names):
    marker = uuid.uuid4().hex  # fresh steps: nothing cached by an earlier run
    (tmp_path / "hello.txt").write_text(f"hello from the build context {marker}\n")
    name = unique("steps")
    names.append(name)

    def template():
        return (
            Template(file_context_path=tmp_path)
            .from_base_image()
            .run_cmd(f"sleep 3 && echo built {marker} > /opt/built.txt")
            .copy("hello.txt", "/opt/app/hello.txt")
            .set_envs({"GREETING": "hi there", "TOOL": "kiln"})
            .set_workdir("/opt/app")
        )

    first_logs = []
    first = build(template(), name, first_logs)
    assert Template.exists(name)
    sbx = Sandbox.create(name, timeout=120)
    try:
        assert run(sbx, "cat /opt/built.txt") == f"built {marker}\n"
        assert run(sbx, "cat hello.txt") == f"hello from the build context {marker}\n"
        assert run(sbx, 'echo "$GREETING/$TOOL"') == "hi there/kiln\n"
        assert run(sbx, "pwd") == "/opt/app\n"
        assert run(sbx, "whoami") == "user\n"
    finally:
        sbx.kill()

    # The same template again: every step comes from the cache.
    second_logs = []
    second = build(template(), name, second_logs)
    messages = [e.message for e in second_logs]
    assert sum("CACHED" in m for m in messages) >= 4, messages
    assert not any("CACHED" in e.message for e in first_logs)
    assert second < first - 2, (first, second)
    assert any("already cached" in m for m in messages), messages  # the upload was skipped

    # The rebuilt template still works.
    sbx = Sandbox.create(name, timeout=60)
    try:
        assert run(sbx, "cat /opt/built.txt") == f"built {marker}\n"
    finally:
        sbx.kill()


def test_start_command_is_serving_right_after_create(names):
    name = unique("server")
    names.append(name)
    t = Template().from_base_image().set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    build(t, name)
    sbx = Sandbox.create(name, timeout=60)
    try:
        r = httpx.get(
            SANDBOX_URL,
            headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"},
            timeout=10,
        )
        assert r.status_code == 200
        assert "Directory listing" in r.text
    finally:
        sbx.kill()


def test_a_failing_command_fails_the_build_with_its_name(names):
    name = unique("fails")
    names.append(name)
    t = Template().from_base_image().run_cmd("echo before && exit 3")
    with pytest.raises(BuildException) as err:
        build(t, name)
    text = str(err.value)
    assert "echo before && exit 3" in text and "exit code 3" in text, text
    # A template whose only build failed is not kept.
    assert not Template.exists(name)


def registry_up():
    try:
        return httpx.get(f"http://{REGISTRY}/v2/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_template_from_a_registry_image(names):
    if not registry_up():
        pytest.skip(f"no test registry at {REGISTRY} (scripts/test-registry.sh start)")
    name = unique("busybox")
    names.append(name)
    # The SDK runs every command through /bin/bash, which busybox lacks: a shim.
    shim = "printf '#!/bin/sh\\nexec /bin/sh \"$@\"\\n' > /bin/bash && chmod 755 /bin/bash"
    t = Template().from_image(f"{REGISTRY}/kiln-test/busybox:gzip").run_cmd(shim, user="root")
    build(t, name, memory_mb=256)
    sbx = Sandbox.create(name, timeout=60)
    try:
        assert run(sbx, "busybox echo hi") == "hi\n"
        # The image's config: ENV and WORKDIR; its USER 1000 is E2B's `user`.
        assert run(sbx, 'echo "$KILN_TEST"; pwd; id -u') == "yes\n/home/user\n1000\n"
    finally:
        sbx.kill()


def test_template_api_rules(api, names, tmp_path):
    name = unique("rules")
    names.append(name)
    assert not Template.exists(name)
    build(Template().from_base_image().run_cmd("true"), name)
    assert Template.exists(name)
    tid = api.get(f"/templates/aliases/{name}").json()["templateID"]

    # The name belongs to this team now.
    with httpx.Client(base_url=API_URL, headers={"X-API-KEY": OTHER_KEY}, timeout=30) as other:
        r = other.post("/v3/templates", json={"name": name})
        assert r.status_code == 409 and "another team" in r.json()["message"]
        r = other.get(f"/templates/{tid}/files/{'ab' * 32}")
        assert r.status_code == 404

    # Uploads: a bad hash is refused, and only the returned URL may upload.
    assert api.get(f"/templates/{tid}/files/not-a-hash").status_code == 400
    fresh = uuid.uuid4().hex * 2
    link = api.get(f"/templates/{tid}/files/{fresh}")
    assert link.status_code == 201 and link.json()["present"] is False
    url = link.json()["url"]
    assert url.startswith(API_URL)
    assert httpx.put(url.split("?")[0], content=b"x").status_code == 403
    assert httpx.put(url, content=b"not a tar").status_code == 200
    assert api.get(f"/templates/{tid}/files/{fresh}").json()["present"] is True

    # A build that names no uploaded files fails with the reason.
    r = api.post("/v3/templates", json={"name": name})
    assert r.status_code == 202
    bid = r.json()["buildID"]
    r = api.post(
        f"/v2/templates/{tid}/builds/{bid}",
        json={"force": False, "steps": [{"type": "COPY", "args": ["a", "/a", "", ""], "filesHash": "ef" * 32},
                                         {"type": "HEALTHCHECK", "args": []}]},
    )
    assert r.status_code == 202
    for _ in range(100):
        st = api.get(f"/templates/{tid}/builds/{bid}/status").json()
        if st["status"] in ("ready", "error"):
            break
        time.sleep(0.1)
    assert st["status"] == "error"
    assert "were not uploaded" in st["reason"]["message"] and st["reason"]["step"] == "1"
    # ...and leaves the template's last good build in place.
    assert Template.exists(name)

    # Deleting a template in use is refused.
    sbx = Sandbox.create(name, timeout=60)
    try:
        r = api.delete(f"/templates/{tid}")
        assert r.status_code in (400, 409) and "kill them first" in r.json()["message"]
    finally:
        sbx.kill()
    assert api.delete(f"/templates/{tid}").status_code == 204
    assert not Template.exists(name)


def kiln_bin():
    for candidate in (os.environ.get("KILN_BIN"), shutil.which("kiln"),
                      REPO_ROOT / "target/debug/kiln", REPO_ROOT / "target/release/kiln"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("no kiln binary: set KILN_BIN or build it (cargo build -p kiln-cli)")


def test_cli_builds_a_dockerfile(tmp_path, names):
    name = unique("cli")
    names.append(name)
    (tmp_path / "msg.txt").write_text("from the cli\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM base\n"
        "USER root\n"
        "ARG WHO=nobody\n"
        "COPY msg.txt /srv/msg.txt\n"
        'RUN echo "built for $WHO" > /srv/who.txt\n'
        "WORKDIR /srv\n"
    )
    env = {**os.environ, "E2B_API_URL": API_URL, "E2B_API_KEY": API_KEY}
    kiln = kiln_bin()
    r = subprocess.run(
        [kiln, "template", "build", str(tmp_path), "--name", name, "--cpu", "1", "--memory-mb", "256",
         "--build-arg", "WHO=tests"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[3/5] COPY msg.txt /srv/msg.txt" in r.stdout, r.stdout
    assert f"template '{name}' built" in r.stdout
    listed = subprocess.run([kiln, "template", "list"], env=env, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and name in listed.stdout, listed.stdout + listed.stderr
    sbx = Sandbox.create(name, timeout=60)
    try:
        assert run(sbx, "cat msg.txt who.txt") == "from the cli\nbuilt for tests\n"
    finally:
        sbx.kill()

    # A failing step: non-zero exit and the reason.
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN echo nope && exit 7\n")
    r = subprocess.run([kiln, "template", "build", str(tmp_path), "--name", name],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "exit code 7" in r.stderr and "echo nope && exit 7" in r.stderr, r.stderr


def test_builds_queue_one_at_a_time(api, names):
    first, second = unique("queue-a"), unique("queue-b")
    names += [first, second]
    builds = []
    for name in (first, second):
        r = api.post("/v3/templates", json={"name": f"{name}:v1", "cpuCount": 1, "memoryMB": 256})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["names"] == [name] and body["tags"] == ["v1"] and body["public"] is False
        builds.append((body["templateID"], body["buildID"]))
    # Not started yet: waiting, and a template with an unstarted build can still be deleted.
    st = api.get(f"/templates/{builds[0][0]}/builds/{builds[0][1]}/status").json()
    assert st["status"] == "waiting" and st["logEntries"] == []
    marker = uuid.uuid4().hex  # a fresh step, never cached
    steps = [{"type": "RUN", "args": [f"sleep 2 && echo {marker}"], "force": False}]
    for tid, bid in builds:
        r = api.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "base", "force": False, "steps": steps})
        assert r.status_code == 202, r.text
    tid, bid = builds[0]
    r = api.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "base", "steps": steps})
    assert r.status_code == 409
    # While the first builds, the second waits, and the first's template cannot be deleted.
    seen = set()
    tried_delete = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        a = api.get(f"/templates/{builds[0][0]}/builds/{builds[0][1]}/status").json()["status"]
        b = api.get(f"/templates/{builds[1][0]}/builds/{builds[1][1]}/status").json()["status"]
        if a == "building":
            seen.add(b)
            # Once, as soon as it builds: the build takes seconds (its step
            # sleeps 2 s), so it cannot have finished in between; a try on
            # every poll could race the build's end and rightly get 204.
            if not tried_delete:
                tried_delete = True
                r = api.delete(f"/templates/{builds[0][0]}")
                assert r.status_code == 409 and "being built" in r.json()["message"]
        if a in ("ready", "error") and b in ("ready", "error"):
            break
        time.sleep(0.2)
    assert (a, b) == ("ready", "ready")
    assert "waiting" in seen and "building" not in seen, seen
    # The log of a build, page by page and by level; the second build reused the first's layer.
    logs = api.get(f"/templates/{builds[0][0]}/builds/{builds[0][1]}/status?logsOffset=0&limit=100").json()
    assert marker in [e["message"] for e in logs["logEntries"]], logs
    logs = api.get(f"/templates/{builds[1][0]}/builds/{builds[1][1]}/status?logsOffset=0&limit=100").json()
    messages = [e["message"] for e in logs["logEntries"]]
    assert "CACHED" in messages and marker not in messages, messages
    assert any(e.get("step") == "1" for e in logs["logEntries"])
    page = api.get(f"/templates/{builds[1][0]}/builds/{builds[1][1]}/status?logsOffset=1&limit=2").json()
    assert [e["message"] for e in page["logEntries"]] == messages[1:3]
    warn = api.get(f"/templates/{builds[1][0]}/builds/{builds[1][1]}/status?level=warn").json()
    assert all(e["level"] in ("warn", "error") for e in warn["logEntries"])
    # Other teams see nothing of it.
    with httpx.Client(base_url=API_URL, headers={"X-API-KEY": OTHER_KEY}, timeout=30) as other:
        assert other.get(f"/templates/{builds[1][0]}/builds/{builds[1][1]}/status").status_code == 404
