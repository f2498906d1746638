//! Who may use `/files`: the access token or a signed URL (E2B §4.8), and
//! Unix permission checks on behalf of the requesting user.

use std::os::unix::fs::MetadataExt;

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use super::{FilesQuery, HttpError};
use crate::auth::ACCESS_TOKEN_HEADER;
use crate::state::EnvdState;
use crate::users::User;

pub use kiln_proto::signature::signature;

/// Allows a `/files` request when no token is set, when `X-Access-Token`
/// matches, or when the query carries a valid, unexpired signature for
/// `operation` (`read` or `write`).
pub fn verify_files_access(
    state: &EnvdState,
    headers: &HeaderMap,
    query: &FilesQuery,
    operation: &str,
) -> Result<(), HttpError> {
    let Some(token) = state.access_token() else {
        return Ok(());
    };
    if let Some(header) = headers.get(ACCESS_TOKEN_HEADER) {
        return if bool::from(header.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(HttpError::unauthorized(
                "access token present in header but does not match",
            ))
        };
    }
    let Some(given) = query.signature.as_deref() else {
        return Err(HttpError::unauthorized("missing signature query parameter"));
    };
    let expiration = match query.signature_expiration.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<i64>().map_err(|_| {
            HttpError::bad_request(format!("invalid signature_expiration '{raw}'"))
        })?),
    };
    let expected = signature(
        query.path.as_deref().unwrap_or(""),
        operation,
        query.username.as_deref().unwrap_or(""),
        &token,
        expiration,
    );
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(HttpError::unauthorized("invalid signature"));
    }
    if let Some(exp) = expiration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if exp < now {
            return Err(HttpError::unauthorized("signature is already expired"));
        }
    }
    Ok(())
}

pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXEC: u32 = 1;

/// Whether `user` has all of `want` (`READ|WRITE|EXEC` bits) on a file with
/// `meta`, by its owner/group/other mode bits. Root may do anything.
pub fn allowed(user: &User, meta: &std::fs::Metadata, want: u32) -> bool {
    if user.is_root() {
        return true;
    }
    let mode = meta.mode();
    let bits = if meta.uid() == user.uid {
        mode >> 6
    } else if user.groups.contains(&meta.gid()) {
        mode >> 3
    } else {
        mode
    } & 0o7;
    bits & want == want
}

/// Whether `user` may traverse every directory from `/` down to `dir`.
pub fn reachable(user: &User, dir: &std::path::Path) -> bool {
    user.is_root()
        || dir
            .ancestors()
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.is_dir() && allowed(user, &m, EXEC)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_sdk_algorithm() {
        // Expected values computed independently with sha256sum | base64.
        assert_eq!(
            signature("/a.txt", "read", "", "tok", None),
            "v1_EV/DvoS4mUiocl2RlxlZEymBC6EMYhkDL6kq8QBzt6g"
        );
        assert_eq!(
            signature("/a.txt", "write", "user", "tok", Some(1_700_000_000)),
            "v1_5Zkrl/lAVkIIvgMqoHVmsB7aiu3Hi7btteiHbr6yzrU"
        );
    }

    #[test]
    fn checks_token_and_signature() {
        let state = EnvdState::new();
        let mut q = FilesQuery {
            path: Some("/x".into()),
            ..Default::default()
        };
        let h = HeaderMap::new();
        assert!(verify_files_access(&state, &h, &q, "read").is_ok());
        state.update_init(|i| i.access_token = Some("tok".into()));
        let err = verify_files_access(&state, &h, &q, "read").unwrap_err();
        assert_eq!(err.message, "missing signature query parameter");
        q.signature = Some(signature("/x", "read", "", "tok", None));
        assert!(verify_files_access(&state, &h, &q, "read").is_ok());
        assert_eq!(
            verify_files_access(&state, &h, &q, "write")
                .unwrap_err()
                .message,
            "invalid signature"
        );
        q.signature_expiration = Some("100".into());
        q.signature = Some(signature("/x", "read", "", "tok", Some(100)));
        assert_eq!(
            verify_files_access(&state, &h, &q, "read")
                .unwrap_err()
                .message,
            "signature is already expired"
        );
        let mut h = HeaderMap::new();
        h.insert(ACCESS_TOKEN_HEADER, "tok".parse().unwrap());
        assert!(verify_files_access(&state, &h, &q, "read").is_ok());
    }
}
