//! envd's plain-HTTP endpoints against the real binary: `/health`, `/files`,
//! `/init`, `/envs`, `/metrics`.

// common/mod.rs (not owned here) trips clippy::collapsible_if on Rust 1.95.
mod common;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::Envd;
use kiln_envd::users::User;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A client that neither asks for nor decodes compressed bodies.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

fn user() -> User {
    User::lookup("user").expect("the test user 'user' must exist")
}

/// A fresh directory under /tmp owned by `user`.
fn user_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kiln-http-")
        .tempdir_in("/tmp")
        .unwrap();
    let u = user();
    std::os::unix::fs::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn q(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn multipart(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match filename {
            Some(f) => {
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
            }
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn upload_raw(envd: &Envd, query: &str, data: Vec<u8>) -> (u16, Value) {
    let resp = envd
        .client
        .post(envd.url(&format!("/files?{query}")))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    json_of(resp).await
}

async fn download(envd: &Envd, query: &str) -> reqwest::Response {
    raw_client()
        .get(envd.url(&format!("/files?{query}")))
        .send()
        .await
        .unwrap()
}

async fn init(envd: &Envd, body: Value, token: Option<&str>) -> u16 {
    let mut req = envd.client.post(envd.url("/init")).json(&body);
    if let Some(t) = token {
        req = req.header("x-access-token", t);
    }
    req.send().await.unwrap().status().as_u16()
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".kiln-upload-"))
        })
        .collect()
}

/// Waits (up to 10 s) for a condition envd brings about asynchronously.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let cname = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings and a writable buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[tokio::test]
async fn health_is_open_even_with_a_token() {
    let envd = Envd::start().await;
    assert_eq!(init(&envd, json!({"accessToken": "tok"}), None).await, 204);
    let resp = envd.client.get(envd.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn octet_stream_upload_and_download_roundtrip() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("a.txt");
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}", q(path.to_str().unwrap())),
        b"hello world".to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!([{"name": "a.txt", "type": "file", "path": path.to_str().unwrap()}])
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"hello world");

    let resp = download(&envd, &format!("path={}", q(path.to_str().unwrap()))).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["content-disposition"], "inline; filename=\"a.txt\"");
    assert_eq!(h["content-length"], "11");
    assert_eq!(h["accept-ranges"], "bytes");
    assert!(h.contains_key("last-modified"));
    assert!(!h.contains_key("content-encoding"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"hello world");

    // Overwriting replaces the content.
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}", q(path.to_str().unwrap())),
        b"second".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert!(temp_files(dir.path()).is_empty());

    // Conditional GET: unchanged since Last-Modified => 304.
    let url = envd.url(&format!("/files?path={}", q(path.to_str().unwrap())));
    let resp = raw_client().get(url.clone()).send().await.unwrap();
    let last_modified = resp.headers()["last-modified"].clone();
    let resp = raw_client()
        .get(url)
        .header("if-modified-since", last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);

    // Empty files work both ways.
    let empty = dir.path().join("empty");
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}", q(empty.to_str().unwrap())),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    let resp = download(&envd, &format!("path={}", q(empty.to_str().unwrap()))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "0");
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn relative_paths_resolve_under_the_users_home() {
    let envd = Envd::start().await;
    let u = user();
    let name = format!("kiln-http-rel-{}.txt", std::process::id());
    let (status, body) = upload_raw(&envd, &format!("path={name}"), b"rel".to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let abs = u.home.join(&name);
    assert_eq!(body[0]["path"], abs.to_str().unwrap());
    let resp = download(&envd, &format!("path={name}&username=user")).await;
    let ok = resp.status() == 200 && resp.bytes().await.unwrap().as_ref() == b"rel";
    let _ = std::fs::remove_file(&abs);
    assert!(ok);
}

#[tokio::test]
async fn multipart_upload_of_two_files() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let a = dir.path().join("one.bin");
    let b = dir.path().join("sub/two.bin");
    let boundary = "kilnboundary1234";
    let body = multipart(
        boundary,
        &[
            ("file", Some(a.to_str().unwrap()), b"first file"),
            ("other", None, b"ignored field"),
            ("file", Some(b.to_str().unwrap()), &[0u8, 1, 2, 255]),
        ],
    );
    let resp = envd
        .client
        .post(envd.url("/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!([
            {"name": "one.bin", "type": "file", "path": a.to_str().unwrap()},
            {"name": "two.bin", "type": "file", "path": b.to_str().unwrap()},
        ])
    );
    assert_eq!(std::fs::read(&a).unwrap(), b"first file");
    assert_eq!(std::fs::read(&b).unwrap(), [0u8, 1, 2, 255]);

    // With `path` in the query, a single part goes there whatever its filename.
    let c = dir.path().join("three.txt");
    let body = multipart(boundary, &[("file", Some("ignored-name.txt"), b"third")]);
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(c.to_str().unwrap()))))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["path"], c.to_str().unwrap());
    assert_eq!(std::fs::read(&c).unwrap(), b"third");

    // Two parts for the same destination: 400.
    let d = dir.path().join("dup.txt");
    let body = multipart(
        boundary,
        &[
            ("file", Some(d.to_str().unwrap()), b"1"),
            ("file", Some(d.to_str().unwrap()), b"2"),
        ],
    );
    let resp = envd
        .client
        .post(envd.url("/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], 400);
    assert!(
        body["message"].as_str().unwrap().contains("same path"),
        "{body}"
    );
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn parent_directories_are_created_and_owned_by_the_user() {
    let envd = Envd::start().await;
    let u = user();
    let dir = user_dir();
    let path = dir.path().join("x/y/z.txt");
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}&username=user", q(path.to_str().unwrap())),
        b"deep".to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for p in [dir.path().join("x"), dir.path().join("x/y")] {
        let m = std::fs::metadata(&p).unwrap();
        assert!(m.is_dir());
        assert_eq!((m.uid(), m.gid()), (u.uid, u.gid), "{}", p.display());
        assert_eq!(m.mode() & 0o777, 0o755);
    }
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.uid(), m.gid()), (u.uid, u.gid));
    assert_eq!(m.mode() & 0o777, 0o644);

    // As root, the file belongs to root.
    let rpath = dir.path().join("rootfile");
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}&username=root", q(rpath.to_str().unwrap())),
        b"r".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::metadata(&rpath).unwrap().uid(), 0);

    // Basic auth selects the user when there is no username parameter.
    let bpath = dir.path().join("basic");
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(bpath.to_str().unwrap()))))
        .header("authorization", common::basic("root"))
        .header("content-type", "application/octet-stream")
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(std::fs::metadata(&bpath).unwrap().uid(), 0);
}

#[tokio::test]
async fn gzip_upload_and_gzip_download() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("gz.txt");
    let data = b"compress me ".repeat(10_000);
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .body(gzip(&data))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(std::fs::read(&path).unwrap(), data);

    let resp = raw_client()
        .get(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let compressed = resp.bytes().await.unwrap();
    assert!(compressed.len() < data.len() / 10);
    assert_eq!(gunzip(&compressed), data);

    // A decoding client (like the SDKs' HTTP stacks) sees the plain bytes.
    let resp = envd
        .client
        .get(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());

    // Only unsupported codings and no identity: 406.
    let resp = raw_client()
        .get(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 406, "{body}");
    assert_eq!(body["code"], 406);
}

#[tokio::test]
async fn range_requests() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("r.txt");
    std::fs::write(&path, b"0123456789").unwrap();
    let url = envd.url(&format!("/files?path={}", q(path.to_str().unwrap())));
    let get = |range: &'static str| {
        raw_client()
            .get(url.clone())
            .header("range", range)
            .header("accept-encoding", "gzip, deflate")
            .send()
    };
    let resp = get("bytes=2-5").await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 2-5/10");
    assert_eq!(resp.headers()["content-length"], "4");
    assert!(!resp.headers().contains_key("content-encoding"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"2345");

    let resp = get("bytes=7-").await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"789");

    let resp = get("bytes=-2").await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"89");

    let resp = get("bytes=10-20").await.unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */10");
}

#[tokio::test]
async fn download_errors() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let missing = dir.path().join("nope.txt");
    let (status, body) =
        json_of(download(&envd, &format!("path={}", q(missing.to_str().unwrap()))).await).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"code": 404, "message": format!("path '{}' does not exist", missing.display())})
    );

    let (status, body) =
        json_of(download(&envd, &format!("path={}", q(dir.path().to_str().unwrap()))).await).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"code": 400, "message": format!("path '{}' is a directory", dir.path().display())})
    );

    let (status, body) =
        json_of(download(&envd, "path=/etc/hostname&username=no-such-user-kiln").await).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"code": 401, "message": "invalid username: 'no-such-user-kiln'"})
    );

    // Upload onto a directory: 400.
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}", q(dir.path().to_str().unwrap())),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["message"],
        format!("path '{}' is a directory", dir.path().display())
    );
}

/// A 50 MB body streamed in both directions, checked by sha256.
#[tokio::test]
async fn fifty_megabyte_roundtrip() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("big.bin");
    let data = noise(50 * 1024 * 1024 + 123, 7);
    let expected = Sha256::digest(&data);

    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    drop(data);
    let on_disk = Sha256::digest(std::fs::read(&path).unwrap());
    assert_eq!(on_disk, expected);

    let mut resp = download(&envd, &format!("path={}", q(path.to_str().unwrap()))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        (50 * 1024 * 1024 + 123).to_string().as_str()
    );
    let mut hasher = Sha256::new();
    let mut total = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(total, 50 * 1024 * 1024 + 123);
    assert_eq!(hasher.finalize(), expected);

    // And compressed.
    let resp = envd
        .client
        .get(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(Sha256::digest(resp.bytes().await.unwrap()), expected);
}

#[tokio::test]
async fn metadata_is_stored_as_xattrs() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("meta.txt");
    let url = envd.url(&format!("/files?path={}", q(path.to_str().unwrap())));
    let resp = envd
        .client
        .post(url.clone())
        .header("content-type", "application/octet-stream")
        .header("x-metadata-Owner", "alice")
        .header("x-metadata-kind", "report v1")
        .body("m")
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body[0]["metadata"],
        json!({"owner": "alice", "kind": "report v1"})
    );
    assert_eq!(get_xattr(&path, "user.e2b.owner").unwrap(), b"alice");
    assert_eq!(get_xattr(&path, "user.e2b.kind").unwrap(), b"report v1");

    // Overwriting without metadata keeps it (E2B overwrites in place).
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}", q(path.to_str().unwrap())),
        b"n".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body[0].get("metadata").is_none());
    assert_eq!(get_xattr(&path, "user.e2b.owner").unwrap(), b"alice");

    // New metadata replaces all of it.
    let resp = envd
        .client
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("x-metadata-kind", "v2")
        .body("o")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(get_xattr(&path, "user.e2b.kind").unwrap(), b"v2");
    assert_eq!(get_xattr(&path, "user.e2b.owner"), None);
}

#[tokio::test]
async fn init_sets_env_vars_and_token() {
    let envd = Envd::start().await;
    assert_eq!(
        init(
            &envd,
            json!({"envVars": {"FOO": "bar"}, "accessToken": "tok", "timestamp": "2000-01-01T00:00:00Z",
                   "entropy": base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
                   "volumeMounts": [], "lifecycleID": "x"}),
            None
        )
        .await,
        204
    );
    let unauthorized = json!({"code": 401, "message":
        "unauthorized access, please provide a valid access token or method signing if supported"});

    for path in ["/envs", "/metrics"] {
        let (status, body) = json_of(envd.client.get(envd.url(path)).send().await.unwrap()).await;
        assert_eq!((status, &body), (401, &unauthorized), "{path}");
        let resp = envd
            .client
            .get(envd.url(path))
            .header("x-access-token", "wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
    let get_envs = || {
        envd.client
            .get(envd.url("/envs"))
            .header("x-access-token", "tok")
            .send()
    };
    let (status, body) = json_of(get_envs().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"FOO": "bar"}));

    // Re-init without the token is refused; with it, env vars merge.
    assert_eq!(init(&envd, json!({"envVars": {"X": "1"}}), None).await, 401);
    assert_eq!(
        init(&envd, json!({"envVars": {"X": "1"}}), Some("tok")).await,
        204
    );
    let (_, body) = json_of(get_envs().await.unwrap()).await;
    assert_eq!(body, json!({"FOO": "bar", "X": "1"}));

    // Unknown default user / bad timestamp: 400.
    assert_eq!(
        init(
            &envd,
            json!({"defaultUser": "no-such-user-kiln"}),
            Some("tok")
        )
        .await,
        400
    );
    assert_eq!(
        init(&envd, json!({"timestamp": "yesterday"}), Some("tok")).await,
        400
    );

    // Token rotation needs the current token.
    assert_eq!(
        init(&envd, json!({"accessToken": "new"}), Some("tok")).await,
        204
    );
    let (status, _) = json_of(get_envs().await.unwrap()).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn init_default_user_applies_to_files() {
    let envd = Envd::start().await;
    let dir = user_dir();
    assert_eq!(init(&envd, json!({"defaultUser": "root"}), None).await, 204);
    let path = dir.path().join("owned-by-root");
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}", q(path.to_str().unwrap())),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), 0);
}

#[tokio::test]
async fn metrics_report_usage() {
    let envd = Envd::start().await;
    let (status, body) = json_of(envd.client.get(envd.url("/metrics")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    for key in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(body[key].is_number(), "{key} missing in {body}");
    }
    assert!(body["cpu_count"].as_u64().unwrap() >= 1);
    assert!(body["mem_total"].as_u64().unwrap() > body["mem_used"].as_u64().unwrap());
    assert!(body["disk_total"].as_u64().unwrap() >= body["disk_used"].as_u64().unwrap());
    let pct = body["cpu_used_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct));
}

fn sign(path: &str, op: &str, user: &str, token: &str, exp: Option<i64>) -> String {
    let mut text = format!("{path}:{op}:{user}:{token}");
    if let Some(e) = exp {
        text.push_str(&format!(":{e}"));
    }
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(text.as_bytes()))
    )
}

#[tokio::test]
async fn files_need_the_token_or_a_signature() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let path = dir.path().join("s.txt");
    let p = path.to_str().unwrap().to_string();
    std::fs::write(&path, b"signed").unwrap();
    assert_eq!(init(&envd, json!({"accessToken": "tok"}), None).await, 204);

    let (status, body) = json_of(download(&envd, &format!("path={}", q(&p))).await).await;
    assert_eq!(
        (status, body),
        (
            401,
            json!({"code": 401, "message": "missing signature query parameter"})
        )
    );
    let resp = raw_client()
        .get(envd.url(&format!("/files?path={}", q(&p))))
        .header("x-access-token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = raw_client()
        .get(envd.url(&format!("/files?path={}", q(&p))))
        .header("x-access-token", "tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Valid signatures, with and without a username and an expiration.
    let sig = sign(&p, "read", "", "tok", None);
    let resp = download(&envd, &format!("path={}&signature={}", q(&p), q(&sig))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"signed");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let sig = sign(&p, "read", "user", "tok", Some(exp));
    let resp = download(
        &envd,
        &format!(
            "path={}&username=user&signature={}&signature_expiration={exp}",
            q(&p),
            q(&sig)
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);

    // Wrong signatures: another operation, another user, tampered expiration.
    for query in [
        format!(
            "path={}&signature={}",
            q(&p),
            q(&sign(&p, "write", "", "tok", None))
        ),
        format!(
            "path={}&username=root&signature={}",
            q(&p),
            q(&sign(&p, "read", "", "tok", None))
        ),
        format!(
            "path={}&username=user&signature={}&signature_expiration={}",
            q(&p),
            q(&sig),
            exp + 1
        ),
        format!("path={}&signature=v1_garbage", q(&p)),
    ] {
        let (status, body) = json_of(download(&envd, &query).await).await;
        assert_eq!(
            (status, body),
            (401, json!({"code": 401, "message": "invalid signature"})),
            "{query}"
        );
    }

    // Expired: E2B's exact body.
    let past = exp - 3600;
    let sig = sign(&p, "read", "", "tok", Some(past));
    let resp = download(
        &envd,
        &format!(
            "path={}&signature={}&signature_expiration={past}",
            q(&p),
            q(&sig)
        ),
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"code":401,"message":"signature is already expired"}"#
    );

    // Uploads take a write signature, not a read one.
    let target = dir.path().join("up.txt");
    let t = target.to_str().unwrap();
    let (status, _) = upload_raw(
        &envd,
        &format!(
            "path={}&signature={}",
            q(t),
            q(&sign(t, "read", "", "tok", None))
        ),
        b"no".to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(!target.exists());
    let (status, body) = upload_raw(
        &envd,
        &format!(
            "path={}&signature={}",
            q(t),
            q(&sign(t, "write", "", "tok", None))
        ),
        b"yes".to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(std::fs::read(&target).unwrap(), b"yes");
}

#[tokio::test]
async fn user_cannot_write_or_read_roots_files() {
    let envd = Envd::start().await;
    let name = format!("kiln-http-denied-{}", std::process::id());
    let path = PathBuf::from("/root").join(&name);
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}&username=user", q(path.to_str().unwrap())),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("permission denied")
    );
    assert!(!path.exists());

    // Nor create directories there.
    let nested = PathBuf::from("/root").join(&name).join("a/b.txt");
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}&username=user", q(nested.to_str().unwrap())),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(!PathBuf::from("/root").join(&name).exists());

    // Root may; the user still cannot read it back (/root is 0700).
    let (status, _) = upload_raw(
        &envd,
        &format!("path={}&username=root", q(path.to_str().unwrap())),
        b"secret".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let resp = download(
        &envd,
        &format!("path={}&username=user", q(path.to_str().unwrap())),
    )
    .await;
    let user_status = resp.status().as_u16();
    let resp = download(
        &envd,
        &format!("path={}&username=root", q(path.to_str().unwrap())),
    )
    .await;
    let root_status = resp.status().as_u16();
    let _ = std::fs::remove_file(&path);
    assert_eq!(user_status, 403);
    assert_eq!(root_status, 200);

    // A 0600 file of another user in a readable directory is refused too.
    let dir = user_dir();
    let private = dir.path().join("private");
    std::fs::write(&private, b"p").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let resp = download(
        &envd,
        &format!("path={}&username=user", q(private.to_str().unwrap())),
    )
    .await;
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn failed_uploads_leave_no_files_behind() {
    let envd = Envd::start().await;
    let dir = user_dir();

    // Corrupt gzip after valid data: 400, nothing written.
    let path = dir.path().join("bad.gz.txt");
    let mut body = gzip(&noise(1 << 20, 3));
    let len = body.len();
    body.truncate(len / 2);
    body.extend_from_slice(&[0xff; 4096]);
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 400, "{body}");
    assert!(!path.exists());
    assert!(temp_files(dir.path()).is_empty());

    // Truncated gzip: 400 as well.
    let mut body = gzip(b"short");
    body.truncate(body.len() - 4);
    let (status, _) = {
        let resp = envd
            .client
            .post(envd.url(&format!("/files?path={}", q(path.to_str().unwrap()))))
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
            .await
            .unwrap();
        json_of(resp).await
    };
    assert_eq!(status, 400);
    assert!(!path.exists());

    // The client dies mid-upload (once envd has started writing): an existing
    // file keeps its old content and the temp file is removed.
    let existing = dir.path().join("keep.txt");
    std::fs::write(&existing, b"old").unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let request = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(existing.to_str().unwrap()))))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .send();
    let request = tokio::spawn(request);
    tx.send(Ok(vec![1u8; 1 << 20])).await.unwrap();
    wait_until("a temp file appears", || !temp_files(dir.path()).is_empty()).await;
    tx.send(Err(std::io::Error::other("client gave up")))
        .await
        .unwrap();
    let result = request.await.unwrap();
    assert!(result.is_err() || !result.unwrap().status().is_success());
    wait_until("the temp file is removed", || {
        temp_files(dir.path()).is_empty()
    })
    .await;
    assert_eq!(std::fs::read(&existing).unwrap(), b"old");

    // A multipart body cut short.
    let fresh = dir.path().join("fresh.txt");
    let mut body = multipart(
        "bnd",
        &[("file", Some(fresh.to_str().unwrap()), &[7u8; 10000])],
    );
    body.truncate(5000);
    let resp = envd
        .client
        .post(envd.url("/files"))
        .header("content-type", "multipart/form-data; boundary=bnd")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(!fresh.exists());
    assert!(temp_files(dir.path()).is_empty());
}

/// ENOSPC maps to 507; needs permission to mount a small tmpfs.
#[tokio::test]
async fn full_disk_is_507() {
    let envd = Envd::start().await;
    let dir = user_dir();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount tmpfs here");
        return;
    }
    let path = mnt.join("big.bin");
    let (status, body) = upload_raw(
        &envd,
        &format!("path={}", q(path.to_str().unwrap())),
        noise(3 << 20, 9),
    )
    .await;
    let leftovers = temp_files(&mnt);
    let exists = path.exists();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["code"], 507);
    assert!(leftovers.is_empty());
    assert!(!exists);
}

/// A proxy pools connections to envd: after an upload the connection must
/// stay usable (the body read to its end, no silent close).
#[tokio::test]
async fn connection_stays_usable_after_a_multipart_upload() {
    use std::io::{BufRead, BufReader, Read, Write};
    let envd = Envd::start().await;
    let dir = user_dir();
    let target = dir.path().join("kept-alive.txt");
    let addr = envd.base.trim_start_matches("http://").to_string();
    let boundary = "kaboundary";
    let body = multipart(
        boundary,
        &[("file", Some(target.to_str().unwrap()), b"data")],
    );
    tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut request = format!(
            "POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        conn.write_all(&request).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let read_response = |reader: &mut BufReader<std::net::TcpStream>| -> String {
            let mut status = String::new();
            reader.read_line(&mut status).unwrap();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                assert!(!lower.starts_with("connection: close"), "envd closes: {line}");
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            status
        };
        assert!(read_response(&mut reader).contains("200"));
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(read_response(&mut reader).contains("204"));
    })
    .await
    .unwrap();
}
