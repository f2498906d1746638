//! `envd`: the daemon inside every Kiln sandbox.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "envd",
    version,
    about = "Kiln's in-sandbox daemon (E2B envd protocol)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ENVD_ADDR", default_value = "0.0.0.0")]
    addr: std::net::IpAddr,
    /// Port to listen on (E2B SDKs use 49983).
    #[arg(long, env = "ENVD_PORT", default_value_t = kiln_envd::DEFAULT_PORT)]
    port: u16,
}

fn main() -> anyhow::Result<()> {
    // Templates link `sudo` to envd (see `kiln_envd::sudo`).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = argv
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "sudo");
    if called {
        std::process::exit(kiln_envd::sudo::client_main(argv));
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Its output goes to a log file on the host, never a terminal.
        .with_ansi(false)
        .init();
    let addr = SocketAddr::new(args.addr, args.port);
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, version = kiln_envd::VERSION, "envd listening");
    // Timers only, no I/O driver: envd registers nothing with epoll (its
    // sockets are served by plain threads, see `listener`), and without an
    // I/O driver idle workers park on futexes rather than in epoll_wait, so
    // no wakeup depends on an epoll registration that a gVisor
    // checkpoint/restore can lose (google/gvisor#13920).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()?;
    kiln_envd::sudo::serve();
    let state = kiln_envd::EnvdState::new();
    runtime.block_on(kiln_envd::serve(listener, state, shutdown_signal()))?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. A plain thread waits for them (tokio's
/// signal handling needs the I/O driver this runtime does not have).
async fn shutdown_signal() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = tx.send(());
                }
            });
            let _ = rx.await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM; stop envd with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
