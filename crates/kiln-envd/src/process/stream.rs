//! Process events and the server streams of `Start` and `Connect`.

use std::pin::Pin;
use std::time::Duration;

use connectrpc::ConnectError;
use futures::Stream;
use kiln_proto::process::__buffa::oneof::process_event::Event;
use kiln_proto::process::__buffa::oneof::process_event::data_event::Output;
use kiln_proto::process::ProcessEvent;
use kiln_proto::process::process_event::{DataEvent, EndEvent, KeepAlive, StartEvent};
use tokio::sync::mpsc;

use super::spawn::OutputKind;
use super::table::Subscription;
use crate::reaper;

/// Keepalive interval when the client asks for none (E2B envd's default).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

fn event(e: impl Into<Event>) -> ProcessEvent {
    ProcessEvent {
        event: Some(e.into()),
        ..Default::default()
    }
}

pub fn start_event(pid: u32) -> ProcessEvent {
    event(StartEvent {
        pid,
        ..Default::default()
    })
}

pub fn data_event(kind: OutputKind, bytes: Vec<u8>) -> ProcessEvent {
    let output = match kind {
        OutputKind::Stdout => Output::Stdout(bytes),
        OutputKind::Stderr => Output::Stderr(bytes),
        OutputKind::Pty => Output::Pty(bytes),
    };
    event(DataEvent {
        output: Some(output),
        ..Default::default()
    })
}

pub fn keepalive_event() -> ProcessEvent {
    event(KeepAlive::default())
}

/// The `end` event for a raw wait status; `error` carries the status text
/// when the process failed or was killed (like Go's `cmd.Wait` error).
pub fn end_event(status: reaper::RawWaitStatus) -> ProcessEvent {
    let (exit_code, exited, status) = reaper::describe(status);
    let failed = !(exited && exit_code == 0);
    event(EndEvent {
        exit_code,
        exited,
        error: failed.then(|| status.clone()),
        status,
        ..Default::default()
    })
}

fn is_end(e: &ProcessEvent) -> bool {
    matches!(e.event, Some(Event::End(_)))
}

/// The keepalive interval a request asks for with `Keepalive-Ping-Interval`
/// (seconds).
pub fn keepalive_interval(headers: &http::HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

struct State {
    pid: u32,
    started: bool,
    done: bool,
    rx: Option<mpsc::Receiver<ProcessEvent>>,
    pending_end: Option<ProcessEvent>,
    keepalive: tokio::time::Interval,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// `start{pid}`, then the subscription's events with keepalives every
/// `keepalive`, ending after `end`. When `deadline` passes first the stream
/// ends with `deadline_exceeded`.
pub fn events(
    pid: u32,
    subscription: Subscription,
    keepalive: Duration,
    deadline: Option<std::time::Instant>,
) -> impl Stream<Item = Result<ProcessEvent, ConnectError>> + Send + 'static {
    let (rx, pending_end) = match subscription {
        Subscription::Live(rx) => (Some(rx), None),
        Subscription::Ended(end) => (None, Some(end)),
    };
    let state = State {
        pid,
        started: false,
        done: false,
        rx,
        pending_end,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive),
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
    };
    futures::stream::unfold(state, |mut st| async move {
        if !st.started {
            st.started = true;
            let start = start_event(st.pid);
            return Some((Ok(start), st));
        }
        if st.done {
            return None;
        }
        if let Some(end) = st.pending_end.take() {
            st.done = true;
            return Some((Ok(end), st));
        }
        let rx = st.rx.as_mut()?;
        let deadline = async {
            match st.deadline.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            biased;
            _ = deadline => {
                Err(ConnectError::deadline_exceeded("context deadline exceeded"))
            }
            ev = rx.recv() => match ev {
                Some(ev) => Ok(ev),
                // The process went away without an end event (envd bug).
                None => Err(ConnectError::internal("process output ended without an exit status")),
            },
            _ = st.keepalive.tick() => Ok(keepalive_event()),
        };
        st.done = item.as_ref().map_or(true, is_end);
        Some((item, st))
    })
}
