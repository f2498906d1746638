//! Generated message types and Connect service traits for envd's
//! `process.Process` and `filesystem.Filesystem` services.

connectrpc::include_generated!();
