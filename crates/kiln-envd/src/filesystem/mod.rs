//! `filesystem.Filesystem`: stat, list, mkdir, move, remove, watch.
//!
//! Paths are resolved for the request user (`~` and relative paths from the
//! user's home) and every operation runs with that user's file-system
//! credentials, so a user cannot reach through envd what it could not reach
//! itself (see `creds`).

mod creds;
mod entry;
mod ops;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use kiln_proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, Filesystem, GetWatcherEventsRequest,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, RemoveWatcherRequest,
    RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest, WatchDirResponse,
    watch_dir_response,
};

use crate::state::EnvdState;
use crate::users::User;
use crate::{auth, paths};

pub use creds::as_user;
pub use entry::{METADATA_XATTR_PREFIX, entry_info};

/// Keepalive interval of a `WatchDir` stream without `Keepalive-Ping-Interval`.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

pub struct FilesystemService {
    state: EnvdState,
    watchers: Arc<watch::Registry>,
}

impl FilesystemService {
    pub fn new(state: EnvdState) -> Self {
        Self {
            state,
            watchers: Arc::new(watch::Registry::default()),
        }
    }

    /// The request user and `path` resolved for them.
    fn user_path(&self, ctx: &RequestContext, path: &str) -> Result<(User, PathBuf), ConnectError> {
        let user = auth::rpc_user(&self.state, ctx)?;
        let resolved = paths::resolve(path, &user, None);
        Ok((user, resolved))
    }

    /// Checks the directory to watch as the request user and starts a watcher.
    async fn start_watcher(
        &self,
        ctx: &RequestContext,
        path: &str,
        recursive: bool,
        include_entry: bool,
        allow_network_mounts: bool,
    ) -> Result<watch::DirWatcher, ConnectError> {
        let (user, root) = self.user_path(ctx, path)?;
        let checked = root.clone();
        run_as(user, move || {
            check_watchable(&checked, allow_network_mounts)
        })
        .await?;
        let spec = watch::WatchSpec {
            root,
            recursive,
            include_entry,
        };
        // Not as the user: the inotify thread inherits the creating thread's
        // credentials, and a recursive watch must not fail on one unreadable
        // subdirectory.
        tokio::task::spawn_blocking(move || watch::DirWatcher::start(spec))
            .await
            .map_err(|e| ConnectError::internal(format!("watcher task failed: {e}")))?
    }
}

/// Whether the user may watch `root`: an existing, readable directory, not
/// on a network mount unless allowed.
fn check_watchable(root: &std::path::Path, allow_network_mounts: bool) -> Result<(), ConnectError> {
    let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ConnectError::not_found(format!("path '{}' not found", root.display()))
        }
        _ => ops::io_error(e, root),
    })?;
    if !meta.is_dir() {
        return Err(ConnectError::invalid_argument(format!(
            "path '{}' is not a directory",
            root.display()
        )));
    }
    std::fs::read_dir(root).map_err(|e| ops::io_error(e, root))?;
    if !allow_network_mounts {
        let real = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        if watch::is_network_mount(&real) {
            return Err(ConnectError::invalid_argument(format!(
                "cannot watch '{}': it is on a network file system (set allow_network_mounts to watch it anyway)",
                root.display()
            )));
        }
    }
    Ok(())
}

/// Runs `f` on a blocking thread with `user`'s file-system credentials.
async fn run_as<T: Send + 'static>(
    user: User,
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(move || {
        creds::as_user(&user, f).map_err(|e| {
            ConnectError::internal(format!("cannot act as user '{}': {e}", user.name))
        })?
    })
    .await
    .map_err(|e| ConnectError::internal(format!("filesystem task failed: {e}")))?
}

/// The `Keepalive-Ping-Interval` header (seconds) or the default.
fn keepalive_interval(ctx: &RequestContext) -> Duration {
    ctx.header("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

// The handlers return concrete types where the trait allows any encodable.
#[allow(refining_impl_trait)]
impl Filesystem for FilesystemService {
    async fn stat(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StatRequest>,
    ) -> ServiceResult<StatResponse> {
        let req = request.to_owned_message();
        let (user, path) = self.user_path(&ctx, &req.path)?;
        let entry = run_as(user, move || ops::stat(&path)).await?;
        Response::ok(StatResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn make_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MakeDirRequest>,
    ) -> ServiceResult<MakeDirResponse> {
        let req = request.to_owned_message();
        let (user, path) = self.user_path(&ctx, &req.path)?;
        let entry = run_as(user, move || ops::make_dir(&path)).await?;
        Response::ok(MakeDirResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn r#move(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MoveRequest>,
    ) -> ServiceResult<MoveResponse> {
        let req = request.to_owned_message();
        let (user, source) = self.user_path(&ctx, &req.source)?;
        let destination = paths::resolve(&req.destination, &user, None);
        let entry = run_as(user, move || ops::rename(&source, &destination)).await?;
        Response::ok(MoveResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn list_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ListDirRequest>,
    ) -> ServiceResult<ListDirResponse> {
        let req = request.to_owned_message();
        let (user, path) = self.user_path(&ctx, &req.path)?;
        let depth = req.depth;
        let entries = run_as(user, move || ops::list_dir(&path, depth)).await?;
        Response::ok(ListDirResponse {
            entries,
            ..Default::default()
        })
    }

    async fn remove(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, RemoveRequest>,
    ) -> ServiceResult<RemoveResponse> {
        let req = request.to_owned_message();
        let (user, path) = self.user_path(&ctx, &req.path)?;
        run_as(user, move || ops::remove(&path)).await?;
        Response::ok(RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, WatchDirRequest>,
    ) -> ServiceResult<connectrpc::ServiceStream<WatchDirResponse>> {
        let req = request.to_owned_message();
        let watcher = self
            .start_watcher(
                &ctx,
                &req.path,
                req.recursive,
                req.include_entry,
                req.allow_network_mounts,
            )
            .await?;
        let stream = watch::WatchStream::new(watcher, keepalive_interval(&ctx), ctx.deadline());
        let body = futures::stream::unfold(stream, |mut s| async move {
            let item = s.next().await?;
            Some((item.map(watch_response), s))
        });
        Response::stream_ok(body)
    }

    async fn create_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, CreateWatcherRequest>,
    ) -> ServiceResult<CreateWatcherResponse> {
        let req = request.to_owned_message();
        let watcher = self
            .start_watcher(
                &ctx,
                &req.path,
                req.recursive,
                req.include_entry,
                req.allow_network_mounts,
            )
            .await?;
        let watcher_id = self.watchers.insert(watcher);
        Response::ok(CreateWatcherResponse {
            watcher_id,
            ..Default::default()
        })
    }

    async fn get_watcher_events(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, GetWatcherEventsRequest>,
    ) -> ServiceResult<GetWatcherEventsResponse> {
        let req = request.to_owned_message();
        let events = self.watchers.events(&req.watcher_id).await?;
        Response::ok(GetWatcherEventsResponse {
            events,
            ..Default::default()
        })
    }

    async fn remove_watcher(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, RemoveWatcherRequest>,
    ) -> ServiceResult<RemoveWatcherResponse> {
        let req = request.to_owned_message();
        self.watchers.remove(&req.watcher_id)?;
        Response::ok(RemoveWatcherResponse::default())
    }
}

fn watch_response(item: watch::StreamItem) -> WatchDirResponse {
    use kiln_proto::filesystem::__buffa::oneof::watch_dir_response::Event;
    let event = match item {
        watch::StreamItem::Start => Event::from(watch_dir_response::StartEvent::default()),
        watch::StreamItem::Event(ev) => Event::Filesystem(ev),
        watch::StreamItem::Keepalive => Event::from(watch_dir_response::KeepAlive::default()),
    };
    WatchDirResponse {
        event: Some(event),
        ..Default::default()
    }
}
