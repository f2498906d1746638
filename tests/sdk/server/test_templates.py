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
    (tmp_path / "hello.txt").write_text("hello from the build context\n")
    name = unique("steps")
    names.append(name)

    def template():
        return (
            Template(file_context_path=tmp_path)
            .from_base_image()
            .run_cmd("sleep 3 && echo built > /opt/built.txt")
            .copy("hello.txt", "/opt/app/hello.txt")
            .set_envs({"GREETING": "hi there", "TOOL": "kiln"})
            .set_workdir("/opt/app")
        )

    first_logs = []
    first = build(template(), name, first_logs)
    assert Template.exists(name)
    sbx = Sandbox.create(name, timeout=120)
    try:
        assert run(sbx, "cat /opt/built.txt") == "built\n"
        assert run(sbx, "cat hello.txt") == "hello from the build context\n"
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
        assert run(sbx, "cat /opt/built.txt") == "built\n"
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
    link = api.get(f"/templates/{tid}/files/{'cd' * 32}")
    assert link.status_code == 201 and link.json()["present"] is False
    url = link.json()["url"]
    assert url.startswith(API_URL)
    assert httpx.put(url.split("?")[0], content=b"x").status_code == 403
    assert httpx.put(url, content=b"not a tar").status_code == 200
    assert api.get(f"/templates/{tid}/files/{'cd' * 32}").json()["present"] is True

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
