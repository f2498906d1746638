//! Who a request acts as, and the access token that guards envd.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::state::EnvdState;
use crate::users::{User, UserError};

/// Header carrying the sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// E2B's body for a request without a valid token.
pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// The username in an `Authorization: Basic base64(user:)` header, if any.
pub fn basic_username(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| "invalid authorization header")?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Err("authorization header is not Basic".to_string());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "invalid base64 in authorization header")?;
    let decoded = String::from_utf8(decoded).map_err(|_| "invalid authorization header")?;
    let name = decoded.split(':').next().unwrap_or_default();
    Ok((!name.is_empty()).then(|| name.to_string()))
}

/// The user a request acts as: the Basic-auth user, else the sandbox default.
/// `username` (from a query string) takes the place of the header when given.
pub fn request_user(
    state: &EnvdState,
    headers: &HeaderMap,
    username: Option<&str>,
) -> Result<User, UserError> {
    let name = match username.filter(|u| !u.is_empty()) {
        Some(u) => Some(u.to_string()),
        None => basic_username(headers).map_err(|_| UserError::Unknown(String::new()))?,
    };
    match name {
        Some(name) => User::lookup(&name),
        None => state.default_user(),
    }
}

/// The user of a Connect request, as a Connect error when unknown.
pub fn rpc_user(
    state: &EnvdState,
    ctx: &connectrpc::RequestContext,
) -> Result<User, connectrpc::ConnectError> {
    request_user(state, ctx.headers(), None).map_err(|e| match e {
        UserError::Unknown(_) => connectrpc::ConnectError::unauthenticated(e.to_string()),
        UserError::Io { .. } => connectrpc::ConnectError::internal(e.to_string()),
    })
}

/// Whether `headers` carry the access token (always true when none is set).
pub fn has_valid_token(state: &EnvdState, headers: &HeaderMap) -> bool {
    match state.access_token() {
        None => true,
        Some(token) => headers
            .get(ACCESS_TOKEN_HEADER)
            .is_some_and(|v| bool::from(v.as_bytes().ct_eq(token.as_bytes()))),
    }
}

/// envd's JSON error shape for plain-HTTP endpoints: `{"code":N,"message":"…"}`.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Middleware: rejects requests without the access token once one is set.
pub async fn require_access_token(
    State(state): State<EnvdState>,
    request: Request,
    next: Next,
) -> Response {
    if has_valid_token(&state, request.headers()) {
        next.run(request).await
    } else {
        // Take (a bounded part of) what the client is still sending, so it
        // reads the 401 instead of a broken pipe in the middle of its request.
        let drain = axum::body::to_bytes(request.into_body(), 1 << 20);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), drain).await;
        json_error(StatusCode::UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_username() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_username(&h).unwrap(), None);
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_username(&h).unwrap().as_deref(), Some("root"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(basic_username(&h).is_err());
    }

    #[test]
    fn token_checked_only_when_set() {
        let state = EnvdState::new();
        let mut h = HeaderMap::new();
        assert!(has_valid_token(&state, &h));
        state.update_init(|i| i.access_token = Some("secret".into()));
        assert!(!has_valid_token(&state, &h));
        h.insert(ACCESS_TOKEN_HEADER, "wrong".parse().unwrap());
        assert!(!has_valid_token(&state, &h));
        h.insert(ACCESS_TOKEN_HEADER, "secret".parse().unwrap());
        assert!(has_valid_token(&state, &h));
    }
}
