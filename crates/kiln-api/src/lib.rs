//! `kiln serve`: the E2B-compatible control API, the proxy that carries
//! sandbox traffic, and sandbox lifetimes, on top of one node's runtime.
//!
//! - [`server`]: start-up (database, runtime, the `base` template, keys) and the router;
//! - [`sandboxes`]: the sandbox endpoints; every create, pause, resume and kill
//!   the API makes goes through [`app::App`];
//! - [`proxy`]: sandbox traffic by `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers,
//!   `<port>-<id>.<domain>` host names, or a signed `/files` URL;
//! - [`builds`]: E2B's template build API (requests, uploads, status);
//! - [`lifecycle`]: end times (kill or auto-pause) and usage sampling;
//! - [`db`]: SQLite or PostgreSQL.

pub mod app;
pub mod auth;
pub mod builds;
pub mod db;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod sandboxes;
pub mod server;
pub mod templates;
pub mod util;

pub use error::ApiError;
pub use server::{Server, ServerConfig};
