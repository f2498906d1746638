//! An interactive terminal in a sandbox: a PTY process in envd, the local
//! terminal in raw mode (so Ctrl-C reaches the remote process as a byte),
//! keystrokes sent as PTY input, window size changes sent as resizes.

use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::client::{Api, ProcessEvent};

/// Restores the local terminal however the session ends.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

pub async fn run(api: &Api, sandbox_id: &str, user: &str) -> Result<i32> {
    let envd = Arc::new(api.envd(sandbox_id).await?);
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    let raw = RawMode::enable().ok();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<u32>();
    let mut pid_tx = Some(pid_tx);
    let mut code = 0;
    let process = json!({
        "cmd": "/bin/bash",
        "args": ["-i", "-l"],
        "envs": {"TERM": std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into())},
    });
    // Keystrokes and resizes, once the process has started.
    let input_envd = envd.clone();
    let input = tokio::spawn(async move {
        let Ok(pid) = pid_rx.await else { return };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            tokio::select! {
                data = rx.recv() => match data {
                    Some(data) => {
                        if input_envd.send_pty_input(pid, &data).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => None } } => {
                    if let Ok((c, r)) = crossterm::terminal::size() {
                        let _ = input_envd.resize(pid, c, r).await;
                    }
                }
            }
        }
    });
    let mut out = std::io::stdout();
    let result = envd
        .start(process, Some((cols, rows)), user, |event| match event {
            ProcessEvent::Start(pid) => {
                if let Some(tx) = pid_tx.take() {
                    let _ = tx.send(pid);
                }
            }
            ProcessEvent::Pty(b) | ProcessEvent::Stdout(b) | ProcessEvent::Stderr(b) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            ProcessEvent::End { exit_code, .. } => code = exit_code,
        })
        .await;
    input.abort();
    drop(raw);
    result?;
    Ok(if code < 0 { 130 } else { code })
}
