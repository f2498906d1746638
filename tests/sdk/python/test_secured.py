"""Access token, signed file URLs and POST /init.

Debug mode has no access token, so this module starts its own envd (the binary
in $KILN_ENVD_BIN, else target/debug/envd) on a spare port, sets a token
through POST /init, and builds SDK sandbox objects that carry that token. The
shared envd on 49983 is never given a token, so other modules are unaffected.
"""

import base64
import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from e2b import AuthenticationException, ConnectionConfig, Sandbox
from e2b.envd.versions import ENVD_DEBUG_FALLBACK

from helpers import SANDBOX_HOME, unique

REPO_ROOT = Path(__file__).resolve().parents[3]
UNAUTHORIZED = {
    "code": 401,
    "message": "unauthorized access, please provide a valid access token or method signing if supported",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Envd:
    def __init__(self):
        binary = os.environ.get("KILN_ENVD_BIN") or str(REPO_ROOT / "target/debug/envd")
        if not os.access(binary, os.X_OK):
            pytest.fail(f"envd binary not found at {binary} (set KILN_ENVD_BIN)")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-envd-secured-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "--addr", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 204:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"private envd did not start; log:\n{Path(self.log.name).read_text()}")
            time.sleep(0.1)

    def init(self, body: dict, token: str | None = None) -> httpx.Response:
        headers = {"X-Access-Token": token} if token else {}
        return httpx.post(f"{self.url}/init", json=body, headers=headers, timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def envd():
    server = Envd()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token(envd):
    value = secrets.token_hex(16)
    r = envd.init({"accessToken": value})
    assert r.status_code == 204, r.text
    return value


def make_sandbox(envd: Envd, token: str | None) -> Sandbox:
    """An SDK sandbox object as `Sandbox.create()` would build it, for envd at
    `envd.url` with envd access token `token`."""
    headers = {"E2b-Sandbox-Id": "debug_sandbox_id", "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(debug=True, sandbox_url=envd.url, extra_sandbox_headers=headers)
    return Sandbox(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=ENVD_DEBUG_FALLBACK,
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=config,
    )


@pytest.fixture(scope="module")
def secured(envd, token):
    return make_sandbox(envd, token)


@pytest.fixture
def work_dir(secured):
    path = f"{SANDBOX_HOME}/kiln-sdk-tests/{unique('secured')}"
    secured.files.make_dir(path)
    yield path
    secured.files.remove(path)


# --- access token ---------------------------------------------------------------------


def test_health_needs_no_token(envd, token):
    assert httpx.get(f"{envd.url}/health").status_code == 204


def test_rpc_with_token(secured):
    assert secured.commands.run("echo secured").stdout == "secured\n"


def test_files_with_token(secured, work_dir):
    secured.files.write(f"{work_dir}/t.txt", "with token")
    assert secured.files.read(f"{work_dir}/t.txt") == "with token"


def test_rpc_without_token_rejected(envd, token):
    with pytest.raises(AuthenticationException):
        make_sandbox(envd, None).commands.run("true")


def test_rpc_wrong_token_rejected(envd, token):
    with pytest.raises(AuthenticationException):
        make_sandbox(envd, "wrong-" + token).files.list("/")


def test_rpc_without_token_raw_body(envd, token):
    r = httpx.post(
        f"{envd.url}/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={"Connect-Protocol-Version": "1"},
    )
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED


def test_files_read_without_token_rejected(envd, token, secured, work_dir):
    secured.files.write(f"{work_dir}/secret.txt", "s")
    with pytest.raises(AuthenticationException):
        make_sandbox(envd, None).files.read(f"{work_dir}/secret.txt")


def test_files_without_token_or_signature(envd, token):
    r = httpx.get(f"{envd.url}/files", params={"path": "/etc/hostname"})
    assert r.status_code == 401
    assert r.json()["code"] == 401
    assert "signature" in r.json()["message"]


def test_envs_requires_token(envd, token):
    r = httpx.get(f"{envd.url}/envs")
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED
    assert httpx.get(f"{envd.url}/envs", headers={"X-Access-Token": token}).status_code == 200


def test_metrics_requires_token(envd, token):
    assert httpx.get(f"{envd.url}/metrics").status_code == 401
    r = httpx.get(f"{envd.url}/metrics", headers={"X-Access-Token": token})
    assert r.status_code == 200
    body = r.json()
    assert body["cpu_count"] >= 1
    assert body["mem_total"] > 0


# --- signed URLs ------------------------------------------------------------------------


def test_download_url_signed(secured, work_dir):
    path = f"{work_dir}/signed.txt"
    secured.files.write(path, "signed content")
    url = secured.download_url(path)
    assert "signature=v1_" in url
    r = httpx.get(url)  # no headers at all
    assert r.status_code == 200, r.text
    assert r.text == "signed content"


def test_upload_url_signed(secured, work_dir):
    path = f"{work_dir}/uploaded.txt"
    r = httpx.post(secured.upload_url(path), files={"file": ("uploaded.txt", b"via signed url")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == path
    assert secured.files.read(path) == "via signed url"


def test_signed_url_with_expiration(secured, work_dir):
    path = f"{work_dir}/exp.txt"
    secured.files.write(path, "not yet expired")
    url = secured.download_url(path, use_signature_expiration=120)
    assert "signature_expiration=" in url
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    assert r.text == "not yet expired"


def test_upload_url_with_expiration(secured, work_dir):
    path = f"{work_dir}/exp-up.txt"
    url = secured.upload_url(path, use_signature_expiration=120)
    r = httpx.post(url, files={"file": ("x", b"expiring upload")})
    assert r.status_code == 200, r.text
    assert secured.files.read(path) == "expiring upload"


def test_expired_signature(secured, work_dir):
    path = f"{work_dir}/expired.txt"
    secured.files.write(path, "x")
    r = httpx.get(secured.download_url(path, use_signature_expiration=-120))
    assert r.status_code == 401
    assert r.text.strip() == '{"code":401,"message":"signature is already expired"}'
    assert r.json() == {"code": 401, "message": "signature is already expired"}


def test_expired_upload_signature(secured, work_dir):
    path = f"{work_dir}/expired-up.txt"
    r = httpx.post(secured.upload_url(path, use_signature_expiration=-60), files={"file": ("x", b"x")})
    assert r.status_code == 401
    assert r.json() == {"code": 401, "message": "signature is already expired"}
    assert secured.files.exists(path) is False


def _with_query(url: str, **changes) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def test_tampered_signature(secured, work_dir):
    path = f"{work_dir}/tamper.txt"
    secured.files.write(path, "x")
    url = secured.download_url(path)
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["signature"]
    r = httpx.get(_with_query(url, signature=sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")))
    assert r.status_code == 401


def test_signature_bound_to_path(secured, work_dir):
    secured.files.write(f"{work_dir}/a.txt", "a")
    secured.files.write(f"{work_dir}/b.txt", "b")
    url = secured.download_url(f"{work_dir}/a.txt")
    r = httpx.get(_with_query(url, path=f"{work_dir}/b.txt"))
    assert r.status_code == 401


def test_signature_bound_to_operation(secured, work_dir):
    path = f"{work_dir}/op.txt"
    read_url = secured.download_url(path)
    r = httpx.post(read_url, files={"file": ("x", b"sneaky")})
    assert r.status_code == 401
    assert secured.files.exists(path) is False


def test_signature_bound_to_expiration(secured, work_dir):
    path = f"{work_dir}/exp-bound.txt"
    secured.files.write(path, "x")
    url = secured.download_url(path, use_signature_expiration=60)
    r = httpx.get(_with_query(url, signature_expiration=str(int(time.time()) + 3600)))
    assert r.status_code == 401


def test_signature_bound_to_user(secured, work_dir):
    path = f"{work_dir}/user.txt"
    secured.files.write(path, "x")
    url = secured.download_url(path, user="user")
    assert httpx.get(url).status_code == 200
    assert httpx.get(_with_query(url, username="root")).status_code == 401


def test_signed_url_as_root(secured):
    path = f"/root/{unique('kiln-signed')}.txt"
    secured.files.write(path, "root only", user="root")
    try:
        r = httpx.get(secured.download_url(path, user="root"))
        assert r.status_code == 200, r.text
        assert r.text == "root only"
    finally:
        secured.files.remove(path, user="root")


def test_header_token_works_for_files(envd, token, secured, work_dir):
    path = f"{work_dir}/hdr.txt"
    secured.files.write(path, "hdr")
    r = httpx.get(f"{envd.url}/files", params={"path": path}, headers={"X-Access-Token": token})
    assert r.status_code == 200
    assert r.text == "hdr"


# --- POST /init -------------------------------------------------------------------------


def test_init_requires_current_token(envd, token):
    r = envd.init({"accessToken": "hijack"})
    assert r.status_code == 401
    r = envd.init({"accessToken": "hijack"}, token="wrong")
    assert r.status_code == 401
    # The original token still works.
    assert make_sandbox(envd, token).commands.run("echo ok").stdout == "ok\n"


def test_init_token_rotation(envd, token):
    new = secrets.token_hex(16)
    assert envd.init({"accessToken": new}, token=token).status_code == 204
    try:
        assert make_sandbox(envd, new).commands.run("echo rotated").stdout == "rotated\n"
        with pytest.raises(AuthenticationException):
            make_sandbox(envd, token).commands.run("true")
    finally:
        assert envd.init({"accessToken": token}, token=new).status_code == 204
    assert make_sandbox(envd, token).commands.run("echo back").stdout == "back\n"


def test_init_env_vars(envd, token, secured):
    body = {"envVars": {"KILN_SBX_VAR": "from-init", "KILN_SBX_OVERRIDE": "sandbox"}}
    assert envd.init(body, token=token).status_code == 204
    r = secured.commands.run('echo "$KILN_SBX_VAR $KILN_SBX_OVERRIDE"')
    assert r.stdout == "from-init sandbox\n"
    # Per-command envs win over sandbox env vars.
    r = secured.commands.run('echo "$KILN_SBX_OVERRIDE"', envs={"KILN_SBX_OVERRIDE": "command"})
    assert r.stdout == "command\n"
    envs = httpx.get(f"{envd.url}/envs", headers={"X-Access-Token": token}).json()
    assert envs.get("KILN_SBX_VAR") == "from-init"


def test_init_default_workdir(envd, token, secured, work_dir):
    assert envd.init({"defaultWorkdir": work_dir}, token=token).status_code == 204
    try:
        assert secured.commands.run("pwd").stdout == f"{work_dir}\n"
    finally:
        assert envd.init({"defaultWorkdir": SANDBOX_HOME}, token=token).status_code == 204
    assert secured.commands.run("pwd").stdout == f"{SANDBOX_HOME}\n"


@pytest.mark.root
def test_init_default_user(envd, token, secured):
    assert envd.init({"defaultUser": "root"}, token=token).status_code == 204
    try:
        assert secured.commands.run("id -u").stdout == "0\n"
    finally:
        assert envd.init({"defaultUser": "user"}, token=token).status_code == 204
    assert secured.commands.run("whoami").stdout == "user\n"


def test_init_unknown_default_user(envd, token, secured):
    r = envd.init({"defaultUser": "kiln-no-such-user"}, token=token)
    assert r.status_code == 400
    assert secured.commands.run("whoami").stdout == "user\n"


def test_init_entropy_extension(envd, token):
    body = {"entropy": base64.b64encode(os.urandom(64)).decode()}
    assert envd.init(body, token=token).status_code == 204


def test_init_ignores_unknown_fields(envd, token):
    # (hyperloopIP is left out on purpose: E2B's envd edits /etc/hosts for it.)
    body = {"lifecycleID": "x", "somethingNew": {"a": 1}}
    assert envd.init(body, token=token).status_code == 204


def test_init_rejects_malformed_json(envd, token):
    r = httpx.post(
        f"{envd.url}/init",
        content=b"{not json",
        headers={"Content-Type": "application/json", "X-Access-Token": token},
    )
    assert 400 <= r.status_code < 500  # a client error, never a crash
    assert httpx.get(f"{envd.url}/health").status_code == 204
