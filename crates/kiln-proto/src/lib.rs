//! Generated message types and Connect service traits for envd's
//! `process.Process` and `filesystem.Filesystem` services.

connectrpc::include_generated!();

/// Signed `/files` URLs, shared by envd (which checks them) and the proxy
/// (which finds the sandbox a header-less signed URL is for).
pub mod signature {
    use base64::Engine;
    use sha2::{Digest, Sha256};

    /// E2B's URL signature: `"v1_" + base64_nopad(sha256("<path>:<op>:<user>:<token>[:<exp>]"))`.
    pub fn signature(
        path: &str,
        operation: &str,
        username: &str,
        token: &str,
        expiration: Option<i64>,
    ) -> String {
        let mut text = format!("{path}:{operation}:{username}:{token}");
        if let Some(exp) = expiration {
            text.push_str(&format!(":{exp}"));
        }
        let digest = Sha256::digest(text.as_bytes());
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }
}
