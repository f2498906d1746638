//! `kiln`: run the server (`kiln serve`) and drive it (`kiln sandbox …`,
//! `kiln template …`, `kiln keys …`), shaped like the e2b CLI.

mod client;
mod keys;
mod sandbox;
mod serve;
mod table;
mod template;
mod terminal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Secure sandboxes for AI agents, E2B-compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control API, the sandbox proxy and the runtime in one process.
    Serve(serve::ServeArgs),
    /// Create, list, inspect, enter and kill sandboxes.
    #[command(alias = "sbx")]
    Sandbox(sandbox::SandboxArgs),
    /// Build, list and delete templates.
    #[command(alias = "tpl")]
    Template(template::TemplateArgs),
    /// Manage API keys and teams (on this machine's database).
    Keys(keys::KeysArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // Like other Unix tools, end quietly when the reader of our output
        // goes away (`kiln sandbox list | head`). The server keeps Rust's
        // default (ignored), so a closed socket is an error, not a death.
        // SAFETY: called before any thread exists; SIG_DFL is a valid handler.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await.map(|()| 0),
            Command::Sandbox(args) => sandbox::run(args).await,
            Command::Template(args) => template::run(args).await.map(|()| 0),
            Command::Keys(args) => keys::run(args).await.map(|()| 0),
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
