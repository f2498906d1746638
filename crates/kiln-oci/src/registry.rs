//! Talking to the registry (oci-client), the blob cache and the pull itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth as ClientAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::unpack::{self, Compression};
use crate::{ImageConfig, LayerInfo, OciError, PullOptions, PullStats, PulledImage};

/// Layers fetched at the same time.
const CONCURRENT_DOWNLOADS: usize = 3;

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, OciError> {
    let invalid = |reason: String| OciError::InvalidReference {
        reference: reference.to_string(),
        reason,
    };
    if reference.trim().is_empty() {
        return Err(invalid("empty reference".into()));
    }
    if reference.chars().any(|c| c.is_whitespace()) {
        return Err(invalid("contains whitespace".into()));
    }
    reference
        .parse::<Reference>()
        .map_err(|e| invalid(e.to_string()))
}

/// What a request is about, to turn client errors into [`OciError`]s that name it.
struct Ctx<'a> {
    reference: &'a str,
    image: &'a Reference,
    user: Option<&'a str>,
}

impl Ctx<'_> {
    fn registry(&self) -> String {
        self.image.registry().to_string()
    }

    fn auth_refused(&self) -> OciError {
        OciError::AuthRefused {
            registry: self.registry(),
            repository: self.image.repository().to_string(),
            user: self.user.map(str::to_string),
        }
    }

    fn not_found(&self, detail: String) -> OciError {
        OciError::NotFound {
            reference: self.reference.to_string(),
            registry: self.registry(),
            detail,
        }
    }

    fn bad_image(&self, reason: impl Into<String>) -> OciError {
        OciError::BadImage {
            reference: self.reference.to_string(),
            reason: reason.into(),
        }
    }

    fn map(&self, err: OciDistributionError) -> OciError {
        use OciDistributionError as E;
        match err {
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => self.auth_refused(),
            E::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    self.auth_refused()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    self.not_found(format!("{envelope} ({url})"))
                } else {
                    OciError::Registry {
                        registry: self.registry(),
                        detail: format!("{envelope} ({url})"),
                    }
                }
            }
            E::ServerError { code, url, message } => match code {
                401 | 403 => self.auth_refused(),
                404 => self.not_found(format!("HTTP 404 from {url}")),
                _ => OciError::Registry {
                    registry: self.registry(),
                    detail: format!("HTTP {code} from {url}: {}", message.trim()),
                },
            },
            E::ImageManifestNotFoundError(detail) => self.not_found(detail),
            E::DigestError(e) => self.bad_image(format!("digest check failed: {e}")),
            E::UnsupportedMediaTypeError(media_type)
            | E::IncompatibleLayerMediaTypeError(media_type) => OciError::UnsupportedMediaType {
                reference: self.reference.to_string(),
                what: "manifest".into(),
                media_type,
            },
            E::UnsupportedSchemaVersionError(v) => OciError::UnsupportedMediaType {
                reference: self.reference.to_string(),
                what: "manifest".into(),
                media_type: format!(
                    "schema version {v} (only schema 2 / OCI manifests are supported)"
                ),
            },
            E::ManifestParsingError(e) | E::VersionedParsingError(e) => {
                self.bad_image(format!("cannot parse the manifest: {e}"))
            }
            E::RequestError(e) => OciError::Network {
                registry: self.registry(),
                detail: error_chain(&e),
            },
            E::IoError(e) => OciError::Network {
                registry: self.registry(),
                detail: error_chain(&e),
            },
            other => OciError::Registry {
                registry: self.registry(),
                detail: other.to_string(),
            },
        }
    }
}

/// "a: b: c" for an error and its sources (reqwest hides the useful part in them).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn make_client(image: &Reference, opts: &PullOptions) -> Result<Client, OciError> {
    let mut plain_http: Vec<String> = Vec::new();
    for name in [image.registry(), image.resolve_registry()] {
        if is_loopback_registry(name) || opts.insecure_registries.iter().any(|r| r == name) {
            plain_http.push(name.to_string());
        }
    }
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain_http),
        // Indexes are resolved here, to name the platforms on failure.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(300)),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| OciError::Network {
        registry: image.registry().to_string(),
        detail: format!("cannot set up the HTTP client: {}", error_chain(&e)),
    })
}

fn client_auth(opts: &PullOptions) -> ClientAuth {
    match &opts.auth {
        Some(a) => ClientAuth::Basic(a.username.clone(), a.password.clone()),
        None => ClientAuth::Anonymous,
    }
}

pub(crate) async fn resolve_digest(
    reference: &str,
    opts: &PullOptions,
) -> Result<String, OciError> {
    let image = parse_reference(reference)?;
    let ctx = Ctx {
        reference,
        image: &image,
        user: opts.auth.as_ref().map(|a| a.username.as_str()),
    };
    let client = make_client(&image, opts)?;
    client
        .fetch_manifest_digest(&image, &client_auth(opts))
        .await
        .map_err(|e| ctx.map(e))
}

fn is_linux_amd64(p: &oci_client::manifest::Platform) -> bool {
    p.os.to_string() == "linux" && p.architecture.to_string() == "amd64"
}

/// The linux/amd64 image manifest for `image`: (top-level digest, image digest, manifest).
async fn fetch_image_manifest(
    client: &Client,
    image: &Reference,
    auth: &ClientAuth,
    ctx: &Ctx<'_>,
) -> Result<(String, String, OciImageManifest), OciError> {
    let (manifest, digest) = client
        .pull_manifest(image, auth)
        .await
        .map_err(|e| ctx.map(e))?;
    let index = match manifest {
        OciManifest::Image(m) => return Ok((digest.clone(), digest, m)),
        OciManifest::ImageIndex(index) => index,
    };
    let entry = index
        .manifests
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(is_linux_amd64))
        .ok_or_else(|| {
            let mut available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            available.dedup();
            OciError::NoLinuxAmd64 {
                reference: ctx.reference.to_string(),
                available: if available.is_empty() {
                    "no platforms listed".into()
                } else {
                    available.join(", ")
                },
            }
        })?;
    debug!(index = %digest, image = %entry.digest, "picked linux/amd64 from the index");
    let (manifest, image_digest) = client
        .pull_manifest(&image.clone_with_digest(entry.digest.clone()), auth)
        .await
        .map_err(|e| ctx.map(e))?;
    match manifest {
        OciManifest::Image(m) => Ok((digest, image_digest, m)),
        OciManifest::ImageIndex(_) => {
            Err(ctx.bad_image("the linux/amd64 entry of the index is another index"))
        }
    }
}

/// `sha256:<64 hex>` → the hex part (also keeps digests safe as file names).
fn sha256_hex<'a>(digest: &'a str, ctx: &Ctx<'_>) -> Result<&'a str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ctx.bad_image(format!(
            "unsupported blob digest '{digest}' (expected sha256:<64 hex digits>)"
        ))),
    }
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn temp_name(prefix: &str) -> String {
    format!("{prefix}.tmp-{:016x}", rand::random::<u64>())
}

/// Where cached blobs live: `<cache_dir>/blobs/sha256/<hex>`.
fn blob_dir(opts: &PullOptions) -> PathBuf {
    opts.cache_dir.join("blobs").join("sha256")
}

/// Makes sure the blob is in the cache with the right digest; returns its path
/// and whether it was downloaded.
async fn fetch_blob(
    client: &Client,
    image: &Reference,
    desc: &OciDescriptor,
    opts: &PullOptions,
    ctx: &Ctx<'_>,
) -> Result<(PathBuf, Option<u64>), OciError> {
    let hex = sha256_hex(&desc.digest, ctx)?;
    let dir = blob_dir(opts);
    let path = dir.join(hex);
    if tokio::fs::symlink_metadata(&path).await.is_ok() {
        let check = path.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&check))
            .await
            .map_err(|e| OciError::io("hashing a cached blob", std::io::Error::other(e)))?
            .map_err(|e| OciError::io(format!("reading cached blob {}", path.display()), e))?;
        if actual == desc.digest {
            debug!(digest = %desc.digest, "blob from cache");
            return Ok((path, None));
        }
        warn!(expected = %desc.digest, %actual, "cached blob is corrupt; downloading it again");
        let _ = tokio::fs::remove_file(&path).await;
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| OciError::io(format!("creating the blob cache {}", dir.display()), e))?;
    let tmp = dir.join(temp_name(&format!(".{hex}")));
    let result = download(client, image, desc, &tmp, ctx).await;
    match result {
        Ok(size) => {
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(|e| OciError::io(format!("storing blob {}", path.display()), e))?;
            debug!(digest = %desc.digest, size, "blob downloaded");
            Ok((path, Some(size)))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn download(
    client: &Client,
    image: &Reference,
    desc: &OciDescriptor,
    tmp: &Path,
    ctx: &Ctx<'_>,
) -> Result<u64, OciError> {
    let mut stream = client
        .pull_blob_stream(image, desc)
        .await
        .map_err(|e| ctx.map(e))?;
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| OciError::io(format!("creating {}", tmp.display()), e))?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| OciError::Network {
            registry: ctx.registry(),
            detail: format!("downloading blob {}: {}", desc.digest, error_chain(&e)),
        })?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| OciError::io(format!("writing {}", tmp.display()), e))?;
    }
    file.flush()
        .await
        .map_err(|e| OciError::io(format!("writing {}", tmp.display()), e))?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != desc.digest {
        return Err(OciError::DigestMismatch {
            registry: ctx.registry(),
            expected: desc.digest.clone(),
            actual,
        });
    }
    if desc.size >= 0 && desc.size as u64 != size {
        return Err(ctx.bad_image(format!(
            "blob {} is {size} bytes, the manifest says {}",
            desc.digest, desc.size
        )));
    }
    Ok(size)
}

const CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

#[derive(Deserialize)]
struct RawConfigFile {
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RawContainerConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainerConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

fn parse_config(bytes: &[u8], ctx: &Ctx<'_>) -> Result<ImageConfig, OciError> {
    let raw: RawConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| ctx.bad_image(format!("cannot parse the image config: {e}")))?;
    let os = raw.os.unwrap_or_default();
    let arch = raw.architecture.unwrap_or_default();
    if (!os.is_empty() && os != "linux") || (!arch.is_empty() && arch != "amd64") {
        return Err(OciError::NoLinuxAmd64 {
            reference: ctx.reference.to_string(),
            available: format!("{os}/{arch}"),
        });
    }
    let c = match raw.config {
        Some(c) => c,
        None => return Ok(ImageConfig::default()),
    };
    let env = c
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect();
    Ok(ImageConfig {
        env,
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    })
}

fn check_dest(dest: &Path) -> Result<(PathBuf, String), OciError> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(OciError::DestinationExists(dest.to_path_buf()));
    }
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            OciError::io(
                format!("destination {}", dest.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "has no file name"),
            )
        })?
        .to_string();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

pub(crate) async fn pull(
    reference: &str,
    opts: &PullOptions,
    dest: &Path,
) -> Result<PulledImage, OciError> {
    let image = parse_reference(reference)?;
    let (parent, dest_name) = check_dest(dest)?;
    let ctx = Ctx {
        reference,
        image: &image,
        user: opts.auth.as_ref().map(|a| a.username.as_str()),
    };
    let client = make_client(&image, opts)?;
    let auth = client_auth(opts);

    let (digest, image_digest, manifest) =
        fetch_image_manifest(&client, &image, &auth, &ctx).await?;
    if !CONFIG_MEDIA_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(OciError::UnsupportedMediaType {
            reference: reference.to_string(),
            what: "config".into(),
            media_type: manifest.config.media_type.clone(),
        });
    }
    // Refuse unknown layer types before downloading anything.
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        let compression = Compression::for_media_type(&layer.media_type).ok_or_else(|| {
            OciError::UnsupportedMediaType {
                reference: reference.to_string(),
                what: format!("layer {}", layer.digest),
                media_type: layer.media_type.clone(),
            }
        })?;
        sha256_hex(&layer.digest, &ctx)?;
        layers.push((layer, compression));
    }

    let mut stats = PullStats::default();
    let mut count = |downloaded: Option<u64>| match downloaded {
        Some(size) => {
            stats.blobs_downloaded += 1;
            stats.bytes_downloaded += size;
        }
        None => stats.blobs_cached += 1,
    };

    let (config_path, downloaded) =
        fetch_blob(&client, &image, &manifest.config, opts, &ctx).await?;
    count(downloaded);
    let config_bytes = tokio::fs::read(&config_path)
        .await
        .map_err(|e| OciError::io(format!("reading {}", config_path.display()), e))?;
    let config = parse_config(&config_bytes, &ctx)?;

    let fetched: Vec<(PathBuf, Option<u64>)> = futures_util::stream::iter(layers.iter())
        .map(|(layer, _)| fetch_blob(&client, &image, layer, opts, &ctx))
        .buffered(CONCURRENT_DOWNLOADS)
        .try_collect()
        .await?;
    let mut to_apply = Vec::with_capacity(fetched.len());
    for ((path, downloaded), (layer, compression)) in fetched.into_iter().zip(&layers) {
        count(downloaded);
        to_apply.push((path, *compression, layer.digest.clone()));
    }

    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| OciError::io(format!("creating {}", parent.display()), e))?;
    let tmp = parent.join(temp_name(&format!(".{dest_name}")));
    let dest_owned = dest.to_path_buf();
    let tmp_owned = tmp.clone();
    let unpacked = tokio::task::spawn_blocking(move || -> Result<(), OciError> {
        std::fs::create_dir(&tmp_owned)
            .map_err(|e| OciError::io(format!("creating {}", tmp_owned.display()), e))?;
        for (path, compression, layer_digest) in &to_apply {
            let file = std::fs::File::open(path)
                .map_err(|e| OciError::io(format!("opening {}", path.display()), e))?;
            unpack::apply_layer(&tmp_owned, file, *compression, layer_digest)?;
        }
        // rename(2) refuses to replace a non-empty directory, and a file or
        // empty directory that appeared meanwhile is checked here.
        if std::fs::symlink_metadata(&dest_owned).is_ok() {
            return Err(OciError::DestinationExists(dest_owned));
        }
        std::fs::rename(&tmp_owned, &dest_owned)
            .map_err(|e| OciError::io(format!("renaming into {}", dest_owned.display()), e))
    })
    .await
    .map_err(|e| OciError::io("unpacking task", std::io::Error::other(e)));
    if let Err(e) = unpacked.and_then(|r| r) {
        if let Err(rm) = std::fs::remove_dir_all(&tmp)
            && rm.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %tmp.display(), error = %rm, "cannot remove the partial unpack");
        }
        return Err(e);
    }

    info!(reference, %digest, layers = layers.len(), ?stats, dest = %dest.display(), "image pulled");
    Ok(PulledImage {
        reference: reference.to_string(),
        digest,
        image_digest,
        config,
        layers: layers
            .iter()
            .map(|(l, _)| LayerInfo {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size.max(0) as u64,
            })
            .collect(),
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_for(image: &Reference) -> Ctx<'_> {
        Ctx {
            reference: "r",
            image,
            user: None,
        }
    }

    #[test]
    fn loopback_registries_use_plain_http() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost:5000"));
        assert!(is_loopback_registry("localhost"));
        assert!(is_loopback_registry("[::1]:5000"));
        assert!(!is_loopback_registry("ghcr.io"));
        assert!(!is_loopback_registry("127.example.com:5000"));
        assert!(!is_loopback_registry("registry.local:5000"));
    }

    #[test]
    fn only_sha256_digests_name_cache_files() {
        let image: Reference = "busybox".parse().unwrap();
        let ctx = ctx_for(&image);
        let good = format!("sha256:{}", "0f".repeat(32));
        assert_eq!(sha256_hex(&good, &ctx).unwrap(), "0f".repeat(32));
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha512:{}", "0f".repeat(64)),
            format!("sha256:{}", "0F".repeat(32)),
            "sha256:".to_string(),
        ] {
            assert!(sha256_hex(&bad, &ctx).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_fields_are_read_and_foreign_platforms_refused() {
        let image: Reference = "busybox".parse().unwrap();
        let ctx = ctx_for(&image);
        let config = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1","B=x=y","C"],
                "Cmd":["sh"],"Entrypoint":null,"WorkingDir":"","User":"1000"}}"#,
            &ctx,
        )
        .unwrap();
        assert_eq!(
            config.env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        assert_eq!(config.cmd, vec!["sh".to_string()]);
        assert!(config.entrypoint.is_empty());
        assert_eq!(config.working_dir, None);
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert!(matches!(
            parse_config(br#"{"architecture":"arm64","os":"linux"}"#, &ctx),
            Err(OciError::NoLinuxAmd64 { .. })
        ));
        assert!(matches!(
            parse_config(b"not json", &ctx),
            Err(OciError::BadImage { .. })
        ));
    }
}
