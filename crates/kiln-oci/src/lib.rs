//! Pulls container images from OCI / Docker registries and unpacks them into a
//! directory that becomes a sandbox's root filesystem.
//!
//! [`pull`] resolves a reference (Docker Hub short names included), picks the
//! linux/amd64 image of a multi-arch index, downloads the config and layers
//! into a digest-addressed blob cache (every blob's digest is checked) and
//! applies the layers in order, whiteouts included, into a fresh directory
//! that is renamed into place only when complete. Layer content can never
//! write outside that directory: see [`unpack`] for the rules.

mod error;
mod registry;
pub mod unpack;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::OciError;

/// Credentials for a registry (HTTP basic, or exchanged for a bearer token
/// when the registry asks for one).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to reach the registry and where to cache blobs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub auth: Option<RegistryAuth>,
    /// Registries reached over plain HTTP (e.g. "127.0.0.1:5000"); localhost/127.0.0.1 may default to HTTP.
    pub insecure_registries: Vec<String>,
    /// Where blobs are cached by digest so a second pull downloads nothing.
    pub cache_dir: PathBuf,
}

impl PullOptions {
    /// Anonymous pulls over HTTPS (plain HTTP for loopback registries), blobs cached in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        PullOptions {
            auth: None,
            insecure_registries: Vec::new(),
            cache_dir: cache_dir.into(),
        }
    }
}

/// The parts of the image's config that decide how its processes start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// One layer of the pulled image, in application order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// How much of a pull came from the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullStats {
    /// Blobs (config and layers) fetched from the registry.
    pub blobs_downloaded: usize,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
    /// Blobs found in the cache (their digest checked again).
    pub blobs_cached: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference as given.
    pub reference: String,
    /// Digest of the manifest the reference points to (for a multi-arch
    /// image, the index): the same value [`resolve_digest`] returns.
    pub digest: String,
    /// Digest of the linux/amd64 image manifest that was unpacked (equal to
    /// `digest` unless the reference points to an index).
    pub image_digest: String,
    pub config: ImageConfig,
    pub layers: Vec<LayerInfo>,
    pub stats: PullStats,
}

/// Pulls `reference` (e.g. "python:3.12", "ghcr.io/o/i:tag", "127.0.0.1:5000/x@sha256:...") and unpacks it into
/// `dest` (which must not exist yet; created atomically: unpack into a temp dir beside it, then rename).
pub async fn pull(
    reference: &str,
    opts: &PullOptions,
    dest: &Path,
) -> Result<PulledImage, OciError> {
    registry::pull(reference, opts, dest).await
}

/// Resolves the manifest digest only (cheap; lets callers reuse an unpacked rootfs cached by digest).
pub async fn resolve_digest(reference: &str, opts: &PullOptions) -> Result<String, OciError> {
    registry::resolve_digest(reference, opts).await
}

/// The fully qualified form of `reference` ("python:3.12" → "docker.io/library/python:3.12").
pub fn normalize_reference(reference: &str) -> Result<String, OciError> {
    Ok(registry::parse_reference(reference)?.whole())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names_are_expanded() {
        assert_eq!(
            normalize_reference("python:3.12").unwrap(),
            "docker.io/library/python:3.12"
        );
        assert_eq!(
            normalize_reference("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("org/app:1").unwrap(),
            "docker.io/org/app:1"
        );
        assert_eq!(
            normalize_reference("ghcr.io/o/i:tag").unwrap(),
            "ghcr.io/o/i:tag"
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            normalize_reference(&format!("127.0.0.1:5000/x@{digest}")).unwrap(),
            format!("127.0.0.1:5000/x@{digest}")
        );
    }

    #[test]
    fn bad_references_are_rejected_with_the_reason() {
        for bad in [
            "",
            "Upper:tag",
            "x:",
            "a:b:c:d",
            "x@sha256:short",
            "bad ref",
        ] {
            match normalize_reference(bad) {
                Err(OciError::InvalidReference { reference, reason }) => {
                    assert_eq!(reference, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?}: expected InvalidReference, got {other:?}"),
            }
        }
    }

    #[test]
    fn auth_debug_hides_the_password() {
        let auth = RegistryAuth {
            username: "kiln".into(),
            password: "kiln-secret".into(),
        };
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("kiln") && !shown.contains("kiln-secret"),
            "{shown}"
        );
    }
}
