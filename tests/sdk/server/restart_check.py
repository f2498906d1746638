"""Restarting `kiln serve` loses no sandbox, snapshot, template or key.

scripts/test.sh runs `restart_check.py prepare STATE.json`, restarts the
server, then `restart_check.py verify STATE.json`. Exit code 0 = passed.
"""

import json
import sys
import time

from e2b import Sandbox, SandboxQuery, SandboxState


def prepare(path):
    running = Sandbox.create(metadata={"restart": "running"}, timeout=600)
    running.files.write("/home/user/before-restart.txt", "running kept")
    proc = running.commands.run(
        # Written atomically: a reader never sees a half-written file.
        "python3 -c 'import os, time\nwhile True:\n    open(\"/tmp/beat.t\",\"w\").write(str(time.time())); os.replace(\"/tmp/beat.t\", \"/tmp/beat\"); time.sleep(0.1)'",
        background=True,
    )
    paused = Sandbox.create(metadata={"restart": "paused"}, timeout=600)
    paused.files.write("/home/user/before-restart.txt", "paused kept")
    paused.pause()
    with open(path, "w") as f:
        json.dump({"running": running.sandbox_id, "pid": proc.pid, "paused": paused.sandbox_id}, f)
    print("prepared", running.sandbox_id, paused.sandbox_id)


def verify(path):
    state = json.load(open(path))
    listed = {s.sandbox_id: s.state for s in Sandbox.list(query=SandboxQuery(metadata={})).next_items()}
    assert listed.get(state["running"]) == SandboxState.RUNNING, listed
    assert listed.get(state["paused"]) == SandboxState.PAUSED, listed
    running = Sandbox.connect(state["running"])
    assert running.files.read("/home/user/before-restart.txt") == "running kept"
    beat = float(running.files.read("/tmp/beat"))
    time.sleep(0.5)
    assert float(running.files.read("/tmp/beat")) > beat, "the background process stopped"
    assert state["pid"] in [p.pid for p in running.commands.list()]
    paused = Sandbox.connect(state["paused"])
    assert paused.files.read("/home/user/before-restart.txt") == "paused kept"
    assert paused.commands.run("echo resumed").stdout == "resumed\n"
    fresh = Sandbox.create(timeout=60)
    assert fresh.commands.run("echo new").stdout == "new\n"
    for s in (running, paused, fresh):
        s.kill()
    print("verified: running and paused sandboxes, their files and processes, and the key survived")


if __name__ == "__main__":
    {"prepare": prepare, "verify": verify}[sys.argv[1]](sys.argv[2])
