//! Pulls from real registries started by `scripts/test-registry.sh start`:
//! an open one (KILN_TEST_REGISTRY) and one with htpasswd auth
//! (KILN_TEST_AUTH_REGISTRY, user kiln / kiln-secret). The test images there
//! were built with umoci and pushed with skopeo; the few odd ones below
//! (uncompressed layers, a malicious layer, a non-container artifact) are
//! pushed here with oci-client.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_oci::{OciError, PullOptions, PulledImage, RegistryAuth};

const REPO: &str = "kiln-test/busybox";

fn env_registry(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set. Start the test registries and export their addresses:\n  \
             bash scripts/test-registry.sh start\n  \
             export KILN_TEST_REGISTRY=127.0.0.1:5000 KILN_TEST_AUTH_REGISTRY=127.0.0.1:5001"
        )
    })
}

fn open_registry() -> String {
    env_registry("KILN_TEST_REGISTRY")
}

fn auth_registry() -> String {
    env_registry("KILN_TEST_AUTH_REGISTRY")
}

fn kiln_auth(password: &str) -> Option<RegistryAuth> {
    Some(RegistryAuth {
        username: "kiln".into(),
        password: password.into(),
    })
}

/// A scratch dir with a blob cache and room for destinations.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn opts(&self) -> PullOptions {
        PullOptions::new(self.dir.path().join("cache"))
    }

    fn dest(&self, name: &str) -> PathBuf {
        self.dir.path().join("images").join(name)
    }

    /// Fails unless `dest` is absent and nothing (temp dirs) was left beside it.
    fn assert_nothing_left(&self, dest: &Path) {
        assert!(!dest.exists(), "{} was left behind", dest.display());
        let parent = dest.parent().unwrap();
        if parent.exists() {
            let left: Vec<_> = std::fs::read_dir(parent)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().contains(".tmp-"))
                .collect();
            assert!(left.is_empty(), "temporary dirs left: {left:?}");
        }
    }
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// The tree of the umoci-built test image (see scripts/test-registry.sh).
fn check_busybox_tree(root: &Path) {
    // Layer 1 content.
    assert_eq!(
        std::fs::read_to_string(root.join("etc/kiln-release")).unwrap(),
        "kiln test image\n"
    );
    let owned = std::fs::metadata(root.join("home/user/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000), "ownership");
    assert_eq!(owned.mode() & 0o7777, 0o640);
    let home = std::fs::metadata(root.join("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert_eq!(
        std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/kiln-release.symlink")).unwrap(),
        Path::new("kiln-release")
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let a = std::fs::metadata(root.join("etc/kiln-release")).unwrap();
    let b = std::fs::metadata(root.join("etc/kiln-release.hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link");
    assert_eq!(a.nlink(), 2);
    // Layer 2: whiteouts and the opaque directory.
    assert!(
        !exists(&root.join("etc/deleted-later")),
        "whiteout of a file"
    );
    assert!(!exists(&root.join("etc/.wh.deleted-later")));
    assert!(!exists(&root.join("var/gone")), "whiteout of a directory");
    assert!(exists(&root.join("var")));
    let mut opaque: Vec<String> = std::fs::read_dir(root.join("opt/opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opaque.sort();
    assert_eq!(opaque, ["new"], "opaque dir keeps only layer 2's entries");
    // The image runs.
    let out = Command::new("chroot")
        .arg(root)
        .args(["/bin/busybox", "true"])
        .output()
        .expect("running chroot");
    assert!(out.status.success(), "chroot busybox true: {out:?}");
    let out = Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", "cat /etc/kiln-release.symlink"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kiln test image\n");
}

fn check_config(image: &PulledImage) {
    let c = &image.config;
    assert!(
        c.env.contains(&("KILN_TEST".into(), "yes".into())),
        "{:?}",
        c.env
    );
    assert!(c.env.contains(&("PATH".into(), "/bin".into())));
    assert_eq!(c.cmd, ["/bin/sh", "-c", "echo hello"]);
    assert!(c.entrypoint.is_empty());
    assert_eq!(c.working_dir.as_deref(), Some("/home/user"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
}

async fn pull_and_check(tag: &str, layer_suffix: &str) {
    let s = Scratch::new();
    let reference = format!("{}/{REPO}:{tag}", open_registry());
    let dest = s.dest(tag);
    let image = kiln_oci::pull(&reference, &s.opts(), &dest).await.unwrap();
    assert_eq!(image.reference, reference);
    assert_eq!(image.layers.len(), 2);
    for layer in &image.layers {
        assert!(
            layer.media_type.ends_with(layer_suffix),
            "{} is not a {layer_suffix} layer",
            layer.media_type
        );
    }
    assert_eq!(image.stats.blobs_downloaded, 3, "config + 2 layers");
    assert_eq!(image.stats.blobs_cached, 0);
    assert_eq!(image.digest, image.image_digest);
    assert_eq!(
        image.digest,
        kiln_oci::resolve_digest(&reference, &s.opts())
            .await
            .unwrap()
    );
    check_busybox_tree(&dest);
    check_config(&image);
}

#[tokio::test]
async fn root_pull_gzip_image() {
    pull_and_check("gzip", "+gzip").await;
}

#[tokio::test]
async fn root_pull_zstd_image() {
    pull_and_check("zstd", "+zstd").await;
}

#[tokio::test]
async fn root_pull_docker_schema2_image() {
    // skopeo --format v2s2: Docker manifest, config and layer media types.
    pull_and_check(
        "docker",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    )
    .await;
}

#[tokio::test]
async fn root_second_pull_uses_the_blob_cache() {
    let s = Scratch::new();
    let opts = s.opts();
    let reference = format!("{}/{REPO}:gzip", open_registry());
    let first = kiln_oci::pull(&reference, &opts, &s.dest("one"))
        .await
        .unwrap();
    assert_eq!(first.stats.blobs_downloaded, 3);

    let second = kiln_oci::pull(&reference, &opts, &s.dest("two"))
        .await
        .unwrap();
    assert_eq!(second.stats.blobs_downloaded, 0, "{:?}", second.stats);
    assert_eq!(second.stats.bytes_downloaded, 0);
    assert_eq!(second.stats.blobs_cached, 3);
    assert_eq!(second.digest, first.digest);
    check_busybox_tree(&s.dest("two"));

    // A corrupted cache entry is noticed (digest check) and fetched again.
    let layer_hex = first.layers[0].digest.strip_prefix("sha256:").unwrap();
    let cached = opts.cache_dir.join("blobs/sha256").join(layer_hex);
    std::fs::write(&cached, b"corrupted").unwrap();
    let third = kiln_oci::pull(&reference, &opts, &s.dest("three"))
        .await
        .unwrap();
    assert_eq!(third.stats.blobs_downloaded, 1, "{:?}", third.stats);
    assert_eq!(third.stats.blobs_cached, 2);
    check_busybox_tree(&s.dest("three"));
}

#[tokio::test]
async fn root_pull_by_digest() {
    let s = Scratch::new();
    let tagged = format!("{}/{REPO}:gzip", open_registry());
    let digest = kiln_oci::resolve_digest(&tagged, &s.opts()).await.unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let by_digest = format!("{}/{REPO}@{digest}", open_registry());
    let image = kiln_oci::pull(&by_digest, &s.opts(), &s.dest("d"))
        .await
        .unwrap();
    assert_eq!(image.digest, digest);
    check_busybox_tree(&s.dest("d"));

    let wrong = format!("{}/{REPO}@sha256:{}", open_registry(), "0".repeat(64));
    let dest = s.dest("wrong");
    let err = kiln_oci::pull(&wrong, &s.opts(), &dest).await.unwrap_err();
    assert!(matches!(err, OciError::NotFound { .. }), "{err:?}");
    s.assert_nothing_left(&dest);
}

#[tokio::test]
async fn root_multi_arch_index_picks_linux_amd64() {
    let s = Scratch::new();
    let reg = open_registry();
    let reference = format!("{reg}/{REPO}:multi");
    let dest = s.dest("multi");
    let image = kiln_oci::pull(&reference, &s.opts(), &dest).await.unwrap();
    let index_digest = kiln_oci::resolve_digest(&reference, &s.opts())
        .await
        .unwrap();
    assert_eq!(image.digest, index_digest, "digest is the index's");
    let amd64 = kiln_oci::resolve_digest(&format!("{reg}/{REPO}:gzip"), &s.opts())
        .await
        .unwrap();
    assert_eq!(image.image_digest, amd64, "the amd64 entry was unpacked");
    assert!(!exists(&dest.join("ARCH")), "the arm64 image was unpacked");
    check_busybox_tree(&dest);
    check_config(&image);
}

#[tokio::test]
async fn root_index_without_linux_amd64_is_refused() {
    let s = Scratch::new();
    let reference = format!("{}/{REPO}:arm64-only", open_registry());
    let dest = s.dest("arm");
    let err = kiln_oci::pull(&reference, &s.opts(), &dest)
        .await
        .unwrap_err();
    match &err {
        OciError::NoLinuxAmd64 { available, .. } => {
            assert_eq!(available, "linux/arm64")
        }
        other => panic!("expected NoLinuxAmd64, got {other:?}"),
    }
    assert!(err.to_string().contains("linux/amd64"), "{err}");
    s.assert_nothing_left(&dest);
}

#[tokio::test]
async fn root_auth_registry_accepts_the_right_credentials() {
    let s = Scratch::new();
    let reference = format!("{}/{REPO}:zstd", auth_registry());
    let mut opts = s.opts();
    opts.auth = kiln_auth("kiln-secret");
    let dest = s.dest("auth");
    let image = kiln_oci::pull(&reference, &opts, &dest).await.unwrap();
    check_busybox_tree(&dest);
    check_config(&image);
    assert_eq!(
        kiln_oci::resolve_digest(&reference, &opts).await.unwrap(),
        image.digest
    );
}

#[tokio::test]
async fn root_auth_registry_refuses_wrong_or_missing_credentials() {
    let s = Scratch::new();
    let registry = auth_registry();
    let reference = format!("{registry}/{REPO}:gzip");

    let mut opts = s.opts();
    opts.auth = kiln_auth("wrong-password");
    let dest = s.dest("wrong");
    let err = kiln_oci::pull(&reference, &opts, &dest).await.unwrap_err();
    assert!(
        matches!(&err, OciError::AuthRefused { user: Some(u), .. } if u == "kiln"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("registry {registry} refused the credentials for user 'kiln'")
    );
    s.assert_nothing_left(&dest);
    let err = kiln_oci::resolve_digest(&reference, &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::AuthRefused { .. }), "{err:?}");

    let dest = s.dest("anonymous");
    let err = kiln_oci::pull(&reference, &s.opts(), &dest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OciError::AuthRefused { user: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&registry), "{err}");
    s.assert_nothing_left(&dest);
}

#[tokio::test]
async fn root_unknown_tag_or_repository_is_not_found() {
    let s = Scratch::new();
    let reg = open_registry();
    for reference in [
        format!("{reg}/{REPO}:no-such-tag"),
        format!("{reg}/kiln-test/no-such-repo:latest"),
    ] {
        let dest = s.dest("missing");
        let err = kiln_oci::pull(&reference, &s.opts(), &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, OciError::NotFound { .. }),
            "{reference}: {err:?}"
        );
        assert!(err.to_string().contains(&reference), "{err}");
        s.assert_nothing_left(&dest);
        let err = kiln_oci::resolve_digest(&reference, &s.opts())
            .await
            .unwrap_err();
        assert!(
            matches!(err, OciError::NotFound { .. }),
            "{reference}: {err:?}"
        );
    }
}

#[tokio::test]
async fn root_existing_destination_and_bad_reference_are_refused() {
    let s = Scratch::new();
    let dest = s.dest("exists");
    std::fs::create_dir_all(&dest).unwrap();
    let reference = format!("{}/{REPO}:gzip", open_registry());
    let err = kiln_oci::pull(&reference, &s.opts(), &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::DestinationExists(_)), "{err:?}");
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);

    let err = kiln_oci::pull("Not A Reference", &s.opts(), &s.dest("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::InvalidReference { .. }), "{err:?}");
}

#[tokio::test]
async fn root_unreachable_registry_is_a_network_error() {
    let s = Scratch::new();
    // Port 1 on loopback: nothing listens there.
    let err = kiln_oci::resolve_digest("127.0.0.1:1/x/y:z", &s.opts())
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

// --- images pushed by this test with oci-client -----------------------------

fn tar_layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_path(path).unwrap();
    h.set_cksum();
    b.append(&h, data.as_bytes()).unwrap();
}

fn add_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    h.set_path(path).unwrap();
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
}

const AMD64_CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

/// Pushes an image made of `layers` (data, media type) to the open registry.
async fn push(tag: &str, layers: Vec<(Vec<u8>, &str)>, config_media_type: &str) -> String {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    let reference = format!("{}/kiln-test/pushed:{tag}", open_registry());
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|(data, media_type)| ImageLayer::new(data, media_type.to_string(), None))
        .collect();
    let config = Config::new(
        AMD64_CONFIG.as_bytes().to_vec(),
        config_media_type.to_string(),
        None,
    );
    client
        .push(
            &reference.parse().unwrap(),
            &layers,
            config,
            &oci_client::secrets::RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
    reference
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

#[tokio::test]
async fn root_uncompressed_layers() {
    let l1 = tar_layer(|b| {
        add_file(b, "data/a", "one");
        add_file(b, "data/b", "two");
    });
    let l2 = tar_layer(|b| add_file(b, "data/.wh.a", ""));
    let reference = push("plain", vec![(l1, TAR), (l2, TAR)], OCI_CONFIG).await;
    let s = Scratch::new();
    let dest = s.dest("plain");
    let image = kiln_oci::pull(&reference, &s.opts(), &dest).await.unwrap();
    assert_eq!(image.config.cmd, ["/x"]);
    assert!(!exists(&dest.join("data/a")));
    assert_eq!(std::fs::read_to_string(dest.join("data/b")).unwrap(), "two");
}

#[tokio::test]
async fn root_malicious_layer_cannot_write_outside_dest() {
    let s = Scratch::new();
    let host = s.dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("victim"), "host data").unwrap();
    let host_str = host.display().to_string();
    // Layer 1 plants etc -> <host dir> (as `etc -> /` would), layer 2 writes through it.
    let l1 = tar_layer(|b| add_symlink(b, "etc", &host_str));
    let l2 = tar_layer(|b| {
        add_file(b, "etc/victim", "pwned");
        add_file(b, "etc/new", "pwned");
    });
    let reference = push("malicious", vec![(l1, TAR), (l2, TAR)], OCI_CONFIG).await;
    let dest = s.dest("malicious");
    let err = kiln_oci::pull(&reference, &s.opts(), &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::UnsafeLayer { .. }), "{err:?}");
    assert!(err.to_string().contains("etc/victim"), "{err}");
    assert_eq!(
        std::fs::read_to_string(host.join("victim")).unwrap(),
        "host data"
    );
    assert!(!host.join("new").exists());
    s.assert_nothing_left(&dest);
}

#[tokio::test]
async fn root_unsupported_media_types_are_refused_before_download() {
    let reference = push(
        "wasm",
        vec![(
            b"\0asm".to_vec(),
            "application/vnd.wasm.content.layer.v1+wasm",
        )],
        OCI_CONFIG,
    )
    .await;
    let s = Scratch::new();
    let dest = s.dest("wasm");
    let err = kiln_oci::pull(&reference, &s.opts(), &dest)
        .await
        .unwrap_err();
    match &err {
        OciError::UnsupportedMediaType { media_type, .. } => {
            assert_eq!(media_type, "application/vnd.wasm.content.layer.v1+wasm")
        }
        other => panic!("expected UnsupportedMediaType, got {other:?}"),
    }
    s.assert_nothing_left(&dest);
    assert!(
        !s.dir.path().join("cache/blobs/sha256").exists()
            || std::fs::read_dir(s.dir.path().join("cache/blobs/sha256"))
                .unwrap()
                .count()
                == 0,
        "nothing was downloaded"
    );

    let l = tar_layer(|b| add_file(b, "x", "y"));
    let reference = push(
        "helm",
        vec![(l, TAR)],
        "application/vnd.cncf.helm.config.v1+json",
    )
    .await;
    let err = kiln_oci::pull(&reference, &s.opts(), &s.dest("helm"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OciError::UnsupportedMediaType { what, .. } if what == "config"),
        "{err:?}"
    );
}
