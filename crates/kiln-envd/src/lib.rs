//! envd: the daemon inside every Kiln sandbox.
//!
//! It speaks E2B's envd protocol: Connect RPC services `process.Process` and
//! `filesystem.Filesystem` (JSON and binary protobuf, HTTP/1.1 and h2c) plus
//! plain HTTP endpoints (`/health`, `/files`, `/init`, `/envs`, `/metrics`).
//! Inside a sandbox envd is PID 1 and owns every process.

pub mod auth;
pub mod filesystem;
pub mod http;
pub mod listener;
pub mod paths;
pub mod process;
pub mod reaper;
pub mod state;
pub mod sudo;
pub mod users;

use std::future::Future;

pub use state::{EnvdState, InitState};

/// The port E2B's SDKs connect to.
pub const DEFAULT_PORT: u16 = 49983;

/// The version envd reports; the SDKs gate features on it (E2B's 0.6.4 has all
/// the features the current SDKs use).
pub const VERSION: &str = "0.6.4";

/// Builds the whole envd HTTP application.
pub fn app(state: EnvdState) -> axum::Router {
    let rpc = connectrpc::Router::new();
    let rpc = rpc.add_service(std::sync::Arc::new(process::ProcessService::new(
        state.clone(),
    )));
    let rpc = rpc.add_service(std::sync::Arc::new(filesystem::FilesystemService::new(
        state.clone(),
    )));
    let rpc = rpc
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_access_token,
        ));
    http::routes(state).merge(rpc)
}

/// Serves envd on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    state: EnvdState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    reaper::start();
    let listener = listener::ThreadListener::new(listener)?;
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
