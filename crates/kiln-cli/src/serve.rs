//! `kiln serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kiln_api::{Server, ServerConfig};
use kiln_runtime::RuntimeConfig;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the API and sandbox proxy.
    #[arg(long, default_value = "127.0.0.1:3000", env = "KILN_LISTEN")]
    pub listen: SocketAddr,
    /// Templates, snapshots, the SQLite database.
    #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// runsc state and running sandboxes' files.
    #[arg(long, default_value = "/run/kiln", env = "KILN_RUN_DIR")]
    pub run_dir: PathBuf,
    /// PostgreSQL (`postgres://…`) instead of SQLite in the data dir.
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Domain of sandbox host names (`<port>-<id>.<domain>`), returned to the SDKs.
    #[arg(long, env = "KILN_DOMAIN")]
    pub domain: Option<String>,
    /// The static envd binary placed in every template (default: `envd` beside `kiln`).
    #[arg(long, env = "KILN_ENVD")]
    pub envd: Option<PathBuf>,
    /// The base root filesystem of the `base` template (made by scripts/build-base-rootfs.sh).
    #[arg(
        long,
        default_value = "/var/lib/kiln/cache/base-rootfs",
        env = "KILN_BASE_ROOTFS"
    )]
    pub base_rootfs: PathBuf,
    /// Warm, frozen sandboxes kept ready for `base` (faster creates).
    #[arg(long, default_value_t = 2, env = "KILN_POOL_SIZE")]
    pub pool_size: usize,
    /// Sandboxes a new team may run at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: i64,
    /// Longest lifetime of a sandbox of a new team, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub max_lifetime: i64,
    /// gVisor platform. `systrap` is fastest for syscall-heavy work; `ptrace`
    /// starts processes faster and costs no CPU while a sandbox idles, but
    /// makes every syscall much slower (see docs/runtime.md). Snapshots are
    /// per platform: templates are snapshotted again after a change.
    #[arg(long, default_value = "systrap", env = "KILN_PLATFORM", value_parser = ["systrap", "ptrace", "kvm"])]
    pub platform: String,
    /// Subnet sandboxes get their addresses from.
    #[arg(long, default_value = "10.11.0.0/16")]
    pub subnet: String,
    /// nftables table of sandbox networking.
    #[arg(long, default_value = "kiln")]
    pub nft_table: String,
    /// Prefix of network namespaces and host interfaces.
    #[arg(long, default_value = "kiln")]
    pub iface_prefix: String,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(&args.log_format);
    if !nix_is_root() {
        bail!("kiln serve runs gVisor sandboxes and needs root");
    }
    let envd = match args.envd {
        Some(p) => p,
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("envd")))
            .filter(|p| p.exists())
            .context("no envd binary: pass --envd (scripts/build-envd.sh builds it)")?,
    };
    if !envd.exists() {
        bail!("envd binary {} does not exist", envd.display());
    }
    if !args.base_rootfs.join("usr/bin").exists() {
        bail!(
            "no base root filesystem at {}: make it with `bash scripts/build-base-rootfs.sh {}`",
            args.base_rootfs.display(),
            args.base_rootfs.display()
        );
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let database_url = args.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            args.data_dir.join("kiln.db").display()
        )
    });
    let mut runtime = RuntimeConfig::new(&args.data_dir, &args.run_dir);
    runtime.network.subnet = args.subnet.parse().context("--subnet")?;
    runtime.platform = args.platform.clone();
    runtime.network.table_name = args.nft_table.clone();
    runtime.network.name_prefix = args.iface_prefix.clone();
    let cfg = ServerConfig {
        database_url,
        domain: args.domain.clone(),
        base_rootfs: args.base_rootfs.clone(),
        envd,
        pool_size: args.pool_size,
        default_concurrency: args.concurrency,
        default_max_lifetime_s: args.max_lifetime,
        api_key: std::env::var("KILN_API_KEY").ok().filter(|k| !k.is_empty()),
        client_id: hostname(),
        runtime,
    };
    let server = Server::start(cfg).await?;
    if let Some(key) = &server.new_key {
        // Printed once: only its hash is stored.
        println!("Your API key (shown only now; store it): {key}");
        println!("  export E2B_API_KEY={key}");
    }
    // No Nagle: proxied streams are many small writes, and waiting for the
    // client's (delayed) ACK between them would add ~40 ms to a command.
    let listener = axum::serve::ListenerExt::tap_io(
        tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?,
        |tcp| {
            let _ = tcp.set_nodelay(true);
        },
    );
    println!("kiln serving on http://{}", args.listen);
    println!(
        "  export E2B_API_URL=http://{0} E2B_SANDBOX_URL=http://{0}",
        args.listen
    );
    // A clean stop waits for requests in flight, but not forever: a proxied
    // stream (a long-running command's output) may never end on its own.
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let serve = axum::serve(listener, server.router()).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stopping_tx.send(true);
    });
    tokio::select! {
        result = serve => result.context("serving")?,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        } => tracing::warn!("connections still open 10 s after the stop signal; closing them"),
    }
    tracing::info!("stopping: running sandboxes keep running and are adopted at the next start");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kiln".into())
}
