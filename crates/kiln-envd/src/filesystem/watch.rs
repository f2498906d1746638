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
use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

use super::entry::{entry_info, is_upload_temp};

/// Events kept for a watcher nobody drains; beyond this new ones are dropped.
const MAX_QUEUED: usize = 16 * 1024;
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

#[derive(Default)]
struct Queue {
    events: VecDeque<FilesystemEvent>,
    /// The watched directory itself was removed or moved away.
    closed: bool,
    overflowed: bool,
}

/// State shared between the inotify thread and the consumers.
struct Shared {
    queue: Mutex<Queue>,
    /// Bumped whenever the queue changes, so consumers can wait for it.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, events: Vec<FilesystemEvent>, close: bool) {
        if events.is_empty() && !close {
            return;
        }
        {
            let mut q = self.lock();
            for ev in events {
                if q.events.len() >= MAX_QUEUED {
                    if !q.overflowed {
                        tracing::warn!("watcher queue full; dropping filesystem events");
                        q.overflowed = true;
                    }
                    break;
                }
                q.events.push_back(ev);
            }
            q.closed |= close;
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A live inotify watch. Dropping it stops watching.
pub(crate) struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
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
        });
        let mut mapper = Mapper { spec: spec.clone() };
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
        (self.event(path, kind).into_iter().collect(), false)
    }

    fn event(&self, path: &Path, kind: EventType) -> Option<FilesystemEvent> {
        let rel = path.strip_prefix(&self.spec.root).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        let mut ev = FilesystemEvent {
            name: rel.to_string_lossy().into_owned(),
            r#type: EnumValue::from(kind),
            ..Default::default()
        };
        if self.spec.include_entry
            && kind != EventType::EVENT_TYPE_REMOVE
            && let Ok(info) = entry_info(path)
        {
            ev.entry = MessageField::some(info);
        }
        Some(ev)
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(is_upload_temp)
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
    fn ids_are_unique() {
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 24);
    }
}
