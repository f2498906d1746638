"""files.*: read/write (text, bytes, streams, gzip, octet-stream, metadata),
write_files, list, get_info, exists, make_dir, rename, remove, unsigned URLs."""

import datetime
import gzip
import hashlib
import io
import os

import httpx
import pytest

from e2b import (
    AuthenticationException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)

from helpers import SANDBOX_HOME, SANDBOX_USER, unique


# --- write / read -----------------------------------------------------------------


def test_write_read_text(sandbox, test_dir):
    path = f"{test_dir}/hello.txt"
    info = sandbox.files.write(path, "Hello, Kiln!")
    assert info.path == path
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(path) == "Hello, Kiln!"


def test_write_read_bytes(sandbox, test_dir):
    data = bytes(range(256)) * 4
    path = f"{test_dir}/all-bytes.bin"
    sandbox.files.write(path, data)
    got = sandbox.files.read(path, format="bytes")
    assert isinstance(got, bytearray)
    assert bytes(got) == data


def test_read_stream(sandbox, test_dir):
    data = os.urandom(300_000)
    path = f"{test_dir}/stream.bin"
    sandbox.files.write(path, data)
    with sandbox.files.read(path, format="stream") as reader:
        got = b"".join(reader)
    assert got == data


def test_write_unicode_text(sandbox, test_dir):
    text = "ü 漢字 🎉\nzweite Zeile\n"
    sandbox.files.write(f"{test_dir}/u.txt", text)
    assert sandbox.files.read(f"{test_dir}/u.txt") == text


def test_write_empty_file(sandbox, test_dir):
    path = f"{test_dir}/empty"
    sandbox.files.write(path, "")
    assert sandbox.files.read(path) == ""
    assert sandbox.files.get_info(path).size == 0


def test_overwrite(sandbox, test_dir):
    path = f"{test_dir}/over.txt"
    sandbox.files.write(path, "a much longer first version")
    sandbox.files.write(path, "short")
    assert sandbox.files.read(path) == "short"


def test_write_creates_parent_dirs(sandbox, test_dir, user_ids):
    path = f"{test_dir}/a/b/c/deep.txt"
    sandbox.files.write(path, "deep")
    assert sandbox.files.read(path) == "deep"
    parent = sandbox.files.get_info(f"{test_dir}/a/b")
    assert parent.type == FileType.DIR
    assert parent.owner == SANDBOX_USER
    st = os.stat(f"{test_dir}/a/b/c")
    assert (st.st_uid, st.st_gid) == user_ids


def test_written_file_owned_by_user(sandbox, test_dir, user_ids):
    path = f"{test_dir}/owned.txt"
    sandbox.files.write(path, "x")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == user_ids
    info = sandbox.files.get_info(path)
    assert (info.owner, info.group) == (SANDBOX_USER, SANDBOX_USER)


def test_write_relative_path(sandbox, test_dir):
    rel = f"{test_dir.removeprefix(SANDBOX_HOME + '/')}/rel.txt"
    info = sandbox.files.write(rel, "relative")
    assert info.path == f"{test_dir}/rel.txt"
    assert sandbox.files.read(f"{test_dir}/rel.txt") == "relative"


def test_read_relative_and_tilde(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/t.txt", "tilde")
    rel = test_dir.removeprefix(SANDBOX_HOME + "/")
    assert sandbox.files.read(f"{rel}/t.txt") == "tilde"
    assert sandbox.files.read(f"~/{rel}/t.txt") == "tilde"


def test_read_missing_is_not_found(sandbox, test_dir):
    with pytest.raises(NotFoundException) as info:
        sandbox.files.read(f"{test_dir}/missing.txt")
    assert "missing.txt" in str(info.value)


def test_read_directory_is_invalid(sandbox, test_dir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(test_dir)


def test_write_onto_directory_is_invalid(sandbox, test_dir):
    sandbox.files.make_dir(f"{test_dir}/dir")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{test_dir}/dir", "x")


def test_write_file_like(sandbox, test_dir):
    path = f"{test_dir}/filelike.bin"
    sandbox.files.write(path, io.BytesIO(b"from a file object"))
    assert sandbox.files.read(path) == "from a file object"


def test_write_iterable_stream(sandbox, test_dir):
    chunks = [os.urandom(65536) for _ in range(8)]
    path = f"{test_dir}/iter.bin"
    sandbox.files.write(path, iter(chunks))
    assert bytes(sandbox.files.read(path, format="bytes")) == b"".join(chunks)


def test_write_octet_stream(sandbox, test_dir):
    path = f"{test_dir}/octet.txt"
    info = sandbox.files.write(path, "octet", use_octet_stream=True)
    assert info.path == path
    assert sandbox.files.read(path) == "octet"


def test_write_multipart_explicit(sandbox, test_dir):
    path = f"{test_dir}/multipart.txt"
    sandbox.files.write(path, "multi", use_octet_stream=False)
    assert sandbox.files.read(path) == "multi"


def test_gzip_write(sandbox, test_dir):
    data = b"compressible " * 10_000
    path = f"{test_dir}/gz-up.txt"
    sandbox.files.write(path, data, gzip=True)
    # Stored decompressed on disk.
    with open(path, "rb") as f:
        assert f.read() == data


def test_gzip_read(sandbox, test_dir):
    data = b"compressible " * 10_000
    path = f"{test_dir}/gz-down.txt"
    sandbox.files.write(path, data)
    assert bytes(sandbox.files.read(path, format="bytes", gzip=True)) == data


def test_gzip_download_is_compressed_on_the_wire(sandbox, test_dir):
    data = b"z" * 100_000
    path = f"{test_dir}/gz-wire.txt"
    sandbox.files.write(path, data)
    r = httpx.get(
        sandbox.download_url(path),
        headers={"Accept-Encoding": "gzip"},
    )
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.content == data  # httpx decodes
    assert r.num_bytes_downloaded < len(data)


def test_large_file_roundtrip(sandbox, test_dir):
    data = os.urandom(20 * 1024 * 1024)
    path = f"{test_dir}/large.bin"
    sandbox.files.write(path, data)
    got = sandbox.files.read(path, format="bytes")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sandbox.files.get_info(path).size == len(data)


@pytest.mark.parametrize(
    "name", ["with space.txt", "ü-漢字.txt", "hash#q?amp&pct%.txt", "quote'dq\".txt"]
)
def test_special_file_names(sandbox, test_dir, name):
    path = f"{test_dir}/{name}"
    info = sandbox.files.write(path, name)
    assert info.name == name
    assert sandbox.files.read(path) == name
    assert name in [e.name for e in sandbox.files.list(test_dir)]


# --- write_files -------------------------------------------------------------------


def test_write_files_many(sandbox, test_dir):
    files = [{"path": f"{test_dir}/many/f{i}.txt", "data": f"content {i}"} for i in range(12)]
    infos = sandbox.files.write_files(files)
    assert len(infos) == 12
    assert sorted(i.path for i in infos) == sorted(f["path"] for f in files)
    for f in files:
        assert sandbox.files.read(f["path"]) == f["data"]


def test_write_files_mixed_dirs_and_bytes(sandbox, test_dir):
    files = [
        {"path": f"{test_dir}/x/one.bin", "data": b"\x00\x01"},
        {"path": f"{test_dir}/y/z/two.txt", "data": "two"},
    ]
    sandbox.files.write_files(files)
    assert bytes(sandbox.files.read(files[0]["path"], format="bytes")) == b"\x00\x01"
    assert sandbox.files.read(files[1]["path"]) == "two"


def test_write_files_empty_list(sandbox):
    assert sandbox.files.write_files([]) == []


def test_write_files_octet_stream(sandbox, test_dir):
    files = [{"path": f"{test_dir}/o{i}.txt", "data": f"o{i}"} for i in range(3)]
    infos = sandbox.files.write_files(files, use_octet_stream=True)
    assert [i.path for i in infos] == [f["path"] for f in files]
    assert sandbox.files.read(files[2]["path"]) == "o2"


# --- metadata -------------------------------------------------------------------------


def test_write_with_metadata(sandbox, test_dir):
    path = f"{test_dir}/meta.txt"
    info = sandbox.files.write(path, "m", metadata={"owner": "kiln", "kind": "test"})
    assert info.metadata == {"owner": "kiln", "kind": "test"}
    assert sandbox.files.get_info(path).metadata == {"owner": "kiln", "kind": "test"}


def test_metadata_in_list(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/m.txt", "m", metadata={"k": "v"})
    sandbox.files.write(f"{test_dir}/plain.txt", "p")
    entries = {e.name: e for e in sandbox.files.list(test_dir)}
    assert entries["m.txt"].metadata == {"k": "v"}
    assert not entries["plain.txt"].metadata


def test_metadata_replaced_on_rewrite(sandbox, test_dir):
    path = f"{test_dir}/meta2.txt"
    sandbox.files.write(path, "1", metadata={"a": "1", "b": "2"})
    sandbox.files.write(path, "2", metadata={"c": "3"})
    assert sandbox.files.get_info(path).metadata == {"c": "3"}


def test_metadata_survives_rename(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/before", "x", metadata={"tag": "keep"})
    moved = sandbox.files.rename(f"{test_dir}/before", f"{test_dir}/after")
    assert moved.metadata == {"tag": "keep"}


# --- list -----------------------------------------------------------------------------


def _make_tree(sandbox, root):
    sandbox.files.write_files(
        [
            {"path": f"{root}/b.txt", "data": "b"},
            {"path": f"{root}/a/inner.txt", "data": "i"},
            {"path": f"{root}/a/deeper/leaf.txt", "data": "l"},
            {"path": f"{root}/c/other.txt", "data": "o"},
        ]
    )


def test_list_depth_1(sandbox, test_dir):
    _make_tree(sandbox, test_dir)
    entries = sandbox.files.list(test_dir)
    assert [e.name for e in entries] == ["a", "b.txt", "c"]
    types = {e.name: e.type for e in entries}
    assert types == {"a": FileType.DIR, "b.txt": FileType.FILE, "c": FileType.DIR}
    assert all(e.path == f"{test_dir}/{e.name}" for e in entries)


def test_list_depth_2(sandbox, test_dir):
    _make_tree(sandbox, test_dir)
    paths = [e.path.removeprefix(test_dir + "/") for e in sandbox.files.list(test_dir, depth=2)]
    assert paths == ["a", "a/deeper", "a/inner.txt", "b.txt", "c", "c/other.txt"]


def test_list_depth_3(sandbox, test_dir):
    _make_tree(sandbox, test_dir)
    paths = [e.path.removeprefix(test_dir + "/") for e in sandbox.files.list(test_dir, depth=3)]
    assert "a/deeper/leaf.txt" in paths
    assert len(paths) == 7


def test_list_empty_dir(sandbox, test_dir):
    assert sandbox.files.list(test_dir) == []


def test_list_relative(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/r.txt", "r")
    entries = sandbox.files.list(test_dir.removeprefix(SANDBOX_HOME + "/"))
    assert [e.path for e in entries] == [f"{test_dir}/r.txt"]


def test_list_missing_is_not_found(sandbox, test_dir):
    with pytest.raises(NotFoundException):
        sandbox.files.list(f"{test_dir}/nope")


def test_list_file_is_invalid(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/f", "f")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{test_dir}/f")


def test_list_depth_must_be_positive(sandbox, test_dir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(test_dir, depth=0)


def test_list_root_dir_as_user_denied(sandbox):
    with pytest.raises((SandboxException, AuthenticationException)):
        sandbox.files.list("/root")


# --- get_info / exists ------------------------------------------------------------------


def test_get_info_file(sandbox, test_dir):
    path = f"{test_dir}/info.txt"
    before = datetime.datetime.now(datetime.timezone.utc)
    sandbox.files.write(path, "12345")
    info = sandbox.files.get_info(path)
    assert info.name == "info.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode == 0o644
    assert info.permissions == "-rw-r--r--"
    assert info.owner == SANDBOX_USER
    assert info.group == SANDBOX_USER
    assert info.symlink_target is None
    mtime = info.modified_time
    if mtime.tzinfo is None:
        mtime = mtime.replace(tzinfo=datetime.timezone.utc)
    assert abs((mtime - before).total_seconds()) < 120
    assert mtime.timestamp() == pytest.approx(os.stat(path).st_mtime, abs=1e-3)


def test_get_info_dir(sandbox, test_dir):
    sandbox.files.make_dir(f"{test_dir}/d")
    info = sandbox.files.get_info(f"{test_dir}/d")
    assert info.type == FileType.DIR
    assert info.name == "d"
    assert info.mode == 0o755
    assert info.permissions == "drwxr-xr-x"
    assert info.owner == SANDBOX_USER


def test_get_info_mode_bits(sandbox, test_dir):
    path = f"{test_dir}/exec.sh"
    sandbox.files.write(path, "#!/bin/sh\n")
    sandbox.commands.run(f"chmod 750 {path}")
    info = sandbox.files.get_info(path)
    assert info.mode == 0o750
    assert info.permissions == "-rwxr-x---"


def test_get_info_symlink(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/target.txt", "t")
    sandbox.commands.run(f"ln -s target.txt {test_dir}/link")
    info = sandbox.files.get_info(f"{test_dir}/link")
    assert info.type == FileType.SYMLINK
    assert info.name == "link"
    assert info.path == f"{test_dir}/link"
    assert info.symlink_target == f"{test_dir}/target.txt"


def test_read_through_symlink(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/real.txt", "real")
    sandbox.commands.run(f"ln -s {test_dir}/real.txt {test_dir}/alias")
    assert sandbox.files.read(f"{test_dir}/alias") == "real"


def test_get_info_missing(sandbox, test_dir):
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(f"{test_dir}/missing")


def test_exists(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/e.txt", "e")
    assert sandbox.files.exists(f"{test_dir}/e.txt") is True
    assert sandbox.files.exists(test_dir) is True
    assert sandbox.files.exists(f"{test_dir}/nope.txt") is False
    assert sandbox.files.exists(f"{test_dir}/no/such/dir") is False


# --- make_dir / rename / remove -------------------------------------------------------


def test_make_dir(sandbox, test_dir):
    assert sandbox.files.make_dir(f"{test_dir}/new") is True
    assert sandbox.files.get_info(f"{test_dir}/new").type == FileType.DIR


def test_make_dir_existing_returns_false(sandbox, test_dir):
    assert sandbox.files.make_dir(f"{test_dir}/twice") is True
    assert sandbox.files.make_dir(f"{test_dir}/twice") is False


def test_make_dir_nested(sandbox, test_dir, user_ids):
    assert sandbox.files.make_dir(f"{test_dir}/n1/n2/n3") is True
    for sub in ("n1", "n1/n2", "n1/n2/n3"):
        st = os.stat(f"{test_dir}/{sub}")
        assert (st.st_uid, st.st_gid) == user_ids


def test_make_dir_over_file_is_invalid(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/file", "f")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{test_dir}/file")


def test_rename_file(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/old.txt", "moving")
    info = sandbox.files.rename(f"{test_dir}/old.txt", f"{test_dir}/new.txt")
    assert info.path == f"{test_dir}/new.txt"
    assert info.name == "new.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.exists(f"{test_dir}/old.txt") is False
    assert sandbox.files.read(f"{test_dir}/new.txt") == "moving"


def test_rename_dir(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/src/inner.txt", "in")
    info = sandbox.files.rename(f"{test_dir}/src", f"{test_dir}/dst")
    assert info.type == FileType.DIR
    assert sandbox.files.read(f"{test_dir}/dst/inner.txt") == "in"
    assert sandbox.files.exists(f"{test_dir}/src") is False


def test_rename_into_new_parent(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/f.txt", "f")
    sandbox.files.rename(f"{test_dir}/f.txt", f"{test_dir}/p/q/f.txt")
    assert sandbox.files.read(f"{test_dir}/p/q/f.txt") == "f"


def test_rename_missing(sandbox, test_dir):
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{test_dir}/ghost", f"{test_dir}/other")


def test_remove_file(sandbox, test_dir):
    sandbox.files.write(f"{test_dir}/rm.txt", "x")
    sandbox.files.remove(f"{test_dir}/rm.txt")
    assert sandbox.files.exists(f"{test_dir}/rm.txt") is False


def test_remove_dir_recursive(sandbox, test_dir):
    _make_tree(sandbox, test_dir)
    sandbox.files.remove(f"{test_dir}/a")
    assert sandbox.files.exists(f"{test_dir}/a") is False
    assert [e.name for e in sandbox.files.list(test_dir)] == ["b.txt", "c"]


def test_remove_missing_is_ok(sandbox, test_dir):
    sandbox.files.remove(f"{test_dir}/never-existed")


# --- users --------------------------------------------------------------------------------


@pytest.mark.root
def test_write_as_root(sandbox):
    path = f"/root/{unique('kiln-root')}.txt"
    try:
        sandbox.files.write(path, "root data", user="root")
        info = sandbox.files.get_info(path, user="root")
        assert (info.owner, info.group) == ("root", "root")
        assert sandbox.files.read(path, user="root") == "root data"
        # ...and the default user may not read it.
        with pytest.raises((SandboxException, AuthenticationException)):
            sandbox.files.read(path)
    finally:
        sandbox.files.remove(path, user="root")


def test_user_cannot_write_into_root_home(sandbox):
    with pytest.raises((SandboxException, AuthenticationException)):
        sandbox.files.write(f"/root/{unique('denied')}.txt", "nope")


def test_unknown_user_files(sandbox, test_dir):
    with pytest.raises((AuthenticationException, SandboxException)):
        sandbox.files.read(f"{test_dir}/x", user="kiln-no-such-user")


def test_user_can_read_world_readable_system_file(sandbox):
    assert "root:" in sandbox.files.read("/etc/passwd")


# --- unsigned URLs (no access token in debug mode) ----------------------------------------


def test_download_url_unsigned(sandbox, test_dir):
    path = f"{test_dir}/dl.txt"
    sandbox.files.write(path, "download me")
    url = sandbox.download_url(path)
    assert "signature" not in url
    r = httpx.get(url)
    assert r.status_code == 200
    assert r.text == "download me"
    assert r.headers["content-type"].startswith("application/octet-stream")


def test_upload_url_unsigned(sandbox, test_dir):
    path = f"{test_dir}/ul.txt"
    r = httpx.post(sandbox.upload_url(path), files={"file": ("ul.txt", b"uploaded")})
    assert r.status_code == 200
    body = r.json()
    assert body[0]["path"] == path
    assert body[0]["type"] == "file"
    assert sandbox.files.read(path) == "uploaded"


def test_download_range(sandbox, test_dir):
    path = f"{test_dir}/range.txt"
    sandbox.files.write(path, "0123456789")
    r = httpx.get(sandbox.download_url(path), headers={"Range": "bytes=2-5"})
    assert r.status_code == 206
    assert r.text == "2345"


def test_download_missing_404_body(sandbox, test_dir):
    r = httpx.get(sandbox.download_url(f"{test_dir}/gone"))
    assert r.status_code == 404
    assert r.json() == {"code": 404, "message": f"path '{test_dir}/gone' does not exist"}


def test_gzip_upload_raw(sandbox, test_dir):
    path = f"{test_dir}/raw-gz.txt"
    r = httpx.post(
        sandbox.upload_url(path),
        content=gzip.compress(b"raw gzip body"),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert sandbox.files.read(path) == "raw gzip body"


# --- async ------------------------------------------------------------------------------


async def test_async_write_read_list(async_sandbox, test_dir):
    await async_sandbox.files.write(f"{test_dir}/as.txt", "async file")
    assert await async_sandbox.files.read(f"{test_dir}/as.txt") == "async file"
    names = [e.name for e in await async_sandbox.files.list(test_dir)]
    assert names == ["as.txt"]
    assert await async_sandbox.files.exists(f"{test_dir}/as.txt")
