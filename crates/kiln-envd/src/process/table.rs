//! The processes envd started and the live state of each one: who is
//! listening to its output, its input side, and how it ended.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use connectrpc::ConnectError;
use kiln_proto::process::__buffa::oneof::process_selector::Selector;
use kiln_proto::process::{ProcessConfig, ProcessEvent};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

/// Events buffered per subscriber before the output reader blocks (which in
/// turn blocks the process once the pipe fills up).
const SUBSCRIBER_BUFFER: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which input a `SendInput` targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Stdin,
    Pty,
}

/// What a new subscriber gets: a live feed, or the end of a finished process.
pub enum Subscription {
    Live(mpsc::Receiver<ProcessEvent>),
    Ended(ProcessEvent),
}

struct Live {
    subscribers: Vec<mpsc::Sender<ProcessEvent>>,
    /// The `end` event once the process finished and its output was drained.
    end: Option<ProcessEvent>,
}

/// One process started by envd.
pub struct Proc {
    pub pid: u32,
    pub tag: Option<String>,
    /// The configuration as the client sent it (reported by `List`).
    pub config: ProcessConfig,
    pub pty: bool,
    /// The stdin pipe, or the PTY master; `None` once closed (or never open).
    input: Mutex<Option<File>>,
    live: Mutex<Live>,
    exited: AtomicBool,
    exited_tx: watch::Sender<bool>,
}

impl Proc {
    pub fn new(
        pid: u32,
        tag: Option<String>,
        config: ProcessConfig,
        pty: bool,
        input: Option<File>,
    ) -> Self {
        Proc {
            pid,
            tag,
            config,
            pty,
            input: Mutex::new(input),
            live: Mutex::new(Live {
                subscribers: Vec::new(),
                end: None,
            }),
            exited: AtomicBool::new(false),
            exited_tx: watch::channel(false).0,
        }
    }

    /// Starts listening to the process's output from now on.
    pub fn subscribe(&self) -> Subscription {
        let mut live = lock(&self.live);
        if let Some(end) = &live.end {
            return Subscription::Ended(end.clone());
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        live.subscribers.push(tx);
        Subscription::Live(rx)
    }

    /// Delivers an output event to every subscriber, waiting while a
    /// subscriber's buffer is full. Output nobody listens to is dropped.
    /// Blocks: call it only from plain threads.
    pub fn publish_blocking(&self, event: ProcessEvent) {
        let subscribers: Vec<_> = {
            let mut live = lock(&self.live);
            live.subscribers.retain(|s| !s.is_closed());
            live.subscribers.clone()
        };
        if let Some((last, rest)) = subscribers.split_last() {
            for tx in rest {
                let _ = tx.blocking_send(event.clone());
            }
            let _ = last.blocking_send(event);
        }
    }

    /// Records that the process itself exited (its output may still be
    /// draining); from now on it no longer takes signals or input.
    pub fn mark_exited(&self) {
        self.exited.store(true, Ordering::SeqCst);
        self.exited_tx.send_replace(true);
    }

    pub fn is_running(&self) -> bool {
        !self.exited.load(Ordering::SeqCst)
    }

    /// Resolves once the process has exited.
    pub async fn wait_exited(&self) {
        let mut rx = self.exited_tx.subscribe();
        let _ = rx.wait_for(|exited| *exited).await;
    }

    /// Sends the `end` event to every subscriber (after all output) and
    /// keeps it for late subscribers.
    pub async fn finish(&self, end: ProcessEvent) {
        let subscribers = {
            let mut live = lock(&self.live);
            live.end = Some(end.clone());
            std::mem::take(&mut live.subscribers)
        };
        // Close the input side unless a writer is stuck on it right now.
        if let Ok(mut input) = self.input.try_lock() {
            *input = None;
        }
        for tx in subscribers {
            let _ = tx.send(end.clone()).await;
        }
    }

    /// Sends `signal` to the process group the process leads (and to the
    /// process itself, in case it moved to another group).
    pub fn signal(&self, signal: Signal) -> Result<(), ConnectError> {
        if !self.is_running() {
            return Err(not_found_pid(self.pid));
        }
        let pid = Pid::from_raw(self.pid as i32);
        let group = nix::sys::signal::killpg(pid, signal);
        let own = nix::sys::signal::kill(pid, signal);
        match (group, own) {
            (Err(e), Err(_)) => Err(ConnectError::internal(format!(
                "error sending signal {signal} to process {}: {e}",
                self.pid
            ))),
            _ => Ok(()),
        }
    }

    fn check_input(&self, kind: InputKind) -> Result<(), ConnectError> {
        if !self.is_running() {
            return Err(not_found_pid(self.pid));
        }
        match (kind, self.pty) {
            (InputKind::Stdin, true) => Err(ConnectError::invalid_argument(format!(
                "process {} has a PTY: send pty input instead of stdin",
                self.pid
            ))),
            (InputKind::Pty, false) => Err(ConnectError::invalid_argument(format!(
                "process {} has no PTY: send stdin input instead of pty",
                self.pid
            ))),
            _ => Ok(()),
        }
    }

    /// Writes `data` to the stdin pipe or the PTY master.
    pub async fn write_input(
        self: &Arc<Self>,
        kind: InputKind,
        data: Vec<u8>,
    ) -> Result<(), ConnectError> {
        self.check_input(kind)?;
        if data.is_empty() {
            return Ok(());
        }
        let proc = Arc::clone(self);
        // The write blocks while the child does not read, so keep it off the
        // async workers.
        tokio::task::spawn_blocking(move || {
            let mut input = lock(&proc.input);
            let Some(file) = input.as_mut() else {
                return Err(ConnectError::failed_precondition(format!(
                    "stdin of process {} is closed or was not enabled (start it with stdin: true)",
                    proc.pid
                )));
            };
            file.write_all(&data).map_err(|e| {
                ConnectError::failed_precondition(format!(
                    "error writing input to process {}: {e}",
                    proc.pid
                ))
            })
        })
        .await
        .map_err(|e| ConnectError::internal(format!("input writer failed: {e}")))?
    }

    /// Closes the stdin pipe, so the child reads EOF.
    pub async fn close_stdin(self: &Arc<Self>) -> Result<(), ConnectError> {
        if !self.is_running() {
            return Err(not_found_pid(self.pid));
        }
        if self.pty {
            return Err(ConnectError::invalid_argument(format!(
                "cannot close stdin of a PTY process {} (send Ctrl-D, \\x04, instead)",
                self.pid
            )));
        }
        let proc = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            lock(&proc.input).take();
        })
        .await
        .map_err(|e| ConnectError::internal(format!("closing stdin failed: {e}")))
    }

    /// Changes the PTY's window size.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ConnectError> {
        if !self.is_running() {
            return Err(not_found_pid(self.pid));
        }
        if !self.pty {
            return Err(ConnectError::invalid_argument(format!(
                "process {} has no PTY to resize",
                self.pid
            )));
        }
        // A writer blocked on a full PTY must not block a resize, so take
        // the master without waiting for the lock when it is busy.
        let guard = match self.input.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(ConnectError::unavailable(
                    "the PTY is busy with input, try again",
                ));
            }
        };
        let Some(master) = guard.as_ref() else {
            return Err(ConnectError::failed_precondition("the PTY is closed"));
        };
        super::pty::set_size(master.as_raw_fd(), cols, rows)
            .map_err(|e| ConnectError::internal(format!("error resizing the PTY: {e}")))
    }
}

pub fn not_found_pid(pid: u32) -> ConnectError {
    ConnectError::not_found(format!("process with pid {pid} not found"))
}

pub fn not_found(selector: &Selector) -> ConnectError {
    match selector {
        Selector::Pid(pid) => not_found_pid(*pid),
        Selector::Tag(tag) => ConnectError::not_found(format!("process with tag {tag} not found")),
    }
}

#[derive(Default)]
struct TableInner {
    by_pid: HashMap<u32, Arc<Proc>>,
    /// The latest process started with each tag.
    by_tag: HashMap<String, u32>,
}

/// Every process envd started, running or recently finished.
#[derive(Default, Clone)]
pub struct ProcessTable {
    inner: Arc<Mutex<TableInner>>,
}

impl ProcessTable {
    pub fn insert(&self, proc: Arc<Proc>) {
        let mut inner = lock(&self.inner);
        if let Some(tag) = &proc.tag {
            inner.by_tag.insert(tag.clone(), proc.pid);
        }
        inner.by_pid.insert(proc.pid, proc);
    }

    /// The process `selector` names, running or recently finished.
    pub fn get(&self, selector: &Selector) -> Result<Arc<Proc>, ConnectError> {
        let inner = lock(&self.inner);
        let pid = match selector {
            Selector::Pid(pid) => Some(*pid),
            Selector::Tag(tag) => inner.by_tag.get(tag).copied(),
        };
        pid.and_then(|pid| inner.by_pid.get(&pid).cloned())
            // A tag's pid may have been reused by an untagged process.
            .filter(|p| match selector {
                Selector::Tag(tag) => p.tag.as_deref() == Some(tag.as_str()),
                Selector::Pid(_) => true,
            })
            .ok_or_else(|| not_found(selector))
    }

    /// The running process `selector` names.
    pub fn get_running(&self, selector: &Selector) -> Result<Arc<Proc>, ConnectError> {
        let proc = self.get(selector)?;
        if proc.is_running() {
            Ok(proc)
        } else {
            Err(not_found(selector))
        }
    }

    /// Running processes, by pid.
    pub fn running(&self) -> Vec<Arc<Proc>> {
        let inner = lock(&self.inner);
        let mut procs: Vec<_> = inner
            .by_pid
            .values()
            .filter(|p| p.is_running())
            .cloned()
            .collect();
        procs.sort_by_key(|p| p.pid);
        procs
    }

    /// Forgets a finished process after `after`, unless its pid was reused.
    pub fn remove_later(&self, proc: Arc<Proc>, after: Duration) {
        let table = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let mut inner = lock(&table.inner);
            let same = inner
                .by_pid
                .get(&proc.pid)
                .is_some_and(|p| Arc::ptr_eq(p, &proc));
            if same {
                inner.by_pid.remove(&proc.pid);
                if let Some(tag) = &proc.tag
                    && inner.by_tag.get(tag) == Some(&proc.pid)
                {
                    inner.by_tag.remove(tag);
                }
            }
        });
    }
}
