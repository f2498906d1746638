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
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let addr = SocketAddr::new(args.addr, args.port);
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, version = kiln_envd::VERSION, "envd listening");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = kiln_envd::EnvdState::new();
    runtime.block_on(kiln_envd::serve(listener, state, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
