"""How envd starts processes: the child's identity (ids, groups, capabilities),
process group, signal state, program lookup and start errors. Some tests start
a program directly (not through `bash -l -c`), through the SDK's own RPC client."""

import os
import pwd

import pytest

from e2b import InvalidArgumentException, PtySize
from e2b.connection_config import KEEPALIVE_PING_HEADER, KEEPALIVE_PING_INTERVAL_SEC
from e2b.envd.client_sync import as_stream
from e2b.envd.process import process_pb
from e2b.envd.utils import authentication_header

from helpers import SANDBOX_USER

STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def run_direct(sandbox, cmd, args=(), envs=None, cwd=None, user=SANDBOX_USER, stdin=False):
    """Starts `cmd` itself (no shell) and waits for it; returns the result."""
    commands = sandbox.commands
    events = as_stream(
        commands._rpc.start(
            process_pb.StartRequest(
                process=process_pb.ProcessConfig(cmd=cmd, args=list(args), envs=envs, cwd=cwd),
                stdin=stdin,
            ),
            headers={
                **authentication_header(commands._envd_version, user),
                KEEPALIVE_PING_HEADER: str(KEEPALIVE_PING_INTERVAL_SEC),
            },
            timeout_ms=30_000,
        )
    )
    return commands._create_handle(events, "start process", True).wait()


def identity(sandbox, user):
    """(id -u, id -g, id -G, {field: values}) of a command run as `user`."""
    fields = "|".join(STATUS_FIELDS)
    r = sandbox.commands.run(
        f"id -u; id -g; id -G; grep -E '^({fields}):' /proc/self/status", user=user
    )
    lines = r.stdout.splitlines()
    status = {}
    for line in lines[3:]:
        name, _, value = line.partition(":")
        status[name] = value.split()
    return int(lines[0]), int(lines[1]), sorted(map(int, lines[2].split())), status


def expected_groups(name):
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid, sorted(set(os.getgrouplist(name, entry.pw_gid)))


def test_identity_user(sandbox):
    uid, gid, groups = expected_groups(SANDBOX_USER)
    got_uid, got_gid, got_groups, status = identity(sandbox, SANDBOX_USER)
    assert (got_uid, got_gid, got_groups) == (uid, gid, groups)
    # real, effective, saved and fs ids all switched: no way back to root.
    assert status["Uid"] == [str(uid)] * 4
    assert status["Gid"] == [str(gid)] * 4
    assert sorted(map(int, status["Groups"])) == groups
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[cap][0], 16) == 0, (cap, status)
    assert int(status["CapBnd"][0], 16) != 0


@pytest.mark.root
def test_identity_root(sandbox):
    _, _, groups = expected_groups("root")
    got_uid, got_gid, got_groups, status = identity(sandbox, "root")
    assert (got_uid, got_gid, got_groups) == (0, 0, groups)
    assert status["Uid"] == ["0"] * 4
    assert status["Gid"] == ["0"] * 4
    assert sorted(map(int, status["Groups"])) == groups
    # root keeps every capability of the bounding set.
    assert status["CapPrm"] == status["CapBnd"]
    assert status["CapEff"] == status["CapBnd"]
    assert int(status["CapInh"][0], 16) == 0
    assert int(status["CapAmb"][0], 16) == 0
    # The user's bounding set is root's (only the other sets are cleared).
    assert identity(sandbox, SANDBOX_USER)[3]["CapBnd"] == status["CapBnd"]


def test_own_process_group(sandbox):
    r = sandbox.commands.run("echo $$ $(ps -o pgid= -p $$)")
    pid, pgid = r.stdout.split()
    assert pid == pgid


def test_signals_not_inherited_from_envd(sandbox):
    # envd ignores SIGPIPE (and may have inherited other ignored signals,
    # e.g. SIGQUIT when started with `&` by a script); a child must start
    # with every signal at default and none blocked, so `yes` dies of
    # SIGPIPE (141) once `head` exits.
    r = sandbox.commands.run(
        "yes | head -1; echo ${PIPESTATUS[0]}; grep -E '^Sig(Ign|Blk):' /proc/self/status",
        timeout=20,
    )
    lines = r.stdout.splitlines()
    assert lines[:2] == ["y", "141"]
    assert r.stderr == ""
    status = dict(line.split(":\t") for line in lines[2:])
    assert int(status["SigIgn"], 16) == 0, status
    assert int(status["SigBlk"], 16) == 0, status


def test_direct_cwd_and_argv(sandbox):
    r = run_direct(sandbox, "/bin/sh", ["-c", 'pwd; echo "$0|$1"', "zero", "one"], cwd="/tmp")
    assert r.stdout == "/tmp\nzero|one\n"


def test_cwd_is_entered_as_the_user(sandbox):
    # The working directory is entered with the user's credentials (as E2B's
    # envd does): a directory only root may enter is refused, not entered.
    path = f"/tmp/kiln-root-only-{os.urandom(4).hex()}"
    run_direct(sandbox, "/bin/mkdir", ["-m", "700", path], user="root")
    try:
        with pytest.raises(InvalidArgumentException) as info:
            run_direct(sandbox, "/bin/pwd", cwd=path)
        assert "ermission denied" in str(info.value)
        # The same for a PTY (started differently, with fork).
        with pytest.raises(InvalidArgumentException) as info:
            sandbox.pty.create(PtySize(rows=24, cols=80), cwd=path)
        assert "ermission denied" in str(info.value)
        assert run_direct(sandbox, "/bin/pwd", cwd=path, user="root").stdout == f"{path}\n"
    finally:
        run_direct(sandbox, "/bin/rmdir", [path], user="root")


def test_direct_argv0_is_cmd_as_given(sandbox):
    r = run_direct(sandbox, "sh", ["-c", 'echo "$0"'])
    assert r.stdout == "sh\n"


def test_direct_stdin_is_dev_null_without_stdin(sandbox):
    r = run_direct(sandbox, "/bin/sh", ["-c", "readlink /proc/self/fd/0; cat"], stdin=False)
    assert r.stdout == "/dev/null\n"


def test_direct_environment_is_exactly_the_requests(sandbox):
    r = run_direct(sandbox, "/usr/bin/env", envs={"KILN_A": "1", "KILN_B": "x=y"})
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env["KILN_A"] == "1" and env["KILN_B"] == "x=y"
    assert env["USER"] == SANDBOX_USER
    assert "RUST_LOG" not in env and "NO_COLOR" not in env


def test_direct_missing_program(sandbox):
    with pytest.raises(InvalidArgumentException) as info:
        run_direct(sandbox, "kiln-no-such-program")
    assert "kiln-no-such-program" in str(info.value)
    with pytest.raises(InvalidArgumentException) as info:
        run_direct(sandbox, "/kiln/no/such/program")
    assert "/kiln/no/such/program" in str(info.value)


def test_direct_program_not_executable(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/plain", "#!/bin/sh\necho no\n")
    with pytest.raises(InvalidArgumentException) as info:
        run_direct(sandbox, f"{test_dir}/plain")
    assert "ermission denied" in str(info.value)


def test_direct_relative_cmd_uses_request_path(sandbox, test_dir):
    # `kiln-hello` exists twice on the request's PATH: not executable in the
    # first directory (skipped, like execvp does), executable in the second.
    sandbox.files.write(f"{test_dir}/a/kiln-hello", "#!/bin/sh\necho from-a\n")
    sandbox.files.write(f"{test_dir}/b/kiln-hello", "#!/bin/sh\necho from-b \"$0\"\n")
    sandbox.commands.run(f"chmod +x {test_dir}/b/kiln-hello")
    path = f"{test_dir}/a:{test_dir}/b:/usr/bin:/bin"
    r = run_direct(sandbox, "kiln-hello", envs={"PATH": path})
    assert r.stdout == f"from-b {test_dir}/b/kiln-hello\n"
    # Without that PATH, envd's default PATH is used, which lacks it.
    with pytest.raises(InvalidArgumentException):
        run_direct(sandbox, "kiln-hello")


def test_direct_script_without_shebang_runs_with_sh(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/noshebang", 'echo "no shebang $1"\n')
    sandbox.commands.run(f"chmod +x {test_dir}/noshebang")
    r = run_direct(sandbox, f"{test_dir}/noshebang", ["arg"])
    assert r.stdout == "no shebang arg\n"


def test_direct_exec_error_after_user_switch_leaves_envd_root(sandbox):
    # A failed start as `user` must not leave envd (or its next command) as user.
    with pytest.raises(InvalidArgumentException):
        run_direct(sandbox, "/kiln/no/such/program")
    r = run_direct(sandbox, "/usr/bin/id", ["-u"], user="root")
    assert r.stdout == "0\n"
