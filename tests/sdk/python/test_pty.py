"""pty.*: create, input, output, resize, connect, kill."""

import asyncio
import threading
import time

import pytest

from e2b import CommandExitException, PtySize, SandboxException

from helpers import SANDBOX_HOME, unique


class PtyReader:
    """Collects a PTY's output on a thread so tests can wait for text in it."""

    def __init__(self, handle):
        self.handle = handle
        self.buf = b""
        self.cond = threading.Condition()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for _out, _err, pty in self.handle:
                if pty:
                    with self.cond:
                        self.buf += pty
                        self.cond.notify_all()
        except Exception as e:  # surfaced by wait_for / join
            self.error = e
        with self.cond:
            self.cond.notify_all()

    def text(self):
        return self.buf.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while needle not in self.text():
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    return needle in self.text()
                self.cond.wait(left)
        return True


def _send(sandbox, pid, line: str):
    sandbox.pty.send_stdin(pid, line.encode())


@pytest.fixture
def pty(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    reader = PtyReader(handle)
    yield handle, reader
    try:
        sandbox.pty.kill(handle.pid)
    except Exception:
        pass


def test_pty_echo(sandbox, pty):
    handle, reader = pty
    assert handle.pid > 0
    _send(sandbox, handle.pid, "echo pty-$((6*7))\n")
    assert reader.wait_for("pty-42"), reader.text()


def test_pty_is_a_terminal(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, "[ -t 0 ] && [ -t 1 ] && echo IS-$((1))-TTY\n")
    assert reader.wait_for("IS-1-TTY"), reader.text()


def test_pty_default_env(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, 'echo "term=$TERM;lang=$LANG;"\n')
    assert reader.wait_for("term=xterm-256color;lang=C.UTF-8;"), reader.text()


def test_pty_user_and_cwd(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, 'echo "who=$(whoami) dir=$(pwd) end"\n')
    assert reader.wait_for(f"who=user dir={SANDBOX_HOME} end"), reader.text()


def test_pty_initial_size(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, "echo size=$(stty size)=\n")
    assert reader.wait_for("size=24 80="), reader.text()


def test_pty_resize(sandbox, pty):
    handle, reader = pty
    sandbox.pty.resize(handle.pid, PtySize(rows=30, cols=100))
    _send(sandbox, handle.pid, "echo size=$(stty size)=\n")
    assert reader.wait_for("size=30 100="), reader.text()


def test_pty_resize_twice(sandbox, pty):
    handle, reader = pty
    sandbox.pty.resize(handle.pid, PtySize(rows=10, cols=40))
    sandbox.pty.resize(handle.pid, PtySize(rows=50, cols=200))
    _send(sandbox, handle.pid, "echo size=$(stty size)=\n")
    assert reader.wait_for("size=50 200="), reader.text()


def test_pty_ctrl_c_interrupts(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, "sleep 30\n")
    time.sleep(0.3)
    sandbox.pty.send_stdin(handle.pid, b"\x03")
    _send(sandbox, handle.pid, "echo after-$((2+2))\n")
    assert reader.wait_for("after-4"), reader.text()


def test_pty_large_output(sandbox, pty):
    handle, reader = pty
    _send(sandbox, handle.pid, "seq 1 20000; echo DONE-$((9*9))\n")
    assert reader.wait_for("DONE-81", timeout=30), reader.text()[-500:]
    assert "19999" in reader.text()


def test_pty_exit_code(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(handle.pid, b"exit 3\n")
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == 3


def test_pty_clean_exit(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(handle.pid, b"exit\n")
    assert handle.wait().exit_code == 0


def test_pty_kill(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    assert sandbox.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"


def test_pty_kill_unknown(sandbox):
    assert sandbox.pty.kill(999_999) is False


def test_pty_create_with_cwd_and_envs(sandbox, test_dir):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), cwd=test_dir, envs={"KILN_PTY": "yes"})
    reader = PtyReader(handle)
    try:
        _send(sandbox, handle.pid, 'echo "at=$(pwd) env=$KILN_PTY end"\n')
        assert reader.wait_for(f"at={test_dir} env=yes end"), reader.text()
    finally:
        sandbox.pty.kill(handle.pid)


def test_pty_in_commands_list(sandbox, pty):
    handle, _reader = pty
    procs = {p.pid: p for p in sandbox.commands.list()}
    assert handle.pid in procs
    assert procs[handle.pid].args == ["-i", "-l"]


def test_pty_connect(sandbox, pty):
    handle, reader = pty
    marker = unique("pty")
    other = sandbox.pty.connect(handle.pid)
    other_reader = PtyReader(other)
    _send(sandbox, handle.pid, f"echo {marker[:4]}''{marker[4:]}\n")
    assert other_reader.wait_for(marker), other_reader.text()
    assert reader.wait_for(marker), reader.text()


def test_pty_rejects_stdin_input(sandbox, pty):
    handle, _reader = pty
    with pytest.raises(SandboxException):
        sandbox.commands.send_stdin(handle.pid, "plain stdin to a pty")


def test_pty_close_stdin_fails(sandbox, pty):
    handle, _reader = pty
    with pytest.raises(SandboxException):
        sandbox.commands.close_stdin(handle.pid)


def test_pty_input_to_plain_process_fails(sandbox):
    h = sandbox.commands.run("sleep 5", background=True, stdin=True)
    try:
        with pytest.raises(SandboxException):
            sandbox.pty.send_stdin(h.pid, b"x")
    finally:
        h.kill()


def test_resize_plain_process_fails(sandbox):
    h = sandbox.commands.run("sleep 5", background=True)
    try:
        with pytest.raises(SandboxException):
            sandbox.pty.resize(h.pid, PtySize(rows=10, cols=10))
    finally:
        h.kill()


async def test_async_pty(async_sandbox):
    data = bytearray()
    handle = await async_sandbox.pty.create(PtySize(rows=24, cols=80), on_data=data.extend)
    try:
        await async_sandbox.pty.send_stdin(handle.pid, b"echo async-$((3*3))-pty\n")
        for _ in range(200):
            if b"async-9-pty" in data:
                break
            await asyncio.sleep(0.05)
        assert b"async-9-pty" in data, data.decode(errors="replace")
    finally:
        assert await async_sandbox.pty.kill(handle.pid) is True
