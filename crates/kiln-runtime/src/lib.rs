//! Kiln's node runtime: turns templates into running, isolated sandboxes.

pub mod network;
