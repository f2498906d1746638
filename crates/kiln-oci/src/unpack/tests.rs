//! Whiteouts and path safety, with hand-made tar layers.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

/// Builds a layer tar in memory. Entry names are written raw, so a test can
/// produce what the `tar` crate's own checks would refuse (`..`, absolute).
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(name: &str, kind: EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_old();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    fn push(mut self, mut h: tar::Header, data: &[u8]) -> Self {
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn dir(self, name: &str, mode: u32) -> Self {
        let h = Self::header(name, EntryType::Directory, mode, 0);
        self.push(h, b"")
    }

    fn file(self, name: &str, data: &str) -> Self {
        self.file_owned(name, data, 0o644, 0, 0)
    }

    fn file_owned(self, name: &str, data: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(name, EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data.as_bytes())
    }

    fn link(self, name: &str, kind: EntryType, target: &str) -> Self {
        let mut h = Self::header(name, kind, 0o777, 0);
        let bytes = target.as_bytes();
        h.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
        self.push(h, b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.link(name, EntryType::Symlink, target)
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.link(name, EntryType::Link, target)
    }

    fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn apply(root: &Path, layer: Layer) -> Result<LayerStats, OciError> {
    apply_layer(root, &layer.tar()[..], Compression::None, "sha256:test")
}

/// A root directory plus a "host" directory beside it that layers must not touch.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    host: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    let host = tmp.path().join("host");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&host).unwrap();
    fs::write(host.join("victim"), "host data").unwrap();
    Fixture {
        root,
        host,
        _tmp: tmp,
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn assert_unsafe(result: Result<LayerStats, OciError>, needle: &str) {
    match result {
        Err(e @ OciError::UnsafeLayer { .. }) => {
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            )
        }
        other => panic!("expected UnsafeLayer, got {other:?}"),
    }
}

fn assert_host_untouched(f: &Fixture) {
    let names: Vec<_> = fs::read_dir(&f.host)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("victim")],
        "host dir changed"
    );
    assert_eq!(read(&f.host.join("victim")), "host data");
}

#[test]
fn files_dirs_links_owners_and_modes() {
    let f = fixture();
    let stats = apply(
        &f.root,
        Layer::new()
            .dir("./", 0o755)
            .dir("etc/", 0o755)
            .file("etc/release", "v1\n")
            .hardlink("etc/release.hard", "etc/release")
            .symlink("etc/release.sym", "release")
            .symlink("etc/abs.sym", "/etc/release")
            .dir("home/user/", 0o750)
            .file_owned("home/user/owned", "mine", 0o640, 1000, 1001)
            .file_owned("usr/bin/setuid", "x", 0o4755, 0, 0)
            .dir("tmp/", 0o1777)
            .link("dev/null", EntryType::Char, "")
            .link("devices/sda", EntryType::Block, "")
            .link("run/fifo", EntryType::Fifo, ""),
    )
    .unwrap();
    assert_eq!(stats.skipped_devices, 2);
    assert!(!exists(&f.root.join("dev/null")));
    assert!(
        !exists(&f.root.join("devices")),
        "no parents made for a skipped entry"
    );
    assert!(
        fs::symlink_metadata(f.root.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );

    assert_eq!(read(&f.root.join("etc/release")), "v1\n");
    let a = fs::metadata(f.root.join("etc/release")).unwrap();
    let b = fs::metadata(f.root.join("etc/release.hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        fs::read_link(f.root.join("etc/release.sym")).unwrap(),
        Path::new("release")
    );
    assert_eq!(
        fs::read_link(f.root.join("etc/abs.sym")).unwrap(),
        Path::new("/etc/release")
    );
    let owned = fs::metadata(f.root.join("home/user/owned")).unwrap();
    assert_eq!(owned.mode() & 0o7777, 0o640);
    assert_eq!(owned.mtime(), 1_700_000_000);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((owned.uid(), owned.gid()), (1000, 1001));
    }
    let home = fs::metadata(f.root.join("home/user")).unwrap();
    assert_eq!(home.mode() & 0o7777, 0o750);
    assert_eq!(
        fs::metadata(f.root.join("usr/bin/setuid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(f.root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    // Parents the layer did not list are created 0755.
    assert!(fs::metadata(f.root.join("usr/bin")).unwrap().is_dir());
}

#[test]
fn whiteouts_delete_lower_files_and_directories() {
    let f = fixture();
    apply(
        &f.root,
        Layer::new()
            .file("etc/keep", "k")
            .file("etc/gone", "g")
            .file("var/lib/dir/a", "a")
            .file("var/lib/dir/sub/b", "b"),
    )
    .unwrap();
    let stats = apply(
        &f.root,
        Layer::new()
            .file("etc/.wh.gone", "")
            .file("var/lib/.wh.dir", "")
            .file("etc/.wh.never-existed", "")
            .file("nowhere/.wh.x", ""),
    )
    .unwrap();
    assert_eq!(stats.whiteouts, 4);
    assert_eq!(read(&f.root.join("etc/keep")), "k");
    assert!(!exists(&f.root.join("etc/gone")));
    assert!(!exists(&f.root.join("etc/.wh.gone")));
    assert!(!exists(&f.root.join("var/lib/dir")));
    assert!(exists(&f.root.join("var/lib")));
    assert!(
        !exists(&f.root.join("nowhere")),
        "a whiteout creates nothing"
    );
}

#[test]
fn opaque_directory_hides_lower_content_but_keeps_its_own_layer() {
    let f = fixture();
    apply(
        &f.root,
        Layer::new()
            .file("opt/app/old", "lower")
            .file("opt/app/sub/old", "lower")
            .file("opt/app/sub2/old", "lower")
            .file("opt/other", "lower"),
    )
    .unwrap();
    // The marker comes after some of this layer's entries and before others.
    apply(
        &f.root,
        Layer::new()
            .file("opt/app/before", "upper")
            .file("opt/app/sub/new", "upper")
            .file("opt/app/.wh..wh..opq", "")
            .file("opt/app/after", "upper"),
    )
    .unwrap();
    let mut names: Vec<String> = fs::read_dir(f.root.join("opt/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["after", "before", "sub"]);
    assert_eq!(read(&f.root.join("opt/app/sub/new")), "upper");
    assert!(
        !exists(&f.root.join("opt/app/sub/old")),
        "lower file in a re-created dir"
    );
    assert_eq!(
        read(&f.root.join("opt/other")),
        "lower",
        "outside the opaque dir"
    );
}

#[test]
fn parent_dir_components_are_rejected() {
    let f = fixture();
    assert_unsafe(
        apply(&f.root, Layer::new().file("../host/victim", "pwned")),
        "'..'",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/../../host/new", "pwned")),
        "'..'",
    );
    apply(&f.root, Layer::new().dir("etc/", 0o755)).unwrap();
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/.wh...", "")),
        "invalid name",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/.wh..", "")),
        "invalid name",
    );
    assert!(exists(&f.root.join("etc")));
    assert_host_untouched(&f);
}

#[test]
fn absolute_paths_are_made_relative() {
    let f = fixture();
    apply(
        &f.root,
        Layer::new().file(&format!("{}/victim", f.host.display()), "inside"),
    )
    .unwrap();
    let inside = f
        .root
        .join(f.host.strip_prefix("/").unwrap())
        .join("victim");
    assert_eq!(read(&inside), "inside");
    assert_host_untouched(&f);
}

#[test]
fn a_planted_symlink_is_never_followed_by_later_layers() {
    let f = fixture();
    let host = f.host.display().to_string();
    // Layer 1 plants `etc -> <host dir>` and `root -> /`.
    apply(
        &f.root,
        Layer::new().symlink("etc", &host).symlink("root", "/"),
    )
    .unwrap();

    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/victim", "pwned")),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/new", "pwned")),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().dir("etc/newdir/", 0o755)),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/.wh.victim", "")),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().file("etc/.wh..wh..opq", "")),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().symlink("etc/link", "/anything")),
        "symlink",
    );
    let marker = format!("kiln-oci-escape-test-{}", std::process::id());
    assert_unsafe(
        apply(
            &f.root,
            Layer::new().file(&format!("root/{marker}"), "pwned"),
        ),
        "symlink",
    );
    assert!(!exists(&Path::new("/").join(&marker)));
    assert_host_untouched(&f);
}

#[test]
fn a_symlink_planted_in_the_same_layer_is_not_followed() {
    let f = fixture();
    let host = f.host.display().to_string();
    assert_unsafe(
        apply(
            &f.root,
            Layer::new()
                .symlink("etc", &host)
                .file("etc/victim", "pwned"),
        ),
        "symlink",
    );
    assert_host_untouched(&f);
}

#[test]
fn entries_replace_a_symlink_instead_of_writing_through_it() {
    let f = fixture();
    let victim = f.host.join("victim").display().to_string();
    let host = f.host.display().to_string();
    apply(
        &f.root,
        Layer::new().symlink("file", &victim).symlink("dir", &host),
    )
    .unwrap();
    apply(
        &f.root,
        Layer::new().file("file", "image data").dir("dir/", 0o700),
    )
    .unwrap();
    let m = fs::symlink_metadata(f.root.join("file")).unwrap();
    assert!(m.is_file());
    assert_eq!(read(&f.root.join("file")), "image data");
    let d = fs::symlink_metadata(f.root.join("dir")).unwrap();
    assert!(d.is_dir() && d.mode() & 0o7777 == 0o700);
    assert_host_untouched(&f);
}

#[test]
fn hard_links_cannot_reach_outside() {
    let f = fixture();
    let host = f.host.display().to_string();
    apply(&f.root, Layer::new().symlink("lnk", &host)).unwrap();
    assert_unsafe(
        apply(&f.root, Layer::new().hardlink("stolen", "lnk/victim")),
        "symlink",
    );
    assert_unsafe(
        apply(&f.root, Layer::new().hardlink("stolen", "../host/victim")),
        "'..'",
    );
    // An absolute target means the path inside the root, which does not exist.
    let err = apply(
        &f.root,
        Layer::new().hardlink("stolen", &format!("{host}/victim")),
    )
    .unwrap_err();
    assert!(matches!(err, OciError::BadLayer { .. }), "{err:?}");
    assert!(!exists(&f.root.join("stolen")));
    // Linking to a symlink links the symlink itself.
    apply(&f.root, Layer::new().hardlink("lnk2", "lnk")).unwrap();
    assert_eq!(fs::read_link(f.root.join("lnk2")).unwrap(), f.host);
    assert_host_untouched(&f);
}

#[test]
fn the_root_cannot_be_replaced() {
    let f = fixture();
    assert_unsafe(apply(&f.root, Layer::new().symlink("./", "/")), "root");
    assert_unsafe(apply(&f.root, Layer::new().file("/", "x")), "root");
    assert!(fs::symlink_metadata(&f.root).unwrap().is_dir());
}

fn sample_layer() -> Vec<u8> {
    Layer::new().file("a/b", "hello").symlink("a/c", "b").tar()
}

#[test]
fn gzip_zstd_and_plain_layers() {
    let plain = sample_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    for (data, compression) in [
        (plain.clone(), Compression::None),
        (gz, Compression::Gzip),
        (zst, Compression::Zstd),
    ] {
        let f = fixture();
        apply_layer(&f.root, &data[..], compression, "sha256:test").unwrap();
        assert_eq!(read(&f.root.join("a/b")), "hello", "{compression:?}");
        assert_eq!(read(&f.root.join("a/c")), "hello", "{compression:?}");
    }
}

#[test]
fn corrupt_compressed_data_is_a_layer_error() {
    let f = fixture();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_layer()).unwrap();
    let mut gz = gz.finish().unwrap();
    let mid = gz.len() / 2;
    gz[mid] ^= 0xff;
    gz.truncate(gz.len() - 4);
    let err = apply_layer(&f.root, &gz[..], Compression::Gzip, "sha256:broken").unwrap_err();
    assert!(
        matches!(&err, OciError::BadLayer { layer, .. } if layer == "sha256:broken"),
        "{err:?}"
    );
    let err = apply_layer(&f.root, &b"not zstd"[..], Compression::Zstd, "sha256:z").unwrap_err();
    assert!(matches!(err, OciError::BadLayer { .. }), "{err:?}");
}

#[test]
fn media_types_pick_the_decompressor() {
    use Compression::*;
    for (media_type, want) in [
        ("application/vnd.oci.image.layer.v1.tar", Some(None)),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Some(Gzip),
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Some(Gzip),
        ),
        ("application/vnd.wasm.content.layer.v1+wasm", Option::None),
        ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
    ] {
        assert_eq!(
            Compression::for_media_type(media_type),
            want,
            "{media_type}"
        );
    }
}

#[test]
fn blank_owner_fields_mean_root() {
    let f = fixture();
    let mut h = Layer::header("blank", EntryType::Regular, 0o644, 1);
    h.as_old_mut().uid = [0; 8];
    h.as_old_mut().gid = [b' '; 8];
    apply(&f.root, Layer::new().push(h, b"x")).unwrap();
    let m = fs::metadata(f.root.join("blank")).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }
}

#[test]
fn non_utf8_names_are_kept_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    let f = fixture();
    let mut h = Layer::header("", EntryType::Regular, 0o644, 2);
    let name = b"caf\xe9";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    apply(&f.root, Layer::new().push(h, b"ok")).unwrap();
    let path = f.root.join(std::ffi::OsStr::from_bytes(name));
    assert_eq!(fs::read(&path).unwrap(), b"ok");
    // And a whiteout of it removes it.
    let mut h = Layer::header("", EntryType::Regular, 0o644, 0);
    let wh = b".wh.caf\xe9";
    h.as_old_mut().name[..wh.len()].copy_from_slice(wh);
    apply(&f.root, Layer::new().push(h, b"")).unwrap();
    assert!(!exists(&path));
}
