//! envd's plain-HTTP endpoints: `/health`, `/files`, `/init`, `/envs`, `/metrics`.

mod access;
mod files;
mod init;
mod metrics;
mod upload;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::auth;
use crate::state::EnvdState;

pub use access::{signature, verify_files_access};

/// `/init` bodies are small JSON (a CA bundle at most).
const INIT_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// The plain-HTTP routes. `/files` streams bodies, so no body limit applies.
pub fn routes(state: EnvdState) -> Router {
    let guarded = Router::new()
        .route("/envs", get(init::envs))
        .route("/metrics", get(metrics::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_access_token,
        ));
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/init",
            post(init::init).layer(DefaultBodyLimit::max(INIT_BODY_LIMIT)),
        )
        .route(
            "/files",
            get(files::download)
                .post(upload::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .merge(guarded)
        .with_state(state)
}

/// An error answered as envd's JSON error body `{"code":N,"message":"…"}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "http request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "http request rejected");
        }
        auth::json_error(self.status, self.message)
    }
}

/// Query parameters of `GET`/`POST /files`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FilesQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<String>,
}

impl FilesQuery {
    /// The query of a request, as a JSON 400 when it cannot be parsed.
    pub fn from_extractor(
        query: Result<axum::extract::Query<FilesQuery>, QueryRejection>,
    ) -> Result<Self, HttpError> {
        query
            .map(|q| q.0)
            .map_err(|e| HttpError::bad_request(format!("invalid query: {}", e.body_text())))
    }

    /// `username`, treating an empty value as absent.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref().filter(|u| !u.is_empty())
    }
}

/// Maps a user lookup failure to envd's 401 (unknown user) or 500.
pub fn user_error(e: crate::users::UserError) -> HttpError {
    match e {
        crate::users::UserError::Unknown(_) => HttpError::unauthorized(e.to_string()),
        crate::users::UserError::Io { .. } => HttpError::internal(e.to_string()),
    }
}
