//! `POST /files`: multipart or raw (optionally gzip) uploads, written to a
//! temp file next to the destination and renamed into place.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, BodyDataStream};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use super::access::{self, EXEC, WRITE};
use super::{FilesQuery, HttpError, user_error};
use crate::auth;
use crate::paths;
use crate::state::EnvdState;
use crate::users::User;

/// Prefix of in-flight upload files (the watcher hides it).
pub const TEMP_PREFIX: &str = ".kiln-upload-";
/// Header prefix of file metadata, stored as `user.e2b.<key>` xattrs.
const METADATA_HEADER: &str = "x-metadata-";
const XATTR_PREFIX: &str = "user.e2b.";
/// Write buffer and queue sizes: bounded memory per upload.
const BUFFER: usize = 256 * 1024;
const QUEUE: usize = 8;

/// One written file, as E2B's envd reports it.
#[derive(Debug, Serialize)]
pub struct WrittenEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BTreeMap<String, String>>,
}

pub async fn upload(
    State(state): State<EnvdState>,
    headers: HeaderMap,
    query: Result<Query<FilesQuery>, QueryRejection>,
    body: Body,
) -> Response {
    let mut data = body.into_data_stream();
    match handle(&state, &headers, query, &mut data).await {
        Ok(entries) => {
            // Whatever follows the closing boundary is read too, so hyper can
            // keep the connection alive (kiln serve's proxy pools them).
            while let Some(Ok(_)) = data.next().await {}
            Json(entries).into_response()
        }
        Err(e) => {
            // Read the rest of the body so the client gets the status
            // instead of a connection reset mid-upload.
            while let Some(Ok(_)) = data.next().await {}
            e.into_response()
        }
    }
}

async fn handle(
    state: &EnvdState,
    headers: &HeaderMap,
    query: Result<Query<FilesQuery>, QueryRejection>,
    data: &mut BodyDataStream,
) -> Result<Vec<WrittenEntry>, HttpError> {
    let query = FilesQuery::from_extractor(query)?;
    access::verify_files_access(state, headers, &query, "write")?;
    let user = auth::request_user(state, headers, query.username()).map_err(user_error)?;
    let metadata = Arc::new(parse_metadata(headers)?);
    let gzip = gzip_encoded(headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let path_query = query.path.as_deref().filter(|p| !p.is_empty());

    match mime.as_str() {
        "multipart/form-data" => {
            if gzip {
                return Err(HttpError::bad_request(
                    "Content-Encoding gzip is only supported for application/octet-stream uploads",
                ));
            }
            let boundary = multer::parse_boundary(content_type)
                .map_err(|e| HttpError::bad_request(format!("invalid multipart body: {e}")))?;
            multipart(data, boundary, &user, path_query, metadata).await
        }
        "application/octet-stream" => {
            let Some(path) = path_query else {
                return Err(HttpError::bad_request(
                    "the path query parameter is required for application/octet-stream uploads",
                ));
            };
            let dest = paths::resolve(path, &user, None);
            let mut writer = FileWriter::start(user, dest, metadata, gzip);
            while let Some(chunk) = data.next().await {
                match chunk {
                    Ok(chunk) => writer.write(chunk).await?,
                    Err(e) => {
                        writer.abort().await;
                        return Err(HttpError::bad_request(format!(
                            "error reading request body: {e}"
                        )));
                    }
                }
            }
            Ok(vec![writer.finish().await?])
        }
        "" => Err(HttpError::bad_request(
            "missing Content-Type: use multipart/form-data or application/octet-stream",
        )),
        other => Err(HttpError::bad_request(format!(
            "unsupported Content-Type '{other}': use multipart/form-data or application/octet-stream"
        ))),
    }
}

async fn multipart(
    data: &mut BodyDataStream,
    boundary: String,
    user: &User,
    path_query: Option<&str>,
    metadata: Arc<BTreeMap<String, String>>,
) -> Result<Vec<WrittenEntry>, HttpError> {
    let multipart_error = |e: multer::Error| match e {
        multer::Error::StreamReadFailed(e) => {
            HttpError::bad_request(format!("error reading request body: {e}"))
        }
        e => HttpError::bad_request(format!("invalid multipart body: {e}")),
    };
    let mut parts = multer::Multipart::new(data, boundary);
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    while let Some(mut field) = parts.next_field().await.map_err(multipart_error)? {
        if field.name() != Some("file") {
            while field.chunk().await.map_err(multipart_error)?.is_some() {}
            continue;
        }
        let target = match (path_query, field.file_name().filter(|f| !f.is_empty())) {
            (Some(path), _) => path.to_string(),
            (None, Some(name)) => name.to_string(),
            (None, None) => {
                return Err(HttpError::bad_request(
                    "the multipart part 'file' has no filename and the path query parameter is missing",
                ));
            }
        };
        let dest = paths::resolve(&target, user, None);
        if !seen.insert(dest.clone()) {
            return Err(HttpError::bad_request(format!(
                "cannot upload multiple files to the same path '{}'",
                dest.display()
            )));
        }
        let mut writer = FileWriter::start(user.clone(), dest, metadata.clone(), false);
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => writer.write(chunk).await?,
                Ok(None) => break,
                Err(e) => {
                    writer.abort().await;
                    return Err(multipart_error(e));
                }
            }
        }
        entries.push(writer.finish().await?);
    }
    if entries.is_empty() {
        return Err(HttpError::bad_request(
            "no multipart part named 'file' in the request",
        ));
    }
    Ok(entries)
}

/// `X-Metadata-<key>: <value>` headers (keys are lower-case already).
fn parse_metadata(headers: &HeaderMap) -> Result<BTreeMap<String, String>, HttpError> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER) else {
            continue;
        };
        if key.is_empty() {
            return Err(HttpError::bad_request(
                "empty metadata key in X-Metadata- header",
            ));
        }
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
            .ok_or_else(|| {
                HttpError::bad_request(format!("metadata '{key}' must be printable ASCII"))
            })?;
        out.insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

/// Whether the body is gzip-compressed (`Content-Encoding`).
fn gzip_encoded(headers: &HeaderMap) -> Result<bool, HttpError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let value = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match value.as_str() {
        "" | "identity" => Ok(false),
        "gzip" | "x-gzip" => Ok(true),
        other => Err(HttpError::bad_request(format!(
            "unsupported Content-Encoding '{other}': supported encodings are gzip and identity"
        ))),
    }
}

enum Msg {
    Data(Bytes),
    Done,
}

/// Feeds one file's bytes to a blocking writer thread. Dropping it without
/// `finish` aborts the upload and removes the temp file.
struct FileWriter {
    tx: mpsc::Sender<Msg>,
    task: Option<tokio::task::JoinHandle<Result<WrittenEntry, HttpError>>>,
}

impl FileWriter {
    fn start(
        user: User,
        dest: PathBuf,
        metadata: Arc<BTreeMap<String, String>>,
        gzip: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task =
            tokio::task::spawn_blocking(move || write_file(&user, &dest, &metadata, gzip, rx));
        Self {
            tx,
            task: Some(task),
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), HttpError> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.tx.send(Msg::Data(chunk)).await.is_err() {
            // The writer stopped early: its result says why.
            return Err(match self.result().await {
                Err(e) => e,
                Ok(_) => HttpError::internal("file writer stopped unexpectedly"),
            });
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<WrittenEntry, HttpError> {
        let _ = self.tx.send(Msg::Done).await;
        self.result().await
    }

    /// Cancels the upload and waits until its temp file is removed.
    async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            drop(self);
            let _ = task.await;
        }
    }

    async fn result(&mut self) -> Result<WrittenEntry, HttpError> {
        let Some(task) = self.task.take() else {
            return Err(HttpError::internal("file writer already finished"));
        };
        task.await
            .map_err(|e| HttpError::internal(format!("file writer failed: {e}")))?
    }
}

/// Where and how the file ends up.
struct Target {
    /// Real destination (a symlink at the requested path is followed).
    path: PathBuf,
    dir: PathBuf,
    mode: u32,
    /// `user.e2b.*` xattrs of the file being replaced, kept when the upload
    /// carries no metadata (E2B's envd overwrites in place).
    kept_xattrs: Vec<(CString, Vec<u8>)>,
}

fn io_error(e: &std::io::Error, what: &str) -> HttpError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => HttpError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("not enough disk space available: {what}: {e}"),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            HttpError::forbidden(format!("{what}: {e}"))
        }
        _ => HttpError::internal(format!("{what}: {e}")),
    }
}

fn not_a_directory(path: &Path) -> HttpError {
    HttpError::bad_request(format!("path '{}' is not a directory", path.display()))
}

fn denied(user: &User, path: &Path) -> HttpError {
    HttpError::forbidden(format!(
        "permission denied: user '{}' cannot write '{}'",
        user.name,
        path.display()
    ))
}

/// Checks the destination and the user's permissions and creates missing
/// parent directories (owned by the user).
fn prepare(user: &User, dest: &Path) -> Result<Target, HttpError> {
    let shown = dest.display().to_string();
    let mut path = dest.to_path_buf();
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink())
        && let Ok(real) = std::fs::canonicalize(&path)
    {
        path = real;
    }
    let existing = match std::fs::metadata(&path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(HttpError::bad_request(format!(
                "path '{shown}' is not valid: a parent is not a directory"
            )));
        }
        Err(e) => return Err(io_error(&e, &format!("error checking path '{shown}'"))),
    };
    if let Some(m) = &existing {
        if m.is_dir() {
            return Err(HttpError::bad_request(format!(
                "path '{shown}' is a directory"
            )));
        }
        if !m.is_file() {
            return Err(HttpError::bad_request(format!(
                "path '{shown}' is not a regular file"
            )));
        }
    }
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();

    // The deepest existing ancestor of the destination's directory.
    let mut missing = Vec::new();
    let mut ancestor = dir.clone();
    let ancestor_meta = loop {
        match std::fs::metadata(&ancestor) {
            Ok(m) => break m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(ancestor.clone());
                if !ancestor.pop() {
                    return Err(HttpError::internal("no existing ancestor directory"));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(HttpError::bad_request(format!(
                    "path '{shown}' is not valid: a parent is not a directory"
                )));
            }
            Err(e) => {
                return Err(io_error(
                    &e,
                    &format!("error checking directory '{}'", ancestor.display()),
                ));
            }
        }
    };
    if !ancestor_meta.is_dir() {
        return Err(not_a_directory(&ancestor));
    }
    if !access::reachable(user, &ancestor) {
        return Err(denied(user, dest));
    }
    let may_write = if missing.is_empty() {
        dir_writable(user, &ancestor_meta, existing.as_ref())
            || existing
                .as_ref()
                .is_some_and(|m| access::allowed(user, m, WRITE))
    } else {
        access::allowed(user, &ancestor_meta, WRITE | EXEC)
    };
    if !may_write {
        return Err(denied(user, dest));
    }

    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {
                let what = format!("error creating directory '{}'", d.display());
                std::os::unix::fs::chown(d, Some(user.uid), Some(user.gid))
                    .map_err(|e| io_error(&e, &what))?;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| io_error(&e, &what))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => {
                return Err(io_error(
                    &e,
                    &format!("error creating directory '{}'", d.display()),
                ));
            }
        }
    }

    Ok(Target {
        mode: existing.as_ref().map_or(0o644, |m| m.mode() & 0o777),
        kept_xattrs: if existing.is_some() {
            e2b_xattrs(&path)
        } else {
            Vec::new()
        },
        path,
        dir,
    })
}

/// Write permission on a directory, honouring the sticky bit for replacing
/// another user's file.
fn dir_writable(
    user: &User,
    dir: &std::fs::Metadata,
    existing: Option<&std::fs::Metadata>,
) -> bool {
    if !access::allowed(user, dir, WRITE | EXEC) {
        return false;
    }
    let sticky = dir.mode() & libc::S_ISVTX != 0;
    match existing {
        Some(file) if sticky && !user.is_root() => file.uid() == user.uid || dir.uid() == user.uid,
        _ => true,
    }
}

/// The writer thread: temp file, data, owner/mode/xattrs, fsync, rename.
fn write_file(
    user: &User,
    dest: &Path,
    metadata: &BTreeMap<String, String>,
    gzip: bool,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<WrittenEntry, HttpError> {
    let shown = dest.display().to_string();
    let target = prepare(user, dest)?;
    let write_err = |e: &std::io::Error| io_error(e, &format!("error writing file '{shown}'"));
    let tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&target.dir)
        .map_err(|e| write_err(&e))?;

    {
        let mut out = BufWriter::with_capacity(BUFFER, tmp.as_file());
        if gzip {
            let mut decoder = flate2::write::MultiGzDecoder::new(&mut out);
            let gzip_err = |e: std::io::Error| {
                if e.raw_os_error().is_some() {
                    write_err(&e)
                } else {
                    HttpError::bad_request(format!("invalid gzip body: {e}"))
                }
            };
            pump(&mut rx, &mut decoder, gzip_err)?;
            decoder.try_finish().map_err(gzip_err)?;
        } else {
            pump(&mut rx, &mut out, |e| write_err(&e))?;
        }
        out.flush().map_err(|e| write_err(&e))?;
    }

    let file = tmp.as_file();
    std::os::unix::fs::fchown(file, Some(user.uid), Some(user.gid)).map_err(|e| write_err(&e))?;
    file.set_permissions(std::fs::Permissions::from_mode(target.mode))
        .map_err(|e| write_err(&e))?;
    if metadata.is_empty() {
        for (name, value) in &target.kept_xattrs {
            if let Err(e) = set_xattr(file, name, value) {
                tracing::debug!(error = %e, path = %shown, "could not keep file metadata");
            }
        }
    } else {
        for (key, value) in metadata {
            let name = CString::new(format!("{XATTR_PREFIX}{key}"))
                .map_err(|_| HttpError::bad_request(format!("invalid metadata key '{key}'")))?;
            set_xattr(file, &name, value.as_bytes()).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTSUP) => HttpError::bad_request(format!(
                    "cannot store metadata for '{shown}': the filesystem does not support extended attributes"
                )),
                Some(libc::ERANGE) | Some(libc::E2BIG) => HttpError::bad_request(format!(
                    "metadata '{key}' is too large"
                )),
                _ => io_error(&e, &format!("error storing metadata for '{shown}'")),
            })?;
        }
    }
    file.sync_all().map_err(|e| write_err(&e))?;
    tmp.persist(&target.path).map_err(|e| {
        io_error(
            &e.error,
            &format!("error moving file into place at '{shown}'"),
        )
    })?;

    Ok(WrittenEntry {
        name: dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file",
        path: shown,
        metadata: (!metadata.is_empty()).then(|| metadata.clone()),
    })
}

/// Copies the queued chunks into `out` until `Done`; a closed queue means
/// the request was abandoned.
fn pump(
    rx: &mut mpsc::Receiver<Msg>,
    out: &mut impl Write,
    map_err: impl Fn(std::io::Error) -> HttpError,
) -> Result<(), HttpError> {
    loop {
        match rx.blocking_recv() {
            Some(Msg::Data(chunk)) => out.write_all(&chunk).map_err(&map_err)?,
            Some(Msg::Done) => return Ok(()),
            None => return Err(HttpError::bad_request("upload aborted")),
        }
    }
}

fn set_xattr(file: &File, name: &CString, value: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `name` is NUL-terminated and `value` is a valid buffer of the
    // given length; the fd is open for the duration of the call.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The `user.e2b.*` xattrs of `path` (empty when unsupported or unreadable).
fn e2b_xattrs(path: &Path) -> Vec<(CString, Vec<u8>)> {
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: `cpath` is NUL-terminated; `names` is writable for its length.
    let n = unsafe { libc::listxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0) {
        if !name.starts_with(XATTR_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated; `value` is writable for its length.
        let len = unsafe {
            libc::getxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.push((cname, value));
        }
    }
    out
}
