//! `GET /files`: streams a file to the client (Range, gzip, conditional GET).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::access::{self, READ};
use super::{FilesQuery, HttpError, user_error};
use crate::auth;
use crate::paths;
use crate::state::EnvdState;

/// Size of the chunks a file is read (and sent) in.
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between the reader thread and the connection.
const QUEUE: usize = 4;

pub async fn download(
    State(state): State<EnvdState>,
    headers: HeaderMap,
    query: Result<Query<FilesQuery>, QueryRejection>,
) -> Response {
    match serve(&state, &headers, query).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    state: &EnvdState,
    headers: &HeaderMap,
    query: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let query = FilesQuery::from_extractor(query)?;
    access::verify_files_access(state, headers, &query, "read")?;
    let user = auth::request_user(state, headers, query.username()).map_err(user_error)?;
    let path = paths::resolve(query.path.as_deref().unwrap_or(""), &user, None);
    let shown = path.display().to_string();

    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HttpError::new(
                StatusCode::NOT_FOUND,
                format!("path '{shown}' does not exist"),
            ));
        }
        Err(e) => {
            return Err(HttpError::internal(format!(
                "error checking if path exists '{shown}': {e}"
            )));
        }
    };
    if meta.is_dir() {
        return Err(HttpError::bad_request(format!(
            "path '{shown}' is a directory"
        )));
    }
    if !meta.is_file() {
        // FIFOs and devices could block the opener or never end.
        return Err(HttpError::bad_request(format!(
            "path '{shown}' is not a regular file"
        )));
    }
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    if !access::reachable(&user, parent) || !access::allowed(&user, &meta, READ) {
        return Err(HttpError::forbidden(format!(
            "permission denied: user '{}' cannot read '{shown}'",
            user.name
        )));
    }

    let mut encoding = choose_encoding(headers)?;
    let size = meta.len();
    let modified = meta.modified().ok();
    let last_modified = modified.map(httpdate::fmt_http_date);

    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_DISPOSITION, content_disposition(&path))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::VARY, "Accept-Encoding");
    if let Some(lm) = &last_modified {
        response = response.header(header::LAST_MODIFIED, lm);
    }

    // Conditional and range requests are answered without compression, like
    // E2B's envd (http.ServeContent); identity must then be acceptable.
    let conditional = headers.contains_key(header::IF_MODIFIED_SINCE)
        || headers.contains_key(header::IF_UNMODIFIED_SINCE);
    let range_header = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if conditional || range_header.is_some() {
        if !identity_acceptable(headers) {
            return Err(HttpError::new(
                StatusCode::NOT_ACCEPTABLE,
                "identity encoding not acceptable for Range or conditional request",
            ));
        }
        encoding = Encoding::Identity;
    }

    if let Some(mtime) = modified {
        if let Some(since) = header_date(headers, header::IF_UNMODIFIED_SINCE)
            && whole_seconds(mtime) > since
        {
            return Ok(empty(response, StatusCode::PRECONDITION_FAILED));
        }
        if let Some(since) = header_date(headers, header::IF_MODIFIED_SINCE)
            && whole_seconds(mtime) <= since
        {
            return Ok(empty(response, StatusCode::NOT_MODIFIED));
        }
    }

    // If-Range with a date: serve the range only if the file is unchanged.
    let range_header = range_header.filter(|_| match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
            .zip(modified)
            .is_some_and(|(date, mtime)| whole_seconds(mtime) <= date),
    });

    let file = File::open(&path)
        .map_err(|e| HttpError::internal(format!("error opening file '{shown}': {e}")))?;

    if let Some(range) = range_header {
        match parse_range(&range, size) {
            RangeSpec::Ignore => {}
            RangeSpec::Unsatisfiable => {
                let resp = response
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"));
                return Ok(empty(resp, StatusCode::RANGE_NOT_SATISFIABLE));
            }
            RangeSpec::Range(start, end) => {
                let len = end - start + 1;
                let body = stream_file(file, start, len, false);
                return response
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                    .header(header::CONTENT_LENGTH, len)
                    .body(body)
                    .map_err(|e| HttpError::internal(e.to_string()));
            }
        }
    }

    let response = match encoding {
        Encoding::Gzip => response
            .header(header::CONTENT_ENCODING, "gzip")
            .body(stream_file(file, 0, size, true)),
        Encoding::Identity => response
            .header(header::CONTENT_LENGTH, size)
            .body(stream_file(file, 0, size, false)),
    };
    response.map_err(|e| HttpError::internal(e.to_string()))
}

fn empty(builder: axum::http::response::Builder, status: StatusCode) -> Response {
    builder
        .status(status)
        .body(Body::empty())
        .unwrap_or_else(|_| status.into_response())
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
}

/// `inline; filename="<name>"`, plus RFC 5987 `filename*` for non-ASCII names.
fn content_disposition(path: &std::path::Path) -> HeaderValue {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '_'
            }
        })
        .collect();
    let quoted = ascii.replace('\\', "\\\\").replace('"', "\\\"");
    let mut value = format!("inline; filename=\"{quoted}\"");
    if ascii != name {
        let encoded =
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC);
        value.push_str(&format!("; filename*=UTF-8''{encoded}"));
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("inline"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

/// (coding, q) pairs of `Accept-Encoding`, lower-cased.
fn accepted(headers: &HeaderMap) -> Option<Vec<(String, f32)>> {
    let mut out = Vec::new();
    let mut seen = false;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        seen = true;
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if coding.is_empty() {
                continue;
            }
            let mut q = 1.0;
            for param in parts {
                if let Some(v) = param.trim().strip_prefix("q=") {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            out.push((coding, q));
        }
    }
    (seen && !out.is_empty()).then_some(out)
}

fn q_of(list: &[(String, f32)], names: &[&str]) -> Option<f32> {
    list.iter()
        .find(|(c, _)| names.contains(&c.as_str()))
        .map(|(_, q)| *q)
}

/// Whether the client accepts an unencoded body (RFC 9110: unless it is
/// refused with q=0, directly or through `*`).
fn identity_acceptable(headers: &HeaderMap) -> bool {
    let Some(list) = accepted(headers) else {
        return true;
    };
    q_of(&list, &["identity"])
        .or_else(|| q_of(&list, &["*"]))
        .is_none_or(|q| q > 0.0)
}

/// The response coding. gzip only when the client asks for it specifically
/// (the SDKs send exactly `Accept-Encoding: gzip` for `gzip=True`), not for
/// an HTTP client's blanket default such as `gzip, deflate`: compression caps
/// a download at a few hundred MB/s, and identity stays acceptable unless
/// refused with q=0 (RFC 9110). A header naming only unsupported codings
/// (e.g. `br`) gets 406, like E2B's envd.
fn choose_encoding(headers: &HeaderMap) -> Result<Encoding, HttpError> {
    let Some(list) = accepted(headers) else {
        return Ok(Encoding::Identity);
    };
    let gzip = q_of(&list, &["gzip", "x-gzip"]).unwrap_or(0.0);
    let listed_identity = q_of(&list, &["identity"]).or_else(|| q_of(&list, &["*"]));
    let specific = list
        .iter()
        .all(|(c, _)| matches!(c.as_str(), "gzip" | "x-gzip" | "identity"));
    if gzip > 0.0 && specific && gzip >= listed_identity.unwrap_or(0.0) {
        return Ok(Encoding::Gzip);
    }
    let only_unsupported = q_of(&list, &["gzip", "x-gzip"]).is_none() && listed_identity.is_none();
    let identity_ok = listed_identity.is_none_or(|q| q > 0.0);
    if identity_ok && !only_unsupported {
        Ok(Encoding::Identity)
    } else if gzip > 0.0 {
        Ok(Encoding::Gzip)
    } else {
        let names: Vec<&str> = list.iter().map(|(c, _)| c.as_str()).collect();
        Err(HttpError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "unsupported Accept-Encoding '{}': supported encodings are gzip and identity",
                names.join(", ")
            ),
        ))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Malformed or multi-range: serve the whole file.
    Ignore,
    Unsatisfiable,
    /// Inclusive byte range.
    Range(u64, u64),
}

fn parse_range(value: &str, size: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix range: the last N bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::Ignore;
        };
        if n == 0 || size == 0 {
            return RangeSpec::Unsatisfiable;
        }
        let n = n.min(size);
        return RangeSpec::Range(size - n, size - 1);
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeSpec::Ignore;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return RangeSpec::Ignore,
        }
    };
    if start >= size {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Range(start, end.min(size - 1))
}

/// Streams `len` bytes of `file` from `start` (gzip-compressed if asked),
/// read on a blocking thread so memory stays at a few chunks.
fn stream_file(file: File, start: u64, len: u64, gzip: bool) -> Body {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(QUEUE);
    tokio::task::spawn_blocking(move || {
        let result = if gzip {
            send_gzip(file, len, &tx)
        } else {
            send_plain(file, start, len, &tx)
        };
        if let Err(e) = result
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            tracing::warn!(error = %e, "streaming file failed");
            // Makes hyper abort the response instead of ending it cleanly.
            let _ = tx.blocking_send(Err(e));
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away")
}

/// Reads up to `CHUNK` (or `limit`) bytes, filling the buffer when possible.
fn read_chunk(file: &mut File, limit: u64) -> std::io::Result<Vec<u8>> {
    let want = (CHUNK as u64).min(limit) as usize;
    let mut buf = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn send_plain(
    mut file: File,
    start: u64,
    len: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
    }
    let mut left = len;
    while left > 0 {
        let chunk = read_chunk(&mut file, left)?;
        if chunk.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while it was being sent",
            ));
        }
        left -= chunk.len() as u64;
        tx.blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| gone())?;
    }
    Ok(())
}

/// A `Write` that forwards full chunks to the response channel.
struct ChunkSink<'a> {
    buf: Vec<u8>,
    tx: &'a mpsc::Sender<std::io::Result<Bytes>>,
}

impl ChunkSink<'_> {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| gone())
    }
}

impl Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn send_gzip(
    mut file: File,
    len: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let sink = ChunkSink {
        buf: Vec::with_capacity(CHUNK),
        tx,
    };
    let mut encoder = flate2::write::GzEncoder::new(sink, flate2::Compression::fast());
    let mut left = len;
    while left > 0 {
        let chunk = read_chunk(&mut file, left)?;
        if chunk.is_empty() {
            break;
        }
        left -= chunk.len() as u64;
        encoder.write_all(&chunk)?;
    }
    encoder.finish()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, accept.parse().unwrap());
        h
    }

    #[test]
    fn picks_encoding() {
        assert_eq!(
            choose_encoding(&HeaderMap::new()).unwrap(),
            Encoding::Identity
        );
        assert_eq!(
            choose_encoding(&headers("gzip, deflate")).unwrap(),
            Encoding::Identity
        );
        assert_eq!(choose_encoding(&headers("gzip")).unwrap(), Encoding::Gzip);
        assert_eq!(
            choose_encoding(&headers("gzip, deflate, identity;q=0")).unwrap(),
            Encoding::Gzip
        );
        assert_eq!(
            choose_encoding(&headers("identity")).unwrap(),
            Encoding::Identity
        );
        assert_eq!(
            choose_encoding(&headers("gzip;q=0.5, identity")).unwrap(),
            Encoding::Identity
        );
        assert_eq!(
            choose_encoding(&headers("br, *")).unwrap(),
            Encoding::Identity
        );
        assert_eq!(
            choose_encoding(&headers("br")).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            choose_encoding(&headers("gzip;q=0, identity;q=0"))
                .unwrap_err()
                .status,
            StatusCode::NOT_ACCEPTABLE
        );
        assert!(identity_acceptable(&headers("gzip, identity")));
        assert!(identity_acceptable(&headers("gzip, deflate")));
        assert!(!identity_acceptable(&headers("gzip, identity;q=0")));
        assert!(!identity_acceptable(&headers("gzip, *;q=0")));
        assert!(identity_acceptable(&HeaderMap::new()));
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(parse_range("bytes=0-4", 10), RangeSpec::Range(0, 4));
        assert_eq!(parse_range("bytes=5-", 10), RangeSpec::Range(5, 9));
        assert_eq!(parse_range("bytes=5-100", 10), RangeSpec::Range(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), RangeSpec::Range(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), RangeSpec::Range(0, 9));
        assert_eq!(parse_range("bytes=10-", 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=4-2", 10), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 10), RangeSpec::Ignore);
    }

    #[test]
    fn disposition_quotes_names() {
        let v = content_disposition(std::path::Path::new("/a/b \"c\".txt"));
        assert_eq!(v, "inline; filename=\"b \\\"c\\\".txt\"");
        let v = content_disposition(std::path::Path::new("/a/é.txt"));
        assert_eq!(
            v,
            "inline; filename=\"_.txt\"; filename*=UTF-8''%C3%A9%2Etxt"
        );
    }
}
