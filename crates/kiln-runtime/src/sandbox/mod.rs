//! Sandbox lifecycle: each operation lives in one module.

pub mod build;
pub mod create;
pub mod destroy;
pub(crate) mod disk;
mod loopdev;
pub mod pause;
pub mod pool;
pub mod recover;
