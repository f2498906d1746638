use std::path::PathBuf;

/// Why a pull failed. Every variant names its cause (registry, reference,
/// layer, path) so the message can be shown to a user as is.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference '{reference}': {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("image '{reference}' not found in registry {registry}: {detail}")]
    NotFound {
        reference: String,
        registry: String,
        detail: String,
    },

    /// The registry refused the credentials given, or anonymous access.
    #[error("{}", auth_message(registry, user.as_deref(), repository))]
    AuthRefused {
        registry: String,
        repository: String,
        /// The user whose credentials were refused; `None` for anonymous access.
        user: Option<String>,
    },

    #[error("image '{reference}' has no linux/amd64 variant (it has: {available})")]
    NoLinuxAmd64 {
        reference: String,
        available: String,
    },

    #[error("unsupported media type '{media_type}' for the {what} of '{reference}'")]
    UnsupportedMediaType {
        reference: String,
        what: String,
        media_type: String,
    },

    #[error("image '{reference}' is malformed: {reason}")]
    BadImage { reference: String, reason: String },

    #[error("blob {expected} from registry {registry} has digest {actual}")]
    DigestMismatch {
        registry: String,
        expected: String,
        actual: String,
    },

    #[error("cannot reach registry {registry}: {detail}")]
    Network { registry: String, detail: String },

    #[error("registry {registry} failed: {detail}")]
    Registry { registry: String, detail: String },

    #[error("layer {layer}: unsafe entry '{entry}': {reason}")]
    UnsafeLayer {
        layer: String,
        entry: String,
        reason: String,
    },

    #[error("layer {layer}: {detail}")]
    BadLayer { layer: String, detail: String },

    #[error("destination {} already exists", .0.display())]
    DestinationExists(PathBuf),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn auth_message(registry: &str, user: Option<&str>, repository: &str) -> String {
    match user {
        Some(user) => format!("registry {registry} refused the credentials for user '{user}'"),
        None => format!(
            "registry {registry} refused anonymous access to '{repository}' \
             (it needs credentials, or the repository does not exist)"
        ),
    }
}

impl OciError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        OciError::Io {
            context: context.into(),
            source,
        }
    }
}
