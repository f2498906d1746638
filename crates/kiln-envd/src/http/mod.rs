//! envd's plain-HTTP endpoints: `/health`, `/files`, `/init`, `/envs`, `/metrics`.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use crate::state::EnvdState;

pub fn routes(state: EnvdState) -> Router {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .with_state(state)
}
