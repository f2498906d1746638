"""files.watch_dir: the sync polling watcher (CreateWatcher/GetWatcherEvents)
and the async streaming one (WatchDir)."""

import asyncio

import pytest

from e2b import (
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)

from helpers import wait_until


def _events(handle, want, timeout=5.0):
    """Collects events until `want(events)` holds or `timeout` passes."""
    seen = []

    def poll():
        seen.extend(handle.get_new_events())
        return want(seen)

    wait_until(poll, timeout=timeout)
    return seen


def _pairs(events):
    return {(e.name, e.type) for e in events}


def test_write_event_visible_immediately(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/now.txt", "x")
        # No sleep: the event must be queued by the time the write returned.
        events = handle.get_new_events()
        assert ("now.txt", FilesystemEventType.WRITE) in _pairs(events)
    finally:
        handle.stop()


def test_create_then_write_order(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.commands.run(f"echo hi > {test_dir}/new.txt")
        events = _events(handle, lambda ev: ("new.txt", FilesystemEventType.WRITE) in _pairs(ev))
        kinds = [e.type for e in events if e.name == "new.txt"]
        assert kinds[0] == FilesystemEventType.CREATE
        assert FilesystemEventType.WRITE in kinds
    finally:
        handle.stop()


def test_remove_event(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/doomed.txt", "x")
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.remove(f"{test_dir}/doomed.txt")
        events = _events(handle, lambda ev: ("doomed.txt", FilesystemEventType.REMOVE) in _pairs(ev))
        assert ("doomed.txt", FilesystemEventType.REMOVE) in _pairs(events)
    finally:
        handle.stop()


def test_rename_event(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/from.txt", "x")
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.rename(f"{test_dir}/from.txt", f"{test_dir}/to.txt")
        events = _events(
            handle,
            lambda ev: {("from.txt", FilesystemEventType.RENAME), ("to.txt", FilesystemEventType.CREATE)}
            <= _pairs(ev),
        )
        assert ("from.txt", FilesystemEventType.RENAME) in _pairs(events)
        assert ("to.txt", FilesystemEventType.CREATE) in _pairs(events)
    finally:
        handle.stop()


def test_chmod_event(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/perm.txt", "x")
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.commands.run(f"chmod 600 {test_dir}/perm.txt")
        events = _events(handle, lambda ev: ("perm.txt", FilesystemEventType.CHMOD) in _pairs(ev))
        assert ("perm.txt", FilesystemEventType.CHMOD) in _pairs(events)
    finally:
        handle.stop()


def test_make_dir_event(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.make_dir(f"{test_dir}/subdir")
        events = _events(handle, lambda ev: ("subdir", FilesystemEventType.CREATE) in _pairs(ev))
        assert ("subdir", FilesystemEventType.CREATE) in _pairs(events)
    finally:
        handle.stop()


def test_events_are_drained(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/once.txt", "x")
        first = _events(handle, lambda ev: ("once.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert first
        assert handle.get_new_events() == []
    finally:
        handle.stop()


def test_upload_temp_files_hidden(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/up.txt", "x" * 100_000)
        events = _events(handle, lambda ev: ("up.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert {e.name for e in events} == {"up.txt"}
    finally:
        handle.stop()


def test_non_recursive_ignores_subdirs(sandbox, test_dir):
    sandbox.files.make_dir(f"{test_dir}/sub")
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/sub/nested.txt", "x")
        sandbox.files.write(f"{test_dir}/top.txt", "x")
        events = _events(handle, lambda ev: ("top.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert not [e for e in events if "nested" in e.name]
    finally:
        handle.stop()


def test_recursive_watch(sandbox, test_dir):
    sandbox.files.make_dir(f"{test_dir}/sub")
    handle = sandbox.files.watch_dir(test_dir, recursive=True)
    try:
        sandbox.files.write(f"{test_dir}/sub/nested.txt", "x")
        events = _events(handle, lambda ev: ("sub/nested.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert ("sub/nested.txt", FilesystemEventType.WRITE) in _pairs(events)
    finally:
        handle.stop()


def test_recursive_watch_new_subdir(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir, recursive=True)
    try:
        sandbox.files.make_dir(f"{test_dir}/later")
        _events(handle, lambda ev: ("later", FilesystemEventType.CREATE) in _pairs(ev))
        sandbox.files.write(f"{test_dir}/later/file.txt", "x")
        events = _events(handle, lambda ev: ("later/file.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert ("later/file.txt", FilesystemEventType.WRITE) in _pairs(events)
    finally:
        handle.stop()


def test_include_entry(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir, include_entry=True)
    try:
        sandbox.files.write(f"{test_dir}/entry.txt", "12345")
        events = _events(handle, lambda ev: ("entry.txt", FilesystemEventType.WRITE) in _pairs(ev))
        writes = [e for e in events if e.name == "entry.txt" and e.type == FilesystemEventType.WRITE]
        entry = writes[-1].entry
        assert entry is not None
        assert entry.name == "entry.txt"
        assert entry.path == f"{test_dir}/entry.txt"
        assert entry.size == 5
    finally:
        handle.stop()


def test_entry_absent_without_include_entry(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/noentry.txt", "x")
        events = _events(handle, lambda ev: ("noentry.txt", FilesystemEventType.WRITE) in _pairs(ev))
        assert all(e.entry is None for e in events)
    finally:
        handle.stop()


def test_stopped_watcher_rejects_polling(sandbox, test_dir):
    handle = sandbox.files.watch_dir(test_dir)
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_watch_missing_dir(sandbox, test_dir):
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(f"{test_dir}/nope")


def test_watch_file_is_invalid(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(f"{test_dir}/plain")


def test_two_watchers_independent(sandbox, test_dir):
    h1 = sandbox.files.watch_dir(test_dir)
    h2 = sandbox.files.watch_dir(test_dir)
    try:
        sandbox.files.write(f"{test_dir}/both.txt", "x")
        want = lambda ev: ("both.txt", FilesystemEventType.WRITE) in _pairs(ev)  # noqa: E731
        assert want(_events(h1, want))
        assert want(_events(h2, want))
    finally:
        h1.stop()
        h2.stop()


# --- async streaming watch ----------------------------------------------------------


async def _wait_for(events, pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred(events) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return pred(events)


async def test_async_watch_dir(async_sandbox, test_dir):
    events = []
    handle = await async_sandbox.files.watch_dir(test_dir, on_event=events.append)
    try:
        await async_sandbox.files.write(f"{test_dir}/async.txt", "x")
        assert await _wait_for(events, lambda ev: ("async.txt", FilesystemEventType.WRITE) in _pairs(ev))
    finally:
        await handle.stop()


async def test_async_watch_async_callback(async_sandbox, test_dir):
    events = []

    async def on_event(e):
        events.append(e)

    handle = await async_sandbox.files.watch_dir(test_dir, on_event=on_event)
    try:
        await async_sandbox.files.make_dir(f"{test_dir}/d")
        assert await _wait_for(events, lambda ev: ("d", FilesystemEventType.CREATE) in _pairs(ev))
    finally:
        await handle.stop()


async def test_async_watch_recursive(async_sandbox, test_dir):
    events = []
    handle = await async_sandbox.files.watch_dir(test_dir, on_event=events.append, recursive=True)
    try:
        await async_sandbox.files.write(f"{test_dir}/x/y/z.txt", "x")
        assert await _wait_for(events, lambda ev: ("x/y/z.txt", FilesystemEventType.WRITE) in _pairs(ev))
    finally:
        await handle.stop()


async def test_async_watch_remove(async_sandbox, test_dir):
    await async_sandbox.files.write(f"{test_dir}/gone.txt", "x")
    events = []
    handle = await async_sandbox.files.watch_dir(test_dir, on_event=events.append)
    try:
        await async_sandbox.files.remove(f"{test_dir}/gone.txt")
        assert await _wait_for(events, lambda ev: ("gone.txt", FilesystemEventType.REMOVE) in _pairs(ev))
    finally:
        await handle.stop()


async def test_async_watch_stop_calls_on_exit(async_sandbox, test_dir):
    events, exits = [], []
    handle = await async_sandbox.files.watch_dir(
        test_dir, on_event=events.append, on_exit=exits.append
    )
    await async_sandbox.files.write(f"{test_dir}/before-stop.txt", "x")
    assert await _wait_for(events, lambda ev: len(ev) > 0)
    await handle.stop()
    assert await _wait_for(exits, lambda ex: len(ex) == 1)
    assert exits == [None]


async def test_async_watch_missing_dir(async_sandbox, test_dir):
    with pytest.raises(NotFoundException):
        await async_sandbox.files.watch_dir(f"{test_dir}/missing", on_event=lambda e: None)
