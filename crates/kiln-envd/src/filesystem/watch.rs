//! Directory watchers: the `WatchDir` stream and the polling
//! `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` trio, on inotify
//! through the `notify` crate.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use buffa::{EnumValue, MessageField};
use connectrpc::ConnectError;
use kiln_proto::filesystem::{EventType, FilesystemEvent};
use notify::event::{CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

use super::entry::{entry_info, is_upload_temp};

/// Events kept for a watcher nobody drains; beyond this new ones are dropped.
const MAX_QUEUED: usize = 16 * 1024;
/// At most this many entries of a new subdirectory found already populated
/// are reported.
const MAX_SCANNED: usize = 1024;
/// A CREATE seen from both inotify and a scan within this window is one.
const DEDUP_WINDOW: Duration = Duration::from_secs(2);
/// `GetWatcherEvents` waits until no new event arrived for this long...
const SETTLE_QUIET: Duration = Duration::from_millis(20);
/// ...but never longer than this in total.
const SETTLE_MAX: Duration = Duration::from_millis(60);
/// Polling watchers nobody polled for this long are dropped.
pub(crate) const POLL_IDLE_LIMIT: Duration = Duration::from_secs(10 * 60);

/// What to watch, already resolved and access-checked.
#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    pub root: PathBuf,
    pub recursive: bool,
    pub include_entry: bool,
}

/// Where a recently reported CREATE came from (see `Shared::push`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Inotify,
    Scan,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<FilesystemEvent>,
    /// The watched directory itself was removed or moved away.
    closed: bool,
    overflowed: bool,
    /// Recent CREATEs by name, so the scan of a new subdirectory and inotify
    /// do not both report the same entry (recursive watches only).
    recent: HashMap<String, (Instant, Origin)>,
}

impl Queue {
    /// Whether `ev` duplicates a CREATE just reported from the other origin;
    /// records it otherwise.
    fn is_duplicate(&mut self, ev: &FilesystemEvent, origin: Origin) -> bool {
        match ev.r#type.as_known() {
            Some(EventType::EVENT_TYPE_CREATE) => {
                let now = Instant::now();
                if self.recent.len() > 4096 {
                    self.recent
                        .retain(|_, (t, _)| now.duration_since(*t) < DEDUP_WINDOW);
                }
                match self.recent.get(&ev.name) {
                    Some((t, o)) if *o != origin && now.duration_since(*t) < DEDUP_WINDOW => {
                        self.recent.remove(&ev.name);
                        true
                    }
                    _ => {
                        self.recent.insert(ev.name.clone(), (now, origin));
                        false
                    }
                }
            }
            Some(EventType::EVENT_TYPE_REMOVE) | Some(EventType::EVENT_TYPE_RENAME) => {
                self.recent.remove(&ev.name);
                false
            }
            _ => false,
        }
    }

    fn push(&mut self, ev: FilesystemEvent) {
        if self.events.len() >= MAX_QUEUED {
            if !self.overflowed {
                tracing::warn!("watcher queue full; dropping filesystem events");
                self.overflowed = true;
            }
            return;
        }
        self.events.push_back(ev);
    }
}

/// State shared between the inotify thread and the consumers.
struct Shared {
    queue: Mutex<Queue>,
    /// Bumped whenever the queue changes, so consumers can wait for it.
    changed: watch::Sender<u64>,
    /// Whether CREATEs are tracked to drop duplicates (recursive watches).
    dedup: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the events inotify reported.
    fn push(&self, events: Vec<FilesystemEvent>, close: bool) {
        if events.is_empty() && !close {
            return;
        }
        {
            let mut q = self.lock();
            for ev in events {
                if !(self.dedup && q.is_duplicate(&ev, Origin::Inotify)) {
                    q.push(ev);
                }
            }
            q.closed |= close;
        }
        self.notify();
    }

    /// Queues what a scan found: a CREATE (and a WRITE for non-empty files)
    /// for each entry inotify has not just reported.
    fn push_scanned(&self, found: Vec<(FilesystemEvent, Option<FilesystemEvent>)>) {
        if found.is_empty() {
            return;
        }
        {
            let mut q = self.lock();
            for (create, write) in found {
                if q.is_duplicate(&create, Origin::Scan) {
                    continue;
                }
                q.push(create);
                if let Some(write) = write {
                    q.push(write);
                }
            }
        }
        self.notify();
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A live inotify watch. Dropping it stops watching.
pub(crate) struct DirWatcher {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    shared: Arc<Shared>,
}

impl DirWatcher {
    /// Starts watching. Blocking (it walks the tree for recursive watches);
    /// call it on a blocking thread running with root's credentials, since
    /// the inotify thread it spawns inherits them.
    pub(crate) fn start(spec: WatchSpec) -> Result<DirWatcher, ConnectError> {
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed,
            dedup: spec.recursive,
        });
        let (scan_tx, scan_rx) = std::sync::mpsc::channel::<PathBuf>();
        let mut mapper = Mapper {
            spec: spec.clone(),
            new_dirs: spec.recursive.then_some(scan_tx),
        };
        let sink = Arc::clone(&shared);
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                let (events, close) = mapper.map(&event);
                sink.push(events, close);
            }
            Err(e) => tracing::warn!(error = %e, "filesystem watcher error"),
        };
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut watcher = notify::RecommendedWatcher::new(handler, config).map_err(|e| {
            ConnectError::internal(format!("cannot create filesystem watcher: {e}"))
        })?;
        let mode = if spec.recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher.watch(&spec.root, mode).map_err(|e| match e.kind {
            notify::ErrorKind::PathNotFound => {
                ConnectError::not_found(format!("path '{}' not found", spec.root.display()))
            }
            notify::ErrorKind::MaxFilesWatch => ConnectError::resource_exhausted(format!(
                "cannot watch '{}': inotify watch limit reached",
                spec.root.display()
            )),
            _ => ConnectError::internal(format!("cannot watch '{}': {e}", spec.root.display())),
        })?;
        let watcher = Arc::new(Mutex::new(watcher));
        if spec.recursive {
            let weak = Arc::downgrade(&watcher);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kiln-watch-scan".into())
                .spawn(move || scan_new_dirs(&spec, &weak, &shared, &scan_rx))
                .map_err(|e| ConnectError::internal(format!("cannot start watcher thread: {e}")))?;
        }
        Ok(DirWatcher {
            _watcher: watcher,
            shared,
        })
    }

    /// A receiver that wakes up when new events are queued.
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Takes every queued event; also says whether the watch has ended.
    fn drain(&self) -> (Vec<FilesystemEvent>, bool) {
        let mut q = self.shared.lock();
        q.overflowed = false;
        (q.events.drain(..).collect(), q.closed)
    }
}

/// Turns `notify` events into E2B's filesystem events.
struct Mapper {
    spec: WatchSpec,
    /// New subdirectories go here to be scanned once they are watched.
    new_dirs: Option<std::sync::mpsc::Sender<PathBuf>>,
}

impl Mapper {
    /// The events to report for one `notify` event, and whether the watched
    /// directory itself went away.
    fn map(&mut self, event: &notify::Event) -> (Vec<FilesystemEvent>, bool) {
        let Some(path) = event.paths.first() else {
            return (Vec::new(), false);
        };
        if path == &self.spec.root {
            // Events about the watched directory itself: only its removal or
            // move matters, and it ends the watch.
            let gone = matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
            );
            return (Vec::new(), gone);
        }
        let kind = match event.kind {
            EventKind::Create(_) => EventType::EVENT_TYPE_CREATE,
            EventKind::Modify(ModifyKind::Data(_)) => EventType::EVENT_TYPE_WRITE,
            EventKind::Modify(ModifyKind::Metadata(_)) => EventType::EVENT_TYPE_CHMOD,
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => EventType::EVENT_TYPE_RENAME,
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => EventType::EVENT_TYPE_CREATE,
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                // An upload's temp file renamed into place. The CREATE came
                // with the `To` half; like E2B's upload (create, chown,
                // write) it continues with CHMOD and WRITE.
                let to = event.paths.get(1);
                return match to {
                    Some(to) if is_hidden(path) && !is_hidden(to) => (
                        [EventType::EVENT_TYPE_CHMOD, EventType::EVENT_TYPE_WRITE]
                            .into_iter()
                            .filter_map(|kind| self.event(to, kind))
                            .collect(),
                        false,
                    ),
                    _ => (Vec::new(), false),
                };
            }
            EventKind::Remove(_) => EventType::EVENT_TYPE_REMOVE,
            EventKind::Other if event.need_rescan() => {
                tracing::warn!(root = %self.spec.root.display(), "inotify queue overflowed");
                return (Vec::new(), false);
            }
            _ => return (Vec::new(), false),
        };
        if is_hidden(path) {
            return (Vec::new(), false);
        }
        if let Some(new_dirs) = &self.new_dirs
            && matches!(event.kind, EventKind::Create(CreateKind::Folder))
        {
            let _ = new_dirs.send(path.clone());
        }
        (self.event(path, kind).into_iter().collect(), false)
    }

    fn event(&self, path: &Path, kind: EventType) -> Option<FilesystemEvent> {
        fs_event(&self.spec, path, kind)
    }
}

/// The event of `kind` for `path` under the watched root.
fn fs_event(spec: &WatchSpec, path: &Path, kind: EventType) -> Option<FilesystemEvent> {
    let rel = path.strip_prefix(&spec.root).ok()?;
    if rel.as_os_str().is_empty() {
        return None;
    }
    let mut ev = FilesystemEvent {
        name: rel.to_string_lossy().into_owned(),
        r#type: EnumValue::from(kind),
        ..Default::default()
    };
    if spec.include_entry
        && kind != EventType::EVENT_TYPE_REMOVE
        && let Ok(info) = entry_info(path)
    {
        ev.entry = MessageField::some(info);
    }
    Some(ev)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(is_upload_temp)
}

/// A path that is never watched: unwatching it is a no-op round trip
/// through the inotify thread.
const SYNC_PATH: &str = "/proc/kiln-envd-watch-sync";

/// Reports what new subdirectories of a recursive watch already contain.
///
/// `notify` watches a new subdirectory only after handling the event that
/// announced it, so whatever was created in it before then (`mkdir -p a/b`,
/// a file written right after `MakeDir`) would be lost. Once a round trip
/// through the inotify thread shows the watch is in place, the directory is
/// scanned; entries created since are reported by inotify too, which
/// `Queue::is_duplicate` sorts out.
fn scan_new_dirs(
    spec: &WatchSpec,
    watcher: &Weak<Mutex<notify::RecommendedWatcher>>,
    shared: &Shared,
    new_dirs: &std::sync::mpsc::Receiver<PathBuf>,
) {
    while let Ok(dir) = new_dirs.recv() {
        let Some(watcher) = watcher.upgrade() else {
            return;
        };
        {
            let mut w = watcher.lock().unwrap_or_else(|e| e.into_inner());
            // Fails with "not watched", after the inotify thread finished
            // the batch that added the new directory's watch.
            let _ = w.unwatch(Path::new(SYNC_PATH));
        }
        drop(watcher);
        let mut found = Vec::new();
        scan_dir(spec, &dir, &mut found);
        shared.push_scanned(found);
    }
}

/// Lexical pre-order walk of `dir` (symlinks not followed): a CREATE for
/// each entry plus a WRITE for non-empty files.
fn scan_dir(
    spec: &WatchSpec,
    dir: &Path,
    found: &mut Vec<(FilesystemEvent, Option<FilesystemEvent>)>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut children: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !is_upload_temp(&e.file_name()))
        .collect();
    children.sort_by_key(|e| e.file_name());
    for child in children {
        if found.len() >= MAX_SCANNED {
            return;
        }
        let path = child.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let Some(create) = fs_event(spec, &path, EventType::EVENT_TYPE_CREATE) else {
            continue;
        };
        let write = (meta.is_file() && meta.len() > 0)
            .then(|| fs_event(spec, &path, EventType::EVENT_TYPE_WRITE))
            .flatten();
        found.push((create, write));
        if meta.is_dir() {
            scan_dir(spec, &path, found);
        }
    }
}

/// Waits until the watcher has been quiet briefly, so events of changes made
/// just before a `GetWatcherEvents` call are in the queue.
async fn settle(rx: &mut watch::Receiver<u64>) {
    let start = tokio::time::Instant::now();
    loop {
        let left = SETTLE_MAX.saturating_sub(start.elapsed());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(SETTLE_QUIET.min(left), rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return,
        }
    }
}

/// Server-stream body of `WatchDir`: the `start` event, then filesystem
/// events and keepalives. It ends when the directory goes away, at the
/// request deadline (with `deadline_exceeded`), or when dropped because the
/// client left, which also stops the watcher.
pub(crate) struct WatchStream {
    watcher: DirWatcher,
    rx: watch::Receiver<u64>,
    pending: VecDeque<FilesystemEvent>,
    started: bool,
    finished: bool,
    keepalive: Duration,
    deadline: Option<tokio::time::Instant>,
}

/// One item of the `WatchDir` stream.
pub(crate) enum StreamItem {
    Start,
    Event(Box<FilesystemEvent>),
    Keepalive,
}

impl WatchStream {
    pub(crate) fn new(
        watcher: DirWatcher,
        keepalive: Duration,
        deadline: Option<Instant>,
    ) -> WatchStream {
        let rx = watcher.subscribe();
        WatchStream {
            watcher,
            rx,
            pending: VecDeque::new(),
            started: false,
            finished: false,
            keepalive,
            deadline: deadline.map(tokio::time::Instant::from_std),
        }
    }

    /// The next item, or None when the stream is over.
    pub(crate) async fn next(&mut self) -> Option<Result<StreamItem, ConnectError>> {
        if self.finished {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(Ok(StreamItem::Start));
        }
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(StreamItem::Event(Box::new(ev))));
            }
            // Mark the current state seen before draining so nothing queued
            // after the drain is missed.
            self.rx.borrow_and_update();
            let (events, closed) = self.watcher.drain();
            if !events.is_empty() {
                self.pending.extend(events);
                continue;
            }
            if closed {
                self.finished = true;
                return None;
            }
            let deadline = self.deadline;
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.finished = true;
                        return None;
                    }
                }
                _ = tokio::time::sleep(self.keepalive) => {
                    return Some(Ok(StreamItem::Keepalive));
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.finished = true;
                    return Some(Err(ConnectError::deadline_exceeded(
                        "watch deadline exceeded",
                    )));
                }
            }
        }
    }
}

/// A watcher of the polling API.
struct Polled {
    watcher: Arc<DirWatcher>,
    last_poll: Instant,
}

/// The polling watchers, by id.
#[derive(Default)]
pub(crate) struct Registry {
    watchers: Mutex<HashMap<String, Polled>>,
    janitor: std::sync::OnceLock<()>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Polled>> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `watcher` and returns its new id.
    pub(crate) fn insert(self: &Arc<Self>, watcher: DirWatcher) -> String {
        self.start_janitor();
        let id = new_id();
        self.lock().insert(
            id.clone(),
            Polled {
                watcher: Arc::new(watcher),
                last_poll: Instant::now(),
            },
        );
        id
    }

    /// Drains the events of watcher `id`, giving in-flight events a moment.
    pub(crate) async fn events(&self, id: &str) -> Result<Vec<FilesystemEvent>, ConnectError> {
        let watcher = {
            let mut map = self.lock();
            let polled = map.get_mut(id).ok_or_else(|| unknown_watcher(id))?;
            polled.last_poll = Instant::now();
            Arc::clone(&polled.watcher)
        };
        let mut rx = watcher.subscribe();
        settle(&mut rx).await;
        Ok(watcher.drain().0)
    }

    pub(crate) fn remove(&self, id: &str) -> Result<(), ConnectError> {
        self.lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| unknown_watcher(id))
    }

    /// Drops watchers idle for longer than `limit`; returns how many.
    pub(crate) fn drop_idle(&self, limit: Duration) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, p| p.last_poll.elapsed() < limit);
        before - map.len()
    }

    /// Starts the task that drops abandoned polling watchers (once, from
    /// inside the runtime).
    fn start_janitor(self: &Arc<Self>) {
        let weak: Weak<Registry> = Arc::downgrade(self);
        self.janitor.get_or_init(|| {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            handle.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tick.tick().await;
                    let Some(registry) = weak.upgrade() else {
                        return;
                    };
                    let dropped = registry.drop_idle(POLL_IDLE_LIMIT);
                    if dropped > 0 {
                        tracing::info!(dropped, "dropped idle filesystem watchers");
                    }
                }
            });
        });
    }
}

fn unknown_watcher(id: &str) -> ConnectError {
    ConnectError::not_found(format!("watcher with id '{id}' not found"))
}

/// A random watcher id (hex), falling back to time and a counter.
fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 12];
    // SAFETY: the buffer is valid for writes of its length.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes[..8].copy_from_slice(&nanos.to_le_bytes());
        bytes[8..].copy_from_slice(&(COUNTER.fetch_add(1, Ordering::Relaxed) as u32).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `path` lives on a network file system (NFS, SMB/CIFS, sshfs...),
/// which inotify cannot watch reliably.
pub(crate) fn is_network_mount(path: &Path) -> bool {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => mount_fs_type(&text, path).is_some_and(|t| is_network_fs_type(&t)),
        Err(_) => statfs_is_network(path),
    }
}

/// The file-system type of the mount containing `path`, per `mountinfo`.
fn mount_fs_type(mountinfo: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4).map(unescape_mount) else {
            continue;
        };
        let Some(fs_type) = right.split(' ').next() else {
            continue;
        };
        if !path.starts_with(&mount_point) {
            continue;
        }
        let len = mount_point.as_os_str().len();
        // Later lines with the same mount point are mounted on top.
        if best.as_ref().is_none_or(|(l, _)| len >= *l) {
            best = Some((len, fs_type.to_string()));
        }
    }
    best.map(|b| b.1)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn is_network_fs_type(fs_type: &str) -> bool {
    const NETWORK: &[&str] = &[
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "davfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.davfs2",
        "fuse.cephfs",
        "fuse.juicefs",
        "fuse.goofys",
        "fuse.mountpoint-s3",
    ];
    NETWORK.contains(&fs_type)
}

fn statfs_is_network(path: &Path) -> bool {
    // Magic numbers from linux/magic.h; all fit in 32 bits while the width
    // of `f_type` differs between architectures.
    const NFS: u32 = 0x6969;
    const SMB: u32 = 0x517B;
    const CIFS: u32 = 0xFF53_4D42;
    const SMB2: u32 = 0xFE53_4D42;
    const AFS: u32 = 0x5346_414F;
    const CODA: u32 = 0x7375_7245;
    const NCP: u32 = 0x564C;
    const CEPH: u32 = 0x00C3_6400;
    nix::sys::statfs::statfs(path).is_ok_and(|s| {
        let magic = s.filesystem_type().0 as u32;
        [NFS, SMB, CIFS, SMB2, AFS, CODA, NCP, CEPH].contains(&magic)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mount_types() {
        let info = "\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/share rw - nfs4 server:/export rw
31 22 0:41 / /mnt/my\\040drive rw - fuse.sshfs host: rw
";
        assert_eq!(
            mount_fs_type(info, Path::new("/home/user")).as_deref(),
            Some("ext4")
        );
        assert_eq!(
            mount_fs_type(info, Path::new("/mnt/share/a")).as_deref(),
            Some("nfs4")
        );
        assert_eq!(
            mount_fs_type(info, Path::new("/mnt/sharex")).as_deref(),
            Some("ext4")
        );
        assert_eq!(
            mount_fs_type(info, Path::new("/mnt/my drive/x")).as_deref(),
            Some("fuse.sshfs")
        );
        assert!(is_network_fs_type("nfs4"));
        assert!(is_network_fs_type("fuse.sshfs"));
        assert!(!is_network_fs_type("ext4"));
        assert!(!is_network_fs_type("tmpfs"));
    }

    #[test]
    fn local_tmp_is_not_network() {
        assert!(!is_network_mount(&std::env::temp_dir()));
    }

    #[test]
    fn idle_polling_watchers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::default());
        let spec = WatchSpec {
            root: dir.path().to_path_buf(),
            recursive: false,
            include_entry: false,
        };
        let id = registry.insert(DirWatcher::start(spec).unwrap());
        assert_eq!(registry.drop_idle(POLL_IDLE_LIMIT), 0);
        assert_eq!(registry.drop_idle(Duration::ZERO), 1);
        assert!(registry.remove(&id).is_err());
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 24);
    }
}
