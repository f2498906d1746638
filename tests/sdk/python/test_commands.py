"""commands.*: run, exit codes, output, background handles, stdin, kill, list,
connect, env, cwd, users, timeouts, quoting and odd output."""

import shlex
import threading
import time
import uuid

import pytest

from e2b import (
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from helpers import SANDBOX_HOME, SANDBOX_USER, unique, wait_until


# --- run, exit codes, stdout/stderr -----------------------------------------


def test_run_echo(sandbox):
    r = sandbox.commands.run("echo hello")
    assert r.exit_code == 0
    assert r.stdout == "hello\n"
    assert r.stderr == ""
    assert r.error is None


def test_run_stderr(sandbox):
    r = sandbox.commands.run("echo oops 1>&2")
    assert r.exit_code == 0
    assert r.stdout == ""
    assert r.stderr == "oops\n"


def test_run_stdout_and_stderr(sandbox):
    r = sandbox.commands.run("echo out; echo err >&2; echo out2")
    assert r.stdout == "out\nout2\n"
    assert r.stderr == "err\n"


def test_run_multiline(sandbox):
    r = sandbox.commands.run("printf 'a\\nb\\nc\\n'")
    assert r.stdout.splitlines() == ["a", "b", "c"]


def test_run_no_trailing_newline(sandbox):
    assert sandbox.commands.run("printf abc").stdout == "abc"


def test_run_no_output(sandbox):
    r = sandbox.commands.run("true")
    assert (r.stdout, r.stderr, r.exit_code) == ("", "", 0)


@pytest.mark.parametrize("code", [1, 2, 3, 42, 127, 255])
def test_exit_code_raises(sandbox, code):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run(f"exit {code}")
    assert info.value.exit_code == code
    assert info.value.error == f"exit status {code}"


def test_false_raises(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("false")
    assert info.value.exit_code == 1


def test_exit_exception_keeps_output(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo -n partial; echo bad >&2; exit 4")
    e = info.value
    assert e.exit_code == 4
    assert e.stdout == "partial"
    assert e.stderr == "bad\n"
    assert "bad" in str(e)


def test_unknown_command_exit_127(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("kiln-no-such-command-xyz")
    assert info.value.exit_code == 127
    assert "not found" in info.value.stderr


def test_killed_by_signal_exit_code(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("kill -9 $$")
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"


def test_terminated_by_sigterm(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("kill -TERM $$")
    assert info.value.exit_code == -1
    assert info.value.error == "signal: terminated"


def test_output_flushed_before_exit(sandbox):
    # Output written just before exit must never be lost.
    for i in range(20):
        assert sandbox.commands.run(f"echo line-{i}").stdout == f"line-{i}\n"


def test_sequential_runs(sandbox):
    outs = [sandbox.commands.run(f"echo $(( {i} * 2 ))").stdout for i in range(10)]
    assert outs == [f"{i * 2}\n" for i in range(10)]


def test_concurrent_runs(sandbox):
    results = {}
    errors = []

    def work(i):
        try:
            results[i] = sandbox.commands.run(f"sleep 0.2; echo n{i}").stdout
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == {i: f"n{i}\n" for i in range(8)}


# --- callbacks ----------------------------------------------------------------


def test_on_stdout_callback(sandbox):
    chunks = []
    r = sandbox.commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.05; done", on_stdout=chunks.append
    )
    assert "".join(chunks) == "1\n2\n3\n" == r.stdout


def test_on_stderr_callback(sandbox):
    out, err = [], []
    sandbox.commands.run(
        "echo a; echo b >&2", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == "a\n"
    assert "".join(err) == "b\n"


def test_retain_output_false(sandbox):
    chunks = []
    r = sandbox.commands.run("echo kept", on_stdout=chunks.append, retain_output=False)
    assert r.stdout is None and r.stderr is None
    assert "".join(chunks) == "kept\n"


def test_iterate_handle(sandbox):
    h = sandbox.commands.run("echo x; echo y >&2", background=True)
    stdout, stderr = "", ""
    for out, err, _pty in h:
        stdout += out or ""
        stderr += err or ""
    assert (stdout, stderr) == ("x\n", "y\n")


# --- odd output -----------------------------------------------------------------


def test_broken_utf8(sandbox):
    r = sandbox.commands.run(r"printf 'ok \xff\xfe end'")
    assert r.stdout == "ok \ufffd\ufffd end"


def test_utf8_split_across_writes(sandbox):
    # The euro sign's bytes arrive in two separate writes: raw bytes must pass
    # through so the SDK's incremental decoder can join them.
    r = sandbox.commands.run(r"printf '\xe2\x82'; sleep 0.2; printf '\xac'")
    assert r.stdout == "€"


def test_unicode_output(sandbox):
    assert sandbox.commands.run("echo 'ü 漢字 🎉'").stdout == "ü 漢字 🎉\n"


def test_long_output(sandbox):
    r = sandbox.commands.run("seq 1 100000")
    lines = r.stdout.splitlines()
    assert len(lines) == 100000
    assert lines[0] == "1" and lines[-1] == "100000"


def test_very_long_line(sandbox):
    r = sandbox.commands.run("head -c 1000000 /dev/zero | tr '\\0' a")
    assert r.stdout == "a" * 1_000_000


def test_long_stderr(sandbox):
    r = sandbox.commands.run("seq 1 20000 >&2")
    assert len(r.stderr.splitlines()) == 20000


def test_binary_output_length(sandbox):
    # 256 KiB of arbitrary bytes: every byte arrives (as text with replacements).
    r = sandbox.commands.run("head -c 262144 /dev/urandom | base64 -w0 | wc -c")
    assert int(r.stdout.strip()) == 349528


# --- quoting --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "$HOME",
        "a b  c",
        "single'quote",
        'double"quote',
        "back\\slash",
        "tab\there",
        "star * and ?",
        "semi; colon && pipe | amp &",
        "`backtick`",
        "ü 漢字 🎉",
        "$(echo injected)",
        "new\nline",
    ],
)
def test_quoting_roundtrip(sandbox, text):
    r = sandbox.commands.run(f"printf %s {shlex.quote(text)}")
    assert r.stdout == text


def test_pipes_and_redirection(sandbox):
    r = sandbox.commands.run("printf 'b\\na\\nc\\n' | sort | tr a-z A-Z")
    assert r.stdout == "A\nB\nC\n"


def test_subshell_and_variables(sandbox):
    r = sandbox.commands.run('X=41; echo $((X + 1)) "$(echo sub)"')
    assert r.stdout == "42 sub\n"


# --- env, cwd, users ------------------------------------------------------------


def test_env_per_command(sandbox):
    r = sandbox.commands.run("echo $KILN_FOO", envs={"KILN_FOO": "bar"})
    assert r.stdout == "bar\n"


def test_env_multiple_and_special_values(sandbox):
    envs = {"KILN_A": "1", "KILN_B": "with space", "KILN_C": "quote'\"$x"}
    r = sandbox.commands.run(
        'printf "%s|%s|%s" "$KILN_A" "$KILN_B" "$KILN_C"', envs=envs
    )
    assert r.stdout == "1|with space|quote'\"$x"


def test_env_not_leaking_between_commands(sandbox):
    sandbox.commands.run("true", envs={"KILN_LEAK": "yes"})
    assert sandbox.commands.run("echo ${KILN_LEAK:-unset}").stdout == "unset\n"


def test_default_env(sandbox):
    r = sandbox.commands.run('printf "%s|%s|%s" "$HOME" "$USER" "$PATH"')
    home, user, path = r.stdout.split("|")
    assert home == SANDBOX_HOME
    assert user == SANDBOX_USER
    assert "/usr/bin" in path.split(":")


def test_default_user_is_user(sandbox, user_ids):
    r = sandbox.commands.run("whoami; id -u; id -g")
    name, uid, gid = r.stdout.split()
    assert name == SANDBOX_USER
    assert (int(uid), int(gid)) == user_ids


def test_default_cwd_is_home(sandbox):
    assert sandbox.commands.run("pwd").stdout == f"{SANDBOX_HOME}\n"


def test_explicit_user(sandbox):
    assert sandbox.commands.run("whoami", user=SANDBOX_USER).stdout == "user\n"


@pytest.mark.root
def test_root_user(sandbox):
    r = sandbox.commands.run("whoami; pwd; id -u", user="root")
    assert r.stdout.split() == ["root", "/root", "0"]


def test_unknown_user(sandbox):
    with pytest.raises(AuthenticationException) as info:
        sandbox.commands.run("true", user="kiln-no-such-user")
    assert "kiln-no-such-user" in str(info.value)


def test_cwd(sandbox):
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"


def test_cwd_tilde(sandbox, test_dir):
    rel = test_dir.removeprefix(SANDBOX_HOME + "/")
    assert sandbox.commands.run("pwd", cwd=f"~/{rel}").stdout == f"{test_dir}\n"


def test_cwd_relative_to_home(sandbox, test_dir):
    rel = test_dir.removeprefix(SANDBOX_HOME + "/")
    assert sandbox.commands.run("pwd", cwd=rel).stdout == f"{test_dir}\n"


def test_cwd_missing(sandbox):
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.commands.run("pwd", cwd="/kiln/does/not/exist")
    assert "/kiln/does/not/exist" in str(info.value)


def test_command_sees_files_written_by_sdk(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/f.txt", "from sdk")
    assert sandbox.commands.run(f"cat {test_dir}/f.txt").stdout == "from sdk"


# --- timeouts ---------------------------------------------------------------------


def test_timeout_raises(sandbox):
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 10", timeout=2)
    # Not a speed check: the command must not have run to completion.
    assert time.monotonic() - start < 9


def test_timeout_kills_process(sandbox):
    marker = unique("timeout")
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep 30 # {marker}", timeout=1)

    def gone():
        return not any(marker in " ".join(p.args) for p in sandbox.commands.list())

    assert wait_until(gone, timeout=10), "the timed-out process is still running"


def test_timeout_zero_means_unlimited(sandbox):
    assert sandbox.commands.run("sleep 1; echo done", timeout=0).stdout == "done\n"


def test_background_grandchild_does_not_block(sandbox):
    # A background grandchild keeps stdout open; the command itself is done.
    r = sandbox.commands.run("sleep 12 & echo started", timeout=8)
    assert r.stdout == "started\n"


# --- background handles, wait, kill, list, connect -------------------------------


def test_background_wait(sandbox):
    h = sandbox.commands.run("sleep 0.3; echo done", background=True)
    assert h.pid > 0
    r = h.wait()
    assert r.stdout == "done\n"
    assert r.exit_code == 0


def test_background_pid_is_shell_pid(sandbox):
    h = sandbox.commands.run("echo $$", background=True)
    assert h.wait().stdout.strip() == str(h.pid)


def test_background_wait_nonzero(sandbox):
    h = sandbox.commands.run("sleep 0.1; exit 5", background=True)
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == 5


def test_background_wait_callbacks(sandbox):
    h = sandbox.commands.run("echo a; echo b >&2", background=True)
    out, err = [], []
    h.wait(on_stdout=out.append, on_stderr=err.append)
    assert ("".join(out), "".join(err)) == ("a\n", "b\n")


def test_handle_kill(sandbox):
    h = sandbox.commands.run("sleep 30", background=True)
    assert h.kill() is True
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"


def test_commands_kill_by_pid(sandbox):
    h = sandbox.commands.run("sleep 30", background=True)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()


def test_kill_kills_children(sandbox):
    # A unique sleep duration identifies the grandchild in the process table.
    secs = f"29.{uuid.uuid4().int % 1_000_000:06d}"
    h = sandbox.commands.run(f"sleep {secs} & wait", background=True)
    assert wait_until(lambda: _pgrep(sandbox, f"sleep {secs}")), "child never started"
    assert sandbox.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()
    assert wait_until(lambda: not _pgrep(sandbox, f"sleep {secs}"), timeout=5)


def _pgrep(sandbox, pattern):
    # Split the pattern in the shell text so the shell itself never matches.
    head, tail = pattern[:3], pattern[3:]
    r = sandbox.commands.run(f"pgrep -f -- '{head}''{tail}' || true")
    return r.stdout.split()


def test_kill_unknown_pid(sandbox):
    assert sandbox.commands.kill(999_999) is False


def test_list_contains_running_command(sandbox):
    marker = unique("list")
    cmd = f"sleep 20 # {marker}"
    h = sandbox.commands.run(cmd, background=True, envs={"KILN_LIST": "1"}, cwd="/tmp")
    try:
        procs = {p.pid: p for p in sandbox.commands.list()}
        assert h.pid in procs
        p = procs[h.pid]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", cmd]
        assert p.envs.get("KILN_LIST") == "1"
        assert p.cwd == "/tmp"
        assert p.tag is None
    finally:
        h.kill()


def test_list_drops_finished_command(sandbox):
    h = sandbox.commands.run("sleep 0.1", background=True)
    h.wait()
    assert wait_until(lambda: h.pid not in {p.pid for p in sandbox.commands.list()})


def test_connect_to_running_command(sandbox):
    h = sandbox.commands.run(
        "sleep 0.5; for i in 1 2 3; do echo tick$i; sleep 0.2; done", background=True
    )
    h.disconnect()
    c = sandbox.commands.connect(h.pid)
    assert c.pid == h.pid
    r = c.wait()
    assert "tick3" in r.stdout
    assert r.exit_code == 0


def test_connect_sees_exit_code(sandbox):
    h = sandbox.commands.run("sleep 0.5; exit 7", background=True)
    c = sandbox.commands.connect(h.pid)
    with pytest.raises(CommandExitException) as info:
        c.wait()
    assert info.value.exit_code == 7


def test_connect_and_kill(sandbox):
    h = sandbox.commands.run("sleep 30", background=True)
    c = sandbox.commands.connect(h.pid)
    assert c.kill() is True
    with pytest.raises(CommandExitException) as info:
        c.wait()
    assert info.value.exit_code == -1


def test_connect_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)


def test_process_outlives_disconnect(sandbox, test_dir):
    h = sandbox.commands.run(
        f"sleep 0.5; echo survived > {test_dir}/out", background=True
    )
    h.disconnect()
    assert wait_until(
        lambda: sandbox.files.exists(f"{test_dir}/out"), timeout=10
    ), "the process did not outlive its stream"
    assert sandbox.files.read(f"{test_dir}/out") == "survived\n"


# --- stdin --------------------------------------------------------------------------


def test_stdin_send_and_close(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello\n")
    sandbox.commands.send_stdin(h.pid, "world\n")
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello\nworld\n"


def test_stdin_via_handle(sandbox):
    h = sandbox.commands.run("wc -c", background=True, stdin=True)
    h.send_stdin("12345")
    h.send_stdin(b"\x00\xff\x01")
    h.close_stdin()
    assert h.wait().stdout.strip() == "8"


def test_stdin_line_by_line(sandbox):
    h = sandbox.commands.run("read a; echo got:$a; read b; echo got:$b", background=True, stdin=True)
    h.send_stdin("first\n")
    h.send_stdin("second\n")
    assert h.wait().stdout == "got:first\ngot:second\n"


def test_stdin_default_is_closed(sandbox):
    # SDK 2.x sends stdin=false: the command sees EOF at once instead of hanging.
    assert sandbox.commands.run("cat; echo eof", timeout=10).stdout == "eof\n"


def test_send_stdin_without_stdin_fails(sandbox):
    h = sandbox.commands.run("sleep 5", background=True)
    try:
        with pytest.raises(SandboxException):
            sandbox.commands.send_stdin(h.pid, "x")
    finally:
        h.kill()


def test_send_stdin_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(999_999, "x")


# --- async ------------------------------------------------------------------------


async def test_async_run(async_sandbox):
    r = await async_sandbox.commands.run("echo async; exit 0")
    assert r.stdout == "async\n"


async def test_async_exit_code(async_sandbox):
    with pytest.raises(CommandExitException) as info:
        await async_sandbox.commands.run("exit 9")
    assert info.value.exit_code == 9


async def test_async_background_callbacks(async_sandbox):
    out = []
    h = await async_sandbox.commands.run(
        "for i in 1 2; do echo $i; sleep 0.1; done", background=True, on_stdout=out.append
    )
    r = await h.wait()
    assert r.stdout == "1\n2\n"
    assert "".join(out) == "1\n2\n"


async def test_async_stdin(async_sandbox):
    h = await async_sandbox.commands.run("cat", background=True, stdin=True)
    await async_sandbox.commands.send_stdin(h.pid, "async in")
    await async_sandbox.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "async in"


async def test_async_timeout(async_sandbox):
    with pytest.raises(TimeoutException):
        await async_sandbox.commands.run("sleep 10", timeout=2)
