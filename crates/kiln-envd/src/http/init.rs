//! `POST /init` (the orchestrator configures envd) and `GET /envs`.

use std::collections::HashMap;
use std::io::Write;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::HttpError;
use crate::auth::{self, UNAUTHORIZED_MESSAGE};
use crate::state::EnvdState;
use crate::users::User;

/// The `/init` body; unknown fields (volumeMounts, hyperloopIP, lifecycleID,
/// caBundle, ...) are accepted and ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    env_vars: Option<HashMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    /// Kiln: random bytes (base64) mixed into the kernel pool after restore.
    entropy: Option<String>,
    /// Kiln: the sandbox's hostname.
    hostname: Option<String>,
}

pub async fn envs(State(state): State<EnvdState>) -> Json<HashMap<String, String>> {
    Json(state.env_vars())
}

pub async fn init(State(state): State<EnvdState>, headers: HeaderMap, body: Bytes) -> Response {
    match apply(&state, &headers, &body) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn apply(state: &EnvdState, headers: &HeaderMap, body: &[u8]) -> Result<(), HttpError> {
    let request: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| HttpError::bad_request(format!("invalid /init body: {e}")))?
    };

    // Once a token is set, only its holder may re-initialise (header, or the
    // same token in the body, as the orchestrator sends after a resume).
    if let Some(current) = state.access_token() {
        let in_body = request
            .access_token
            .as_deref()
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(current.as_bytes())));
        if !in_body && !auth::has_valid_token(state, headers) {
            return Err(HttpError::unauthorized(UNAUTHORIZED_MESSAGE));
        }
    }

    // Validate everything before changing anything.
    if let Some(user) = request.default_user.as_deref().filter(|u| !u.is_empty()) {
        User::lookup(user)
            .map_err(|e| HttpError::bad_request(format!("invalid default user: {e}")))?;
    }
    let timestamp = match request.timestamp.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(parse_rfc3339(t).ok_or_else(|| {
            HttpError::bad_request(format!("invalid timestamp '{t}': expected RFC 3339"))
        })?),
        None => None,
    };
    let entropy = match request.entropy.as_deref().filter(|e| !e.is_empty()) {
        Some(e) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(e.trim())
                .map_err(|err| HttpError::bad_request(format!("invalid entropy: {err}")))?,
        ),
        None => None,
    };

    if let Some(ts) = timestamp {
        set_clock_if_behind(ts);
    }
    if let Some(bytes) = entropy {
        add_entropy(&bytes);
    }
    if let Some(name) = request.hostname.as_deref().filter(|h| !h.is_empty())
        && let Err(e) = nix::unistd::sethostname(name)
    {
        tracing::warn!(error = %e, hostname = name, "could not set hostname");
    }

    state.update_init(|init| {
        if let Some(vars) = request.env_vars {
            init.env_vars.extend(vars);
        }
        if let Some(token) = request.access_token {
            init.access_token = (!token.is_empty()).then_some(token);
        }
        if let Some(user) = request.default_user {
            init.default_user = (!user.is_empty()).then_some(user);
        }
        if let Some(dir) = request.default_workdir {
            init.default_workdir = (!dir.is_empty()).then_some(dir);
        }
    });
    tracing::info!("envd initialised");
    Ok(())
}

/// Moves the clock forward to `target` (unix nanoseconds) if it is behind,
/// e.g. after a snapshot restore. Never moves it back.
fn set_clock_if_behind(target: i128) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    if target <= now {
        return;
    }
    let secs = (target / 1_000_000_000) as libc::time_t;
    let nanos = (target % 1_000_000_000) as libc::c_long;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => tracing::info!(behind_ms = (target - now) / 1_000_000, "system clock set"),
        Err(nix::errno::Errno::EPERM) => {
            tracing::debug!("not allowed to set the system clock");
        }
        Err(e) => tracing::warn!(error = %e, "could not set the system clock"),
    }
}

/// Mixes `bytes` into the kernel's entropy pool and asks for a reseed, so a
/// restored snapshot does not repeat its random numbers.
fn add_entropy(bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .and_then(|mut f| f.write_all(bytes).map(|_| f));
    match file {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            // RNDRESEEDCRNG = _IO('R', 0x07): reseed the CRNG from the pool now.
            const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
            // SAFETY: the ioctl takes no argument and the fd is open.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
            if rc != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "crng reseed failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not write entropy"),
    }
}

/// Parses an RFC 3339 timestamp (`2024-01-02T03:04:05.123456789Z`, offsets
/// allowed) into unix nanoseconds.
fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = s.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let mut padded: String = digits.chars().take(9).collect();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs as i128 * 1_000_000_000 + nanos as i128)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.5Z"),
            Some(1_709_210_096_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:34:56.123456789+02:00"),
            Some(1_709_210_096_123_456_789)
        );
        assert_eq!(parse_rfc3339("2024-02-29"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00.Z"), None);
    }

    #[test]
    fn init_merges_and_guards_token() {
        let state = EnvdState::new();
        let h = HeaderMap::new();
        apply(
            &state,
            &h,
            br#"{"envVars":{"A":"1"},"accessToken":"t1","volumeMounts":[]}"#,
        )
        .unwrap();
        assert_eq!(state.access_token().as_deref(), Some("t1"));
        // Without the token: refused, nothing changes.
        let err = apply(&state, &h, br#"{"envVars":{"B":"2"}}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert!(!state.env_vars().contains_key("B"));
        // The same token in the body is accepted.
        apply(&state, &h, br#"{"envVars":{"B":"2"},"accessToken":"t1"}"#).unwrap();
        assert_eq!(state.env_vars().len(), 2);
        // Changing it needs the current one in the header.
        assert!(apply(&state, &h, br#"{"accessToken":"t2"}"#).is_err());
        let mut h = HeaderMap::new();
        h.insert(auth::ACCESS_TOKEN_HEADER, "t1".parse().unwrap());
        apply(&state, &h, br#"{"accessToken":"t2"}"#).unwrap();
        assert_eq!(state.access_token().as_deref(), Some("t2"));
        // Unknown default user: 400.
        let mut h = HeaderMap::new();
        h.insert(auth::ACCESS_TOKEN_HEADER, "t2".parse().unwrap());
        let err = apply(&state, &h, br#"{"defaultUser":"no-such-user-kiln"}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        apply(
            &state,
            &h,
            br#"{"defaultUser":"root","timestamp":"2000-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(state.init().default_user.as_deref(), Some("root"));
    }
}
