//! `filesystem.Filesystem` against the real envd binary (run as root; the
//! default user is `user`, whose uid differs between machines).

// The shared helper trips a newer clippy lint; it is not this file's to fix.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Envd, Frame, Frames, basic};
use kiln_envd::users::{User, group_name};
use serde_json::{Value, json};

const FS: &str = "filesystem.Filesystem";

fn method(name: &str) -> String {
    format!("{FS}/{name}")
}

fn user() -> User {
    User::lookup("user").expect("the test user `user` must exist")
}

/// A fresh directory in /tmp owned by `user` (removed on drop).
fn user_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("kiln-fs-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let u = user();
    std::os::unix::fs::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Writes `content` to `path` with mode 0644, owned by `user`.
fn user_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let u = user();
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).unwrap();
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

async fn call(envd: &Envd, name: &str, body: Value) -> (u16, Value) {
    envd.unary(&method(name), body).await
}

async fn call_as(envd: &Envd, who: &str, name: &str, body: Value) -> (u16, Value) {
    let auth = basic(who);
    envd.unary_with(&method(name), body, &[("authorization", auth.as_str())])
        .await
}

fn assert_error(resp: &(u16, Value), status: u16, code: &str) {
    assert_eq!(resp.0, status, "unexpected response {resp:?}");
    assert_eq!(resp.1["code"], code, "unexpected response {resp:?}");
    assert!(
        resp.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {resp:?}"
    );
}

#[tokio::test]
async fn stat_reports_file_fields() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let file = dir.join("hello.txt");
    user_file(&file, "hello");
    // A known modification time with nanoseconds.
    let mtime = nix::sys::time::TimeSpec::new(1_700_000_000, 123_456_789);
    nix::sys::stat::utimensat(
        None,
        &file,
        &mtime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();

    let (status, body) = call(&envd, "Stat", json!({ "path": s(&file) })).await;
    assert_eq!(status, 200, "{body}");
    let e = &body["entry"];
    assert_eq!(e["name"], "hello.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], s(&file));
    assert_eq!(e["size"], "5");
    assert_eq!(e["mode"], 420);
    assert_eq!(e["permissions"], "-rw-r--r--");
    assert_eq!(e["owner"], "user");
    assert_eq!(e["group"], group_name(user().gid));
    assert_eq!(e["modifiedTime"], "2023-11-14T22:13:20.123456789Z");
    assert!(e.get("isSymlink").is_none(), "{e}");
    assert!(e.get("symlinkTarget").is_none(), "{e}");
}

#[tokio::test]
async fn stat_reports_directories_symlinks_and_missing() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere", dir.join("dangling")).unwrap();

    let (status, body) = call(&envd, "Stat", json!({ "path": s(&sub) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entry"]["mode"], 493);
    assert_eq!(body["entry"]["permissions"], "drwxr-xr-x");
    assert_eq!(body["entry"]["name"], "sub");
    // Directories report size 0, as E2B's do (0 is omitted in JSON).
    assert!(body["entry"].get("size").is_none(), "{body}");

    // The path is reported as asked (cleaned), not resolved.
    let asked = format!("{}/./link/", s(&dir));
    let (status, body) = call(&envd, "Stat", json!({ "path": asked })).await;
    assert_eq!(status, 200, "{body}");
    let e = &body["entry"];
    assert_eq!(e["path"], s(&dir.join("link")));
    assert_eq!(e["name"], "link");
    assert_eq!(e["isSymlink"], true);
    assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(e["symlinkTarget"], s(&sub));
    assert_eq!(e["permissions"], "Lrwxrwxrwx");
    assert_eq!(
        e["mode"], 493,
        "a symlink reports its target's permission bits"
    );

    let (status, body) = call(&envd, "Stat", json!({ "path": s(&dir.join("dangling")) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["isSymlink"], true);
    assert_eq!(body["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(body["entry"]["symlinkTarget"], s(&dir.join("nowhere")));

    let resp = call(&envd, "Stat", json!({ "path": s(&dir.join("missing")) })).await;
    assert_error(&resp, 404, "not_found");
    assert!(
        resp.1["message"]
            .as_str()
            .unwrap()
            .contains(&s(&dir.join("missing")))
    );
}

#[tokio::test]
async fn stat_returns_user_metadata_xattrs() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let file = dir.join("tagged.txt");
    user_file(&file, "x");
    let set = |name: &str, value: &str| {
        let path = std::ffi::CString::new(s(&file)).unwrap();
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: NUL-terminated strings and a live value buffer.
        unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    };
    if set("user.e2b.purpose", "demo") != 0 {
        eprintln!("file system without user xattrs; skipping");
        return;
    }
    set("user.unrelated", "x");
    let (status, body) = call(&envd, "Stat", json!({ "path": s(&file) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["metadata"], json!({ "purpose": "demo" }));
}

#[tokio::test]
async fn make_dir_creates_owned_dirs_and_reports_existing() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let new = dir.join("new");

    let (status, body) = call(&envd, "MakeDir", json!({ "path": s(&new) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entry"]["path"], s(&new));
    assert_eq!(body["entry"]["owner"], "user");
    assert!(new.is_dir());

    let resp = call(&envd, "MakeDir", json!({ "path": s(&new) })).await;
    assert_error(&resp, 409, "already_exists");

    let nested = dir.join("a/b/c");
    let (status, body) = call(&envd, "MakeDir", json!({ "path": s(&nested) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["name"], "c");
    let uid = user().uid;
    for p in ["a", "a/b", "a/b/c"] {
        let meta = std::fs::metadata(dir.join(p)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid, "{p}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{p}");
    }

    // As root, new directories belong to root.
    let (status, body) = call_as(
        &envd,
        "root",
        "MakeDir",
        json!({ "path": s(&dir.join("rootdir")) }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["owner"], "root");

    let file = dir.join("file");
    user_file(&file, "x");
    let resp = call(&envd, "MakeDir", json!({ "path": s(&file) })).await;
    assert_error(&resp, 400, "invalid_argument");
}

#[tokio::test]
async fn move_renames_and_creates_parents() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let src = dir.join("src.txt");
    user_file(&src, "data");
    let dst = dir.join("x/y/dst.txt");

    let (status, body) = call(
        &envd,
        "Move",
        json!({ "source": s(&src), "destination": s(&dst) }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["path"], s(&dst));
    assert_eq!(body["entry"]["name"], "dst.txt");
    assert_eq!(body["entry"]["size"], "4");
    assert!(!src.exists());
    assert_eq!(std::fs::read_to_string(&dst).unwrap(), "data");
    let meta = std::fs::metadata(dir.join("x")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user().uid);

    let resp = call(
        &envd,
        "Move",
        json!({ "source": s(&src), "destination": s(&dst) }),
    )
    .await;
    assert_error(&resp, 404, "not_found");
}

fn names(body: &Value, prefix: &Path) -> Vec<String> {
    body["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {body}"))
        .iter()
        .map(|e| {
            let path = e["path"].as_str().unwrap();
            path.strip_prefix(&format!("{}/", s(prefix)))
                .unwrap_or_else(|| panic!("{path} outside {prefix:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn list_dir_walks_in_lexical_pre_order() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    std::fs::create_dir_all(dir.join("a/y")).unwrap();
    user_file(&dir.join("a/x.txt"), "x");
    user_file(&dir.join("a/y/z.txt"), "z");
    user_file(&dir.join("b.txt"), "b");
    user_file(&dir.join("B.txt"), "B");
    std::os::unix::fs::symlink(dir.join("a"), dir.join("c")).unwrap();
    // An upload in progress is not listed.
    user_file(&dir.join(".kiln-upload-42"), "partial");

    let (status, body) = call(&envd, "ListDir", json!({ "path": s(&dir), "depth": 1 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body, &dir), ["B.txt", "a", "b.txt", "c"]);
    let c = &body["entries"][3];
    assert_eq!(c["isSymlink"], true);
    assert_eq!(c["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entries"][1]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(body["entries"][2]["type"], "FILE_TYPE_FILE");

    // Depth 0 means 1.
    let (_, body0) = call(&envd, "ListDir", json!({ "path": s(&dir) })).await;
    assert_eq!(names(&body0, &dir), ["B.txt", "a", "b.txt", "c"]);

    // Symlinked directories are not followed.
    let (status, body) = call(&envd, "ListDir", json!({ "path": s(&dir), "depth": 2 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        names(&body, &dir),
        ["B.txt", "a", "a/x.txt", "a/y", "b.txt", "c"]
    );
    let (_, body) = call(&envd, "ListDir", json!({ "path": s(&dir), "depth": 3 })).await;
    assert_eq!(
        names(&body, &dir),
        ["B.txt", "a", "a/x.txt", "a/y", "a/y/z.txt", "b.txt", "c"]
    );

    // A symlinked root is listed through the link, keeping its prefix.
    let link = dir.join("c");
    let (status, body) = call(&envd, "ListDir", json!({ "path": s(&link), "depth": 1 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body, &link), ["x.txt", "y"]);

    let resp = call(&envd, "ListDir", json!({ "path": s(&dir.join("b.txt")) })).await;
    assert_error(&resp, 400, "invalid_argument");
    let resp = call(&envd, "ListDir", json!({ "path": s(&dir.join("nope")) })).await;
    assert_error(&resp, 404, "not_found");
}

#[tokio::test]
async fn remove_is_rm_rf() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let (status, body) = call(&envd, "Remove", json!({ "path": s(&dir.join("missing")) })).await;
    assert_eq!((status, &body), (200, &json!({})));

    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/f"), "x").unwrap();
    std::fs::write(tree.join("g"), "x").unwrap();
    let u = user();
    for p in ["tree", "tree/a", "tree/a/b", "tree/a/b/f", "tree/g"] {
        std::os::unix::fs::chown(dir.join(p), Some(u.uid), Some(u.gid)).unwrap();
    }
    // A symlink is removed, not its target.
    let outside = dir.join("outside.txt");
    user_file(&outside, "keep");
    std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();

    let (status, body) = call(&envd, "Remove", json!({ "path": s(&tree) })).await;
    assert_eq!(status, 200, "{body}");
    assert!(!tree.exists());
    assert!(outside.exists());

    let (status, _) = call(&envd, "Remove", json!({ "path": s(&outside) })).await;
    assert_eq!(status, 200);
    assert!(!outside.exists());
}

#[tokio::test]
async fn relative_and_tilde_paths_resolve_in_home() {
    let envd = Envd::start().await;
    let home = user().home;
    let name = format!("kiln-fs-rel-{}", std::process::id());
    let expected = home.join(&name);

    let (status, body) = call(&envd, "MakeDir", json!({ "path": name })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["path"], s(&expected));

    let (status, body) = call(&envd, "Stat", json!({ "path": format!("~/{name}") })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["path"], s(&expected));
    assert_eq!(body["entry"]["owner"], "user");

    let (status, body) = call(&envd, "ListDir", json!({ "path": "~", "depth": 1 })).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == s(&expected)),
        "{body}"
    );

    // Root's relative paths start in root's home.
    let (status, body) = call_as(&envd, "root", "Stat", json!({ "path": "." })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["entry"]["path"],
        s(&User::lookup("root").unwrap().home)
    );

    let (status, _) = call(&envd, "Remove", json!({ "path": name })).await;
    assert_eq!(status, 200);
    assert!(!expected.exists());
}

#[tokio::test]
async fn user_cannot_reach_what_it_could_not_itself() {
    let envd = Envd::start().await;
    // A root-only directory with a file in it.
    let private = tempfile::Builder::new()
        .prefix("kiln-fs-private-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = private.path().join("secret");
    std::fs::write(&secret, "s").unwrap();

    let resp = call(&envd, "ListDir", json!({ "path": "/root" })).await;
    assert_error(&resp, 403, "permission_denied");
    let (status, _) = call_as(&envd, "root", "ListDir", json!({ "path": "/root" })).await;
    assert_eq!(status, 200);

    let resp = call(&envd, "Stat", json!({ "path": s(&secret) })).await;
    assert_error(&resp, 403, "permission_denied");
    let resp = call(&envd, "Remove", json!({ "path": s(&secret) })).await;
    assert_error(&resp, 403, "permission_denied");
    assert!(secret.exists());
    let resp = call(
        &envd,
        "MakeDir",
        json!({ "path": s(&private.path().join("d")) }),
    )
    .await;
    assert_error(&resp, 403, "permission_denied");
    let resp = call(
        &envd,
        "Move",
        json!({ "source": s(&secret), "destination": "/tmp/kiln-stolen" }),
    )
    .await;
    assert_error(&resp, 403, "permission_denied");
    let resp = call(&envd, "CreateWatcher", json!({ "path": s(private.path()) })).await;
    assert_error(&resp, 403, "permission_denied");

    let (status, body) = call_as(&envd, "root", "Stat", json!({ "path": s(&secret) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["owner"], "root");

    let resp = call_as(&envd, "nobody-kiln", "Stat", json!({ "path": "/" })).await;
    assert_error(&resp, 401, "unauthenticated");
}

/// Reads stream frames until `pred` matches one (panics on end or after a
/// generous hang guard); returns every frame read.
async fn frames_until(frames: &mut Frames, pred: impl Fn(&Value) -> bool) -> Vec<Frame> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let frame = frames.next().await.expect("stream ended early");
            let done = pred(&frame.json);
            assert!(!frame.end || done, "stream ended: {frame:?}; seen {seen:?}");
            seen.push(frame);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no matching frame; seen {seen:?}");
    seen
}

fn fs_event(v: &Value) -> Option<(&str, &str)> {
    let ev = v.get("filesystem")?;
    Some((ev["type"].as_str()?, ev["name"].as_str()?))
}

fn is_event(kind: &'static str, name: &'static str) -> impl Fn(&Value) -> bool {
    move |v| fs_event(v) == Some((kind, name))
}

/// The (type, name) of the filesystem events among `frames`.
fn events(frames: &[Frame]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter_map(|f| fs_event(&f.json))
        .map(|(t, n)| (t.to_string(), n.to_string()))
        .collect()
}

fn pos(evs: &[(String, String)], kind: &str, name: &str) -> Option<usize> {
    evs.iter().position(|(t, n)| t == kind && n == name)
}

#[tokio::test]
async fn watch_dir_streams_events() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let mut frames = envd
        .stream(
            &method("WatchDir"),
            json!({ "path": s(&dir), "recursive": true }),
            &[
                ("keepalive-ping-interval", "50"),
                ("connect-timeout-ms", "60000"),
            ],
        )
        .await;
    let first = frames.next().await.expect("first frame");
    assert_eq!(first.json, json!({ "start": {} }));

    // One write of a new file: CREATE then WRITE.
    std::fs::write(dir.join("f.txt"), "hello").unwrap();
    let seen = frames_until(&mut frames, is_event("EVENT_TYPE_WRITE", "f.txt")).await;
    let evs = events(&seen);
    assert!(
        pos(&evs, "EVENT_TYPE_CREATE", "f.txt") < pos(&evs, "EVENT_TYPE_WRITE", "f.txt"),
        "{evs:?}"
    );

    // A subdirectory created after the watch started is watched too.
    std::fs::create_dir(dir.join("sub")).unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_CREATE", "sub")).await;
    std::fs::write(dir.join("sub/g.txt"), "x").unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_WRITE", "sub/g.txt")).await;

    // `mkdir -p`: the inner directory usually exists before the outer one is
    // watched; it is still reported, and watched.
    std::fs::create_dir_all(dir.join("p/q")).unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_CREATE", "p/q")).await;
    std::fs::write(dir.join("p/q/deep.txt"), "x").unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_WRITE", "p/q/deep.txt")).await;

    // Rename: the old name as RENAME, the new one as CREATE.
    std::fs::rename(dir.join("f.txt"), dir.join("h.txt")).unwrap();
    let seen = frames_until(&mut frames, is_event("EVENT_TYPE_CREATE", "h.txt")).await;
    assert!(
        pos(&events(&seen), "EVENT_TYPE_RENAME", "f.txt").is_some(),
        "{seen:?}"
    );

    std::fs::set_permissions(dir.join("h.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_CHMOD", "h.txt")).await;

    std::fs::remove_file(dir.join("h.txt")).unwrap();
    frames_until(&mut frames, is_event("EVENT_TYPE_REMOVE", "h.txt")).await;

    // Removing the watched directory ends the stream cleanly.
    std::fs::remove_dir_all(&dir).unwrap();
    let seen = frames_until(&mut frames, |v| v == &json!({})).await;
    assert!(seen.last().unwrap().end, "{seen:?}");
}

#[tokio::test]
async fn watch_dir_includes_entries_and_hides_upload_temp_files() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    std::fs::create_dir(dir.join("deep")).unwrap();
    let mut frames = envd
        .stream(
            &method("WatchDir"),
            json!({ "path": s(&dir), "includeEntry": true }),
            &[],
        )
        .await;
    assert_eq!(frames.next().await.unwrap().json, json!({ "start": {} }));

    // Not recursive: nothing from inside `deep`.
    std::fs::write(dir.join("deep/ignored.txt"), "x").unwrap();

    // How the upload handler writes: a hidden temp file renamed into place.
    let temp = dir.join(".kiln-upload-1234");
    std::fs::write(&temp, "uploaded").unwrap();
    std::fs::rename(&temp, dir.join("up.txt")).unwrap();
    let seen = frames_until(&mut frames, is_event("EVENT_TYPE_WRITE", "up.txt")).await;
    let evs = events(&seen);
    assert_eq!(
        evs,
        [
            ("EVENT_TYPE_CREATE".to_string(), "up.txt".to_string()),
            ("EVENT_TYPE_CHMOD".to_string(), "up.txt".to_string()),
            ("EVENT_TYPE_WRITE".to_string(), "up.txt".to_string()),
        ],
        "{seen:?}"
    );
    let entry = &seen.last().unwrap().json["filesystem"]["entry"];
    assert_eq!(entry["name"], "up.txt");
    assert_eq!(entry["path"], s(&dir.join("up.txt")));
    assert_eq!(entry["size"], "8");
    assert_eq!(entry["type"], "FILE_TYPE_FILE");

    std::fs::remove_file(dir.join("up.txt")).unwrap();
    let seen = frames_until(&mut frames, is_event("EVENT_TYPE_REMOVE", "up.txt")).await;
    assert!(
        seen.last().unwrap().json["filesystem"]
            .get("entry")
            .is_none()
    );
}

#[tokio::test]
async fn watch_dir_errors_end_the_stream() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let file = dir.join("file");
    user_file(&file, "x");
    for (path, code) in [
        (dir.join("missing"), "not_found"),
        (file, "invalid_argument"),
    ] {
        let frames = envd
            .stream(&method("WatchDir"), json!({ "path": s(&path) }), &[])
            .await
            .collect()
            .await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(frames[0].end);
        assert_eq!(frames[0].json["error"]["code"], code, "{frames:?}");
    }
}

#[tokio::test]
async fn watch_dir_sends_keepalives_and_honours_the_deadline() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let mut frames = envd
        .stream(
            &method("WatchDir"),
            json!({ "path": s(&dir) }),
            &[
                ("keepalive-ping-interval", "1"),
                ("connect-timeout-ms", "2500"),
            ],
        )
        .await;
    assert_eq!(frames.next().await.unwrap().json, json!({ "start": {} }));
    let seen = frames_until(&mut frames, |v| v.get("keepalive").is_some()).await;
    assert_eq!(seen.last().unwrap().json, json!({ "keepalive": {} }));
    let seen = frames_until(&mut frames, |v| v.get("error").is_some()).await;
    let last = seen.last().unwrap();
    assert!(last.end);
    assert_eq!(last.json["error"]["code"], "deadline_exceeded");
}

/// The number of inotify instances the envd listening on `port` holds.
fn envd_inotify_count(port: &str) -> usize {
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"envd"))
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"--port" && w[1] == port.as_bytes())
            })
        })
        .expect("envd process")
        .path();
    std::fs::read_dir(pid.join("fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"))
        })
        .count()
}

#[tokio::test]
async fn watch_dir_stops_watching_when_the_client_leaves() {
    let envd = Envd::start().await;
    let port = envd.base.rsplit(':').next().unwrap().to_string();
    let (_tmp, dir) = user_dir();
    let before = envd_inotify_count(&port);
    let mut frames = envd
        .stream(
            &method("WatchDir"),
            json!({ "path": s(&dir) }),
            &[("keepalive-ping-interval", "1")],
        )
        .await;
    assert_eq!(frames.next().await.unwrap().json, json!({ "start": {} }));
    assert_eq!(envd_inotify_count(&port), before + 1);
    drop(frames);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while envd_inotify_count(&port) > before {
        assert!(
            std::time::Instant::now() < deadline,
            "watcher still alive after the client left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn polling_watcher_sees_a_write_immediately() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let (status, body) = envd
        .unary_with(
            &method("CreateWatcher"),
            json!({ "path": s(&dir), "recursive": true }),
            &[("keepalive-ping-interval", "50")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["watcherId"].as_str().expect("watcherId").to_string();
    assert!(!id.is_empty());

    // The Python sync SDK writes and asks for events right away.
    std::fs::write(dir.join("now.txt"), "data").unwrap();
    let (status, body) = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
    assert_eq!(status, 200, "{body}");
    let evs: Vec<(String, String)> = body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {body}"))
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let create = pos(&evs, "EVENT_TYPE_CREATE", "now.txt");
    let write = pos(&evs, "EVENT_TYPE_WRITE", "now.txt");
    assert!(create.is_some() && create < write, "{evs:?}");

    // Drained: nothing new since.
    let (status, body) = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
    assert_eq!((status, &body), (200, &json!({})));

    // An upload (temp file renamed into place) into a nested directory
    // looks like E2B's: exactly CREATE, CHMOD, WRITE.
    std::fs::create_dir(dir.join("nested")).unwrap();
    let (status, body) = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["type"], "EVENT_TYPE_CREATE", "{body}");
    assert_eq!(body["events"][0]["name"], "nested", "{body}");
    let temp = dir.join("nested/.kiln-upload-77");
    std::fs::write(&temp, "uploaded").unwrap();
    let u = user();
    std::os::unix::fs::chown(&temp, Some(u.uid), Some(u.gid)).unwrap();
    std::fs::rename(&temp, dir.join("nested/up.txt")).unwrap();
    let (status, body) = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "events": [
            { "name": "nested/up.txt", "type": "EVENT_TYPE_CREATE" },
            { "name": "nested/up.txt", "type": "EVENT_TYPE_CHMOD" },
            { "name": "nested/up.txt", "type": "EVENT_TYPE_WRITE" },
        ]})
    );

    let (status, body) = call(&envd, "RemoveWatcher", json!({ "watcherId": id })).await;
    assert_eq!((status, &body), (200, &json!({})));
    let resp = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
    assert_error(&resp, 404, "not_found");
    let resp = call(&envd, "RemoveWatcher", json!({ "watcherId": id })).await;
    assert_error(&resp, 404, "not_found");

    let resp = call(
        &envd,
        "CreateWatcher",
        json!({ "path": s(&dir.join("nope")) }),
    )
    .await;
    assert_error(&resp, 404, "not_found");
}

#[tokio::test]
async fn stat_over_binary_protobuf() {
    use buffa::Message;
    use kiln_proto::filesystem::{FileType, StatRequest, StatResponse};

    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let file = dir.join("bin.txt");
    user_file(&file, "abc");
    let req = StatRequest {
        path: s(&file),
        ..Default::default()
    };
    let resp = envd
        .client
        .post(envd.url(&format!("/{}", method("Stat"))))
        .header("content-type", "application/proto")
        .header("connect-protocol-version", "1")
        .body(req.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/proto");
    let bytes = resp.bytes().await.unwrap();
    let decoded = StatResponse::decode_from_slice(&bytes).unwrap();
    let entry = decoded.entry.as_option().expect("entry");
    assert_eq!(entry.path, s(&file));
    assert_eq!(entry.size, 3);
    assert_eq!(entry.mode, 0o644);
    assert_eq!(entry.r#type.as_known(), Some(FileType::FILE_TYPE_FILE));
}

#[tokio::test]
async fn polling_watcher_sees_writes_in_a_just_created_subdirectory() {
    let envd = Envd::start().await;
    let (_tmp, dir) = user_dir();
    let (status, body) = call(
        &envd,
        "CreateWatcher",
        json!({ "path": s(&dir), "recursive": true }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["watcherId"].as_str().unwrap().to_string();

    // As the SDK test does: MakeDir, then at once an upload into it.
    let (status, _) = call(&envd, "MakeDir", json!({ "path": s(&dir.join("nested")) })).await;
    assert_eq!(status, 200);
    let temp = dir.join("nested/.kiln-upload-9");
    std::fs::write(&temp, "content").unwrap();
    std::fs::rename(&temp, dir.join("nested/file.txt")).unwrap();

    let mut evs = Vec::new();
    // Events may take a moment to arrive; poll until the WRITE shows up.
    for _ in 0..50 {
        let (status, body) = call(&envd, "GetWatcherEvents", json!({ "watcherId": id })).await;
        assert_eq!(status, 200, "{body}");
        for e in body["events"].as_array().cloned().unwrap_or_default() {
            evs.push((
                e["type"].as_str().unwrap().to_string(),
                e["name"].as_str().unwrap().to_string(),
            ));
        }
        if pos(&evs, "EVENT_TYPE_WRITE", "nested/file.txt").is_some() {
            break;
        }
    }
    assert_eq!(pos(&evs, "EVENT_TYPE_CREATE", "nested"), Some(0), "{evs:?}");
    assert!(
        pos(&evs, "EVENT_TYPE_WRITE", "nested/file.txt").is_some(),
        "{evs:?}"
    );
    let creates = evs
        .iter()
        .filter(|(t, n)| t == "EVENT_TYPE_CREATE" && n == "nested/file.txt")
        .count();
    assert_eq!(creates, 1, "reported once: {evs:?}");
    assert!(
        evs.iter().all(|(_, n)| !n.contains(".kiln-upload")),
        "{evs:?}"
    );
}
