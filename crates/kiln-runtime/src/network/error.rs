use std::io;

/// Errors of the per-sandbox networking layer. Command failures carry the command, what it was
/// doing and its stderr so that an operator can reproduce them by hand.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Config(String),

    #[error("{context}: `{command}` exited with {status}: {stderr}")]
    Command {
        context: String,
        command: String,
        status: String,
        stderr: String,
    },

    #[error("{context}: cannot run `{command}`: {source}")]
    Spawn {
        context: String,
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("no free network slot: all {0} slots of the subnet are in use")]
    Exhausted(u32),

    #[error("network slot {0} is not active")]
    UnknownSlot(u32),

    #[error("network slot index {index} is out of range (the subnet has {max} slots)")]
    OutOfRange { index: u32, max: u32 },
}

impl NetworkError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        NetworkError::Io {
            context: context.into(),
            source,
        }
    }
}
