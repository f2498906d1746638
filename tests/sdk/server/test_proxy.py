"""Sandbox traffic through kiln serve's proxy: envd (commands, files, PTY,
signed URLs) and servers the user runs inside the sandbox."""

import os
import socket
import time
import uuid

import httpx
import pytest

from e2b import CommandExitException, Sandbox, SandboxNotRunningException
from e2b.sandbox.commands.command_handle import PtySize

from conftest import API_URL

SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", "")


def test_commands_through_the_proxy(sandbox):
    r = sandbox.commands.run("echo out; echo err >&2; exit 0")
    assert r.stdout == "out\n" and r.stderr == "err\n" and r.exit_code == 0
    assert sandbox.commands.run("whoami").stdout == "user\n"
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    chunks = []
    sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=chunks.append)
    assert "".join(chunks) == "1\n2\n3\n"


def test_sudo_as_user(sandbox):
    # gVisor ignores set-user-ID bits; Kiln's sudo asks envd instead.
    r = sandbox.commands.run("sudo whoami; echo data | sudo tee /root/owned >/dev/null; sudo cat /root/owned")
    assert r.stdout == "root\ndata\n"
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("sudo sh -c 'echo $SUDO_USER; exit 4'")
    assert failed.value.exit_code == 4 and failed.value.stdout == "user\n"
    # Terminals work too: the command writes to the PTY sudo was given.
    term = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(term.pid, b"sudo -u nobody sh -c 'echo id-$(id -u)'; exit\n")
    out = bytearray()
    term.wait(on_pty=out.extend)
    assert b"id-65534" in out


def test_a_running_command_ends_when_its_sandbox_dies(sandbox):
    # A dead sandbox never closes its connections; the proxy must notice
    # (TCP keepalive) rather than leave the client waiting for the timeout.
    import threading

    outcome = {}

    def run():
        try:
            sandbox.commands.run("sleep 600", timeout=90)
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - any error will do, but not a timeout
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(2)
    Sandbox.kill(sandbox.sandbox_id)
    t.join(120)
    assert not t.is_alive()
    err = outcome["error"]
    assert err is not None and "timed out" not in str(err).lower(), repr(err)


def test_stdin_and_kill_through_the_proxy(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "ping\n")
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "ping\n"
    sleeper = sandbox.commands.run("sleep 600", background=True)
    assert sandbox.commands.kill(sleeper.pid)


def test_files_through_the_proxy(sandbox):
    data = os.urandom(3 * 1024 * 1024)
    sandbox.files.write("/home/user/blob.bin", data)
    assert sandbox.files.read("/home/user/blob.bin", format="bytes") == data
    names = [e.name for e in sandbox.files.list("/home/user")]
    assert "blob.bin" in names
    sandbox.files.make_dir("/home/user/d/e")
    assert sandbox.files.exists("/home/user/d/e")
    sandbox.files.remove("/home/user/d")
    assert not sandbox.files.exists("/home/user/d")


def test_watch_through_the_proxy(sandbox):
    sandbox.files.make_dir("/home/user/w")
    handle = sandbox.files.watch_dir("/home/user/w")
    sandbox.files.write("/home/user/w/new.txt", "x")
    events = []
    deadline = time.monotonic() + 5
    while not any(e.name == "new.txt" for e in events) and time.monotonic() < deadline:
        events.extend(handle.get_new_events())
        time.sleep(0.05)
    handle.stop()
    assert any(e.name == "new.txt" for e in events)


def test_pty_through_the_proxy(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=100))
    sandbox.pty.send_stdin(handle.pid, b"echo pty-$((6*7)); stty size; exit\n")
    out = bytearray()
    handle.wait(on_pty=out.extend)
    assert b"pty-42" in out
    assert b"40 100" in out


def test_signed_urls_without_sandbox_headers(sandbox):
    sandbox.files.write("/home/user/signed.txt", "signed content")
    url = sandbox.download_url("/home/user/signed.txt", use_signature_expiration=60)
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    assert r.text == "signed content"
    up = sandbox.upload_url("/home/user/uploaded.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("uploaded.txt", b"via signed url")})
    assert r.status_code == 200, r.text
    assert sandbox.files.read("/home/user/uploaded.txt") == "via signed url"
    # A signature for another path matches no sandbox's token.
    bad = url.replace("signed.txt", "other.txt")
    r = httpx.get(bad)
    assert r.status_code in (401, 404)


def _start_http_server(sandbox, port):
    sandbox.files.write("/home/user/www/index.html", f"hello from port {port}")
    sandbox.commands.run(f"cd /home/user/www && python3 -m http.server {port}", background=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = sandbox.commands.run(f"curl -s -o /dev/null -w '%{{http_code}}' localhost:{port}/index.html || true")
        if r.stdout.strip() == "200":
            return
        time.sleep(0.1)
    raise AssertionError("http server did not start")


def test_user_port_by_headers_and_host_name(sandbox):
    _start_http_server(sandbox, 8000)
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8000"}
    r = httpx.get(f"{SANDBOX_URL}/index.html", headers=headers)
    assert r.status_code == 200 and r.text == "hello from port 8000"
    # Host routing: <port>-<sandboxId>.<domain>
    r = httpx.get(f"{SANDBOX_URL}/index.html", headers={"Host": f"8000-{sandbox.sandbox_id}.kiln.test"})
    assert r.status_code == 200 and r.text == "hello from port 8000"


def test_closed_port_and_unknown_sandbox(sandbox):
    r = httpx.get(SANDBOX_URL, headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8123"})
    assert r.status_code == 502
    assert "port is not open" in r.json()["message"]
    r = httpx.get(SANDBOX_URL, headers={"E2b-Sandbox-Id": "bbbbbbbbbbbbbbbbbbbb", "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502
    assert r.json() == {"sandboxId": "bbbbbbbbbbbbbbbbbbbb", "message": "The sandbox was not found", "code": 502}


def test_paused_sandbox_answers_502(sandbox):
    sandbox.pause()
    r = httpx.get(f"{SANDBOX_URL}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    with pytest.raises(SandboxNotRunningException):
        sandbox.commands.run("true")


UPGRADE_SERVER = r'''
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(8)
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(1024)
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
    while True:
        d = c.recv(1024)
        if not d: break
        c.sendall(d.upper())
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def test_upgraded_connections_are_spliced(sandbox):
    """WebSocket-style upgrades: after 101 the proxy carries raw bytes both ways."""
    sandbox.files.write("/home/user/upgrade.py", UPGRADE_SERVER)
    sandbox.commands.run("python3 /home/user/upgrade.py", background=True)
    host, port = API_URL.removeprefix("http://").split(":")
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(
                (
                    "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n"
                    f"E2b-Sandbox-Id: {sandbox.sandbox_id}\r\nE2b-Sandbox-Port: 9000\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(1024)
                if not chunk:
                    break
                head += chunk
            if head.startswith(b"HTTP/1.1 101"):
                for word in [b"hello", b"kiln"]:
                    c.sendall(word)
                    got = b""
                    while len(got) < len(word):
                        got += c.recv(1024)
                    assert got == word.upper()
                return
        assert time.monotonic() < deadline, f"no upgrade: {head[:200]!r}"
        time.sleep(0.2)


def test_missing_port_header_is_an_error(sandbox):
    r = httpx.get(SANDBOX_URL, headers={"E2b-Sandbox-Id": sandbox.sandbox_id})
    assert r.status_code == 400 and r.json()["code"] == 400
