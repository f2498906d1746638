//! `process.Process`: starting, streaming, signalling processes.
//!
//! Each started process gets one thread per output fd (see [`output`]), a
//! tokio task waiting for its exit status from the reaper, and an entry in
//! the [`table::ProcessTable`]. Output goes to every subscriber (the `Start`
//! stream and any `Connect` streams) through bounded channels, so a slow
//! client slows the process instead of losing data. The `end` event is sent
//! only after the output fds were drained.

mod output;
mod pty;
pub(crate) mod spawn;
mod stream;
mod table;
pub(crate) mod vspawn;

use std::sync::Arc;
use std::time::Duration;

use connectrpc::{
    ConnectError, InboundStream, RequestContext, Response, ServiceRequest, ServiceResult,
    ServiceStream,
};
use futures::StreamExt;
use kiln_proto::process::__buffa::oneof::process_input::Input;
use kiln_proto::process::__buffa::oneof::process_selector::Selector;
use kiln_proto::process::__buffa::oneof::stream_input_request::Event as InputEvent;
use kiln_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, UpdateRequest, UpdateResponse,
};
use nix::fcntl::OFlag;

use crate::state::EnvdState;
use crate::{auth, paths};
use spawn::{DEFAULT_PATH, SpawnConfig};
use table::{InputKind, Proc, ProcessTable};

/// How long a finished process stays visible to `Connect`.
const KEEP_ENDED: Duration = Duration::from_secs(60);

pub struct ProcessService {
    state: EnvdState,
    table: ProcessTable,
}

impl ProcessService {
    pub fn new(state: EnvdState) -> Self {
        Self {
            state,
            table: ProcessTable::default(),
        }
    }

    /// Starts a process and everything that watches it; returns it with the
    /// subscription the `Start` stream reads (taken before any output).
    fn launch(
        &self,
        config: SpawnConfig,
        request_config: kiln_proto::process::ProcessConfig,
        tag: Option<String>,
    ) -> Result<(Arc<Proc>, table::Subscription), ConnectError> {
        let is_pty = config.pty.is_some();
        // Closing the write end tells the output threads the process exited.
        let (exited_rx, exited_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| ConnectError::internal(format!("error creating a pipe: {e}")))?;
        let spawned = spawn::spawn(config).map_err(|e| {
            if e.is_client_error() {
                ConnectError::invalid_argument(e.to_string())
            } else {
                ConnectError::internal(e.to_string())
            }
        })?;
        let proc = Arc::new(Proc::new(
            spawned.pid,
            tag,
            request_config,
            is_pty,
            spawned.input,
        ));
        let subscription = proc.subscribe();
        self.table.insert(Arc::clone(&proc));

        let exited_rx = Arc::new(exited_rx);
        let mut readers = Vec::new();
        for (kind, fd) in spawned.outputs {
            match output::start_reader(Arc::clone(&proc), kind, fd, Arc::clone(&exited_rx)) {
                Ok(done) => readers.push(done),
                // The fd is dropped: the child gets EPIPE/SIGPIPE on writes.
                Err(e) => tracing::error!(pid = proc.pid, %e, "starting output reader failed"),
            }
        }

        let table = self.table.clone();
        let waiter_proc = Arc::clone(&proc);
        let exit = spawned.exit;
        tokio::spawn(async move {
            let proc = waiter_proc;
            let end = match exit.await {
                Ok(status) => stream::end_event(status),
                Err(_) => stream::end_event(libc::SIGKILL),
            };
            proc.mark_exited();
            drop(exited_tx);
            for done in readers {
                let _ = done.await;
            }
            tracing::debug!(pid = proc.pid, "process finished");
            // Scheduled first: a stuck subscriber must not keep it around.
            table.remove_later(Arc::clone(&proc), KEEP_ENDED);
            proc.finish(end).await;
        });
        Ok((proc, subscription))
    }
}

fn selector(process: Option<&ProcessSelector>) -> Result<Selector, ConnectError> {
    process.and_then(|p| p.selector.clone()).ok_or_else(|| {
        ConnectError::invalid_argument("a process selector (pid or tag) is required")
    })
}

fn size(pty: &kiln_proto::process::PTY) -> (u16, u16) {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    pty.size
        .as_option()
        .map(|s| (clamp(s.cols), clamp(s.rows)))
        .unwrap_or((0, 0))
}

fn input_of(input: Option<&ProcessInput>) -> Result<(InputKind, Vec<u8>), ConnectError> {
    match input.and_then(|i| i.input.clone()) {
        Some(Input::Stdin(data)) => Ok((InputKind::Stdin, data)),
        Some(Input::Pty(data)) => Ok((InputKind::Pty, data)),
        None => Err(ConnectError::invalid_argument(
            "input (stdin or pty) is required",
        )),
    }
}

fn start_response(event: ProcessEvent) -> StartResponse {
    StartResponse {
        event: event.into(),
        ..Default::default()
    }
}

fn connect_response(event: ProcessEvent) -> ConnectResponse {
    ConnectResponse {
        event: event.into(),
        ..Default::default()
    }
}

// Concrete return types are simpler to read than the trait's `impl` ones.
#[allow(refining_impl_trait)]
impl kiln_proto::process::Process for ProcessService {
    async fn list(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, ListRequest>,
    ) -> ServiceResult<ListResponse> {
        let processes = self
            .table
            .running()
            .into_iter()
            .map(|p| ProcessInfo {
                config: p.config.clone().into(),
                pid: p.pid,
                tag: p.tag.clone(),
                ..Default::default()
            })
            .collect();
        Response::ok(ListResponse {
            processes,
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ConnectRequest>,
    ) -> ServiceResult<ServiceStream<ConnectResponse>> {
        let request = request.to_owned_message();
        let proc = self.table.get(&selector(request.process.as_option())?)?;
        let events = stream::events(
            proc.pid,
            proc.subscribe(),
            stream::keepalive_interval(ctx.headers()),
            ctx.deadline(),
        );
        Response::stream_ok(events.map(|e| e.map(connect_response)))
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StartRequest>,
    ) -> ServiceResult<ServiceStream<StartResponse>> {
        let user = auth::rpc_user(&self.state, &ctx)?;
        let request = request.to_owned_message();
        let config = request.process.as_option().cloned().unwrap_or_default();
        if config.cmd.is_empty() {
            return Err(ConnectError::invalid_argument("process.cmd is required"));
        }
        let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
            Some(cwd) => paths::resolve(cwd, &user, None),
            None => self.state.default_workdir(&user),
        };
        match std::fs::metadata(&cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ConnectError::invalid_argument(format!(
                    "cwd '{}' is not a directory",
                    cwd.display()
                )));
            }
            Err(_) => {
                return Err(ConnectError::invalid_argument(format!(
                    "cwd '{}' does not exist",
                    cwd.display()
                )));
            }
        }

        // Later entries win: envd's defaults, then the sandbox's variables
        // from /init, then the request's.
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), user.home.to_string_lossy().into_owned()),
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
            ("SHELL".into(), user.shell.clone()),
        ];
        env.extend(self.state.env_vars());
        env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));

        // What the sandbox's log says about this process (see `kiln sandbox logs`).
        let (log_cmd, log_user) = (config.cmd.clone(), user.name.clone());
        let spawn_config = SpawnConfig {
            cmd: config.cmd.clone(),
            args: config.args.clone(),
            env,
            cwd,
            user,
            pty: request.pty.as_option().map(size),
            stdin: request.stdin.unwrap_or(true),
        };
        let tag = request.tag.clone();
        let (proc, subscription) = self.launch(spawn_config, config, tag)?;
        tracing::info!(pid = proc.pid, cmd = %log_cmd, user = %log_user, "process started");
        {
            let proc = Arc::clone(&proc);
            tokio::spawn(async move {
                proc.wait_exited().await;
                tracing::info!(pid = proc.pid, "process ended");
            });
        }

        // The request timeout is the process's lifetime.
        let deadline = ctx.deadline();
        if let Some(deadline) = deadline {
            let proc = Arc::clone(&proc);
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        if proc.is_running() {
                            tracing::info!(pid = proc.pid, "request deadline passed, killing process");
                            let _ = proc.signal(nix::sys::signal::Signal::SIGKILL);
                        }
                    }
                    _ = proc.wait_exited() => {}
                }
            });
        }
        let events = stream::events(
            proc.pid,
            subscription,
            stream::keepalive_interval(ctx.headers()),
            deadline,
        );
        Response::stream_ok(events.map(|e| e.map(start_response)))
    }

    async fn update(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, UpdateRequest>,
    ) -> ServiceResult<UpdateResponse> {
        let request = request.to_owned_message();
        let proc = self
            .table
            .get_running(&selector(request.process.as_option())?)?;
        match request.pty.as_option() {
            Some(pty) => {
                let (cols, rows) = size(pty);
                proc.resize(cols, rows)?;
            }
            None if !proc.pty => {
                return Err(ConnectError::invalid_argument(format!(
                    "process {} has no PTY",
                    proc.pid
                )));
            }
            None => {}
        }
        Response::ok(UpdateResponse::default())
    }

    async fn stream_input(
        &self,
        _ctx: RequestContext,
        mut requests: InboundStream<StreamInputRequest>,
    ) -> ServiceResult<StreamInputResponse> {
        let first = match requests.next().await {
            Some(item) => item?.to_owned_message(),
            None => return Response::ok(StreamInputResponse::default()),
        };
        let proc = match first.event {
            Some(InputEvent::Start(start)) => self
                .table
                .get_running(&selector(start.process.as_option())?)?,
            _ => {
                return Err(ConnectError::invalid_argument(
                    "the first message of an input stream must be a start event",
                ));
            }
        };
        while let Some(item) = requests.next().await {
            match item?.to_owned_message().event {
                Some(InputEvent::Data(data)) => {
                    let (kind, bytes) = input_of(data.input.as_option())?;
                    proc.write_input(kind, bytes).await?;
                }
                Some(InputEvent::Start(_)) => {
                    return Err(ConnectError::invalid_argument(
                        "an input stream can start only once",
                    ));
                }
                Some(InputEvent::Keepalive(_)) | None => {}
            }
        }
        Response::ok(StreamInputResponse::default())
    }

    async fn send_input(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendInputRequest>,
    ) -> ServiceResult<SendInputResponse> {
        let request = request.to_owned_message();
        let proc = self
            .table
            .get_running(&selector(request.process.as_option())?)?;
        let (kind, bytes) = input_of(request.input.as_option())?;
        proc.write_input(kind, bytes).await?;
        Response::ok(SendInputResponse::default())
    }

    async fn send_signal(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendSignalRequest>,
    ) -> ServiceResult<SendSignalResponse> {
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let signal = match request.signal.as_known() {
            Some(Signal::SIGNAL_SIGKILL) => nix::sys::signal::Signal::SIGKILL,
            Some(Signal::SIGNAL_SIGTERM) => nix::sys::signal::Signal::SIGTERM,
            _ => {
                return Err(ConnectError::unimplemented(format!(
                    "invalid signal: {}",
                    request.signal.to_i32()
                )));
            }
        };
        self.table.get_running(&selector)?.signal(signal)?;
        Response::ok(SendSignalResponse::default())
    }

    async fn close_stdin(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, CloseStdinRequest>,
    ) -> ServiceResult<CloseStdinResponse> {
        let request = request.to_owned_message();
        let proc = self
            .table
            .get_running(&selector(request.process.as_option())?)?;
        proc.close_stdin().await?;
        Response::ok(CloseStdinResponse::default())
    }
}
