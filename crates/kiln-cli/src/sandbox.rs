//! `kiln sandbox`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Api, ApiArgs, ProcessEvent};

#[derive(Args, Debug)]
pub struct SandboxArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// Create a sandbox and open a terminal in it (or just print its id with --detach).
    #[command(alias = "cr")]
    Create {
        /// Template id or name.
        #[arg(default_value = "base")]
        template: String,
        /// Seconds until it is killed (or paused with --auto-pause).
        #[arg(long, default_value_t = 300)]
        timeout: i64,
        /// Metadata, `key=value` (repeatable).
        #[arg(long = "metadata", short = 'm')]
        metadata: Vec<String>,
        /// Environment variables, `KEY=value` (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Pause instead of kill when the timeout passes.
        #[arg(long)]
        auto_pause: bool,
        /// Block traffic to the internet.
        #[arg(long)]
        no_internet: bool,
        /// Print the id and return instead of opening a terminal.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// List sandboxes.
    #[command(alias = "ls")]
    List {
        /// `running`, `paused`, or both comma-separated.
        #[arg(long, short = 's')]
        state: Option<String>,
        /// Only those with this metadata, `key=value` (repeatable).
        #[arg(long = "metadata", short = 'm')]
        metadata: Vec<String>,
        /// Most to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Details of a sandbox.
    #[command(alias = "in")]
    Info { id: String },
    /// Kill sandboxes.
    #[command(alias = "kl")]
    Kill {
        ids: Vec<String>,
        /// Kill every sandbox of your team.
        #[arg(long)]
        all: bool,
    },
    /// Pause a sandbox with its memory.
    #[command(alias = "ps")]
    Pause { id: String },
    /// Resume a paused sandbox.
    #[command(alias = "rs")]
    Resume {
        id: String,
        #[arg(long, default_value_t = 300)]
        timeout: i64,
    },
    /// Set a sandbox's timeout (seconds from now).
    Timeout { id: String, seconds: i64 },
    /// Run a command in a sandbox; exits with its exit code.
    #[command(alias = "ex")]
    Exec {
        id: String,
        /// Run as this user.
        #[arg(long, short = 'u', default_value = "user")]
        user: String,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// The command: one argument is a shell command line (`'ls | wc -l'`);
        /// several are the program and its arguments, passed as they are
        /// (`python3 -c 'print(6*7)'`). Run by `bash -l -c`, as the SDKs do.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Open an interactive terminal in a sandbox.
    #[command(alias = "cn")]
    Connect {
        id: String,
        #[arg(long, short = 'u', default_value = "user")]
        user: String,
    },
    /// A sandbox's lifecycle events.
    #[command(alias = "lg")]
    Logs {
        id: String,
        /// Keep printing new events.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// A sandbox's CPU and memory samples.
    #[command(alias = "mt")]
    Metrics { id: String },
}

fn pairs(items: &[String], what: &str) -> Result<serde_json::Map<String, Value>> {
    let mut map = serde_json::Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{what} '{item}' is not key=value"))?;
        map.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(map)
}

fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run(args: SandboxArgs) -> Result<i32> {
    let api = Api::new(&args.api)?;
    let as_json = args.api.json;
    match args.command {
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
            auto_pause,
            no_internet,
            detach,
        } => {
            let body = json!({
                "templateID": template,
                "timeout": timeout,
                "metadata": pairs(&metadata, "metadata")?,
                "envVars": pairs(&env, "env")?,
                "autoPause": auto_pause,
                "allow_internet_access": !no_internet,
            });
            let sbx = api.post("/v2/sandboxes", &body).await?;
            let id = field(&sbx, "sandboxID");
            if as_json {
                print_json(&sbx)?;
            } else if detach {
                println!("{id}");
            }
            if detach || as_json {
                return Ok(0);
            }
            eprintln!(
                "sandbox {id} created; opening a terminal (exit to leave; it is killed then)"
            );
            let code = crate::terminal::run(&api, &id, "user").await;
            let _ = api.delete(&format!("/sandboxes/{id}")).await;
            code
        }
        SandboxCommand::List {
            state,
            metadata,
            limit,
        } => {
            let mut all = Vec::new();
            let mut token: Option<String> = None;
            let meta: Vec<String> = metadata
                .iter()
                .map(|m| {
                    let (k, v) = m.split_once('=').unwrap_or((m, ""));
                    format!("{}={}", enc(k), enc(v))
                })
                .collect();
            loop {
                let mut q = vec![format!("limit={}", limit.clamp(1, 1000))];
                if let Some(s) = &state {
                    q.push(format!("state={}", enc(s)));
                }
                if !meta.is_empty() {
                    q.push(format!("metadata={}", enc(&meta.join("&"))));
                }
                if let Some(t) = &token {
                    q.push(format!("nextToken={}", enc(t)));
                }
                let (page, next) = api
                    .get_with_header(&format!("/v2/sandboxes?{}", q.join("&")), "x-next-token")
                    .await?;
                all.extend(page.as_array().cloned().unwrap_or_default());
                match next.filter(|t| !t.is_empty()) {
                    Some(t) if all.len() < limit => token = Some(t),
                    _ => break,
                }
            }
            all.truncate(limit);
            if as_json {
                return print_json(&Value::Array(all)).map(|()| 0);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|s| {
                    let meta = s
                        .get("metadata")
                        .and_then(Value::as_object)
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        field(s, "sandboxID"),
                        field(s, "templateID"),
                        field(s, "state"),
                        field(s, "startedAt"),
                        field(s, "endAt"),
                        meta,
                    ]
                })
                .collect();
            crate::table::print(
                &["ID", "TEMPLATE", "STATE", "STARTED", "ENDS", "METADATA"],
                &rows,
            );
            Ok(0)
        }
        SandboxCommand::Info { id } => {
            let info = api.get(&format!("/sandboxes/{id}")).await?;
            if as_json {
                return print_json(&info).map(|()| 0);
            }
            for key in [
                "sandboxID",
                "templateID",
                "alias",
                "state",
                "startedAt",
                "endAt",
                "cpuCount",
                "memoryMB",
                "envdVersion",
                "allowInternetAccess",
                "metadata",
            ] {
                println!("{key:<20} {}", field(&info, key));
            }
            Ok(0)
        }
        SandboxCommand::Kill { ids, all } => {
            let mut targets = ids;
            if all {
                let list = api.get("/v2/sandboxes?limit=1000").await?;
                targets.extend(
                    list.as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| field(s, "sandboxID")),
                );
            }
            if targets.is_empty() {
                bail!("name the sandboxes to kill, or pass --all");
            }
            let mut failed = 0;
            for id in targets {
                match api.delete(&format!("/sandboxes/{id}")).await {
                    Ok(()) => eprintln!("killed {id}"),
                    Err(e) => {
                        eprintln!("{id}: {e:#}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        SandboxCommand::Pause { id } => {
            api.post(&format!("/sandboxes/{id}/pause"), &json!({}))
                .await?;
            eprintln!("paused {id}");
            Ok(0)
        }
        SandboxCommand::Resume { id, timeout } => {
            api.post(
                &format!("/v2/sandboxes/{id}/connect"),
                &json!({"timeout": timeout}),
            )
            .await?;
            eprintln!("{id} is running");
            Ok(0)
        }
        SandboxCommand::Timeout { id, seconds } => {
            api.post(
                &format!("/sandboxes/{id}/timeout"),
                &json!({"timeout": seconds}),
            )
            .await?;
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            user,
            cwd,
            command,
        } => {
            let envd = api.envd(&id).await?;
            let line = command_line(&command);
            let mut process = json!({"cmd": "/bin/bash", "args": ["-l", "-c", line]});
            if let Some(cwd) = cwd {
                process["cwd"] = Value::String(cwd);
            }
            let mut code = 0;
            let mut out = std::io::stdout();
            let mut err = std::io::stderr();
            envd.start(process, None, &user, |event| match event {
                ProcessEvent::Stdout(b) | ProcessEvent::Pty(b) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                ProcessEvent::Stderr(b) => {
                    let _ = err.write_all(&b);
                }
                ProcessEvent::End { exit_code, error } => {
                    code = exit_code;
                    if exit_code < 0
                        && let Some(e) = error
                    {
                        eprintln!("{e}");
                    }
                }
                ProcessEvent::Start(_) => {}
            })
            .await?;
            Ok(if code < 0 { 1 } else { code })
        }
        SandboxCommand::Connect { id, user } => crate::terminal::run(&api, &id, &user).await,
        SandboxCommand::Logs { id, follow } => {
            let mut start: i64 = 0;
            loop {
                let logs = api
                    .get(&format!("/sandboxes/{id}/logs?start={start}&limit=1000"))
                    .await?;
                let entries = logs
                    .get("logEntries")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for e in &entries {
                    if as_json {
                        println!("{e}");
                    } else {
                        println!(
                            "{}  {:<5}  {}",
                            field(e, "timestamp"),
                            field(e, "level"),
                            field(e, "message")
                        );
                    }
                    if let Some(ms) = e
                        .get("timestamp")
                        .and_then(Value::as_str)
                        .and_then(kiln_api::util::parse_rfc3339)
                    {
                        start = start.max(ms + 1);
                    }
                }
                if !follow {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(0)
        }
        SandboxCommand::Metrics { id } => {
            let m = api.get(&format!("/sandboxes/{id}/metrics")).await?;
            if as_json {
                return print_json(&m).map(|()| 0);
            }
            let rows: Vec<Vec<String>> = m
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let mib = |k: &str| {
                        s.get(k)
                            .and_then(Value::as_u64)
                            .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                            .unwrap_or_default()
                    };
                    vec![
                        field(s, "timestamp"),
                        format!(
                            "{:.1}",
                            s.get("cpuUsedPct").and_then(Value::as_f64).unwrap_or(0.0)
                        ),
                        mib("memUsed"),
                        mib("memTotal"),
                    ]
                })
                .collect();
            crate::table::print(&["TIME", "CPU %", "MEM MiB", "MEM TOTAL MiB"], &rows);
            Ok(0)
        }
    }
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The shell command line for `exec`: a single argument as it is, several
/// quoted word by word so that each reaches the program unchanged.
fn command_line(command: &[String]) -> String {
    if let [line] = command {
        return line.clone();
    }
    command
        .iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod exec_tests {
    use super::command_line;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_argument_is_a_shell_line_several_are_argv() {
        assert_eq!(command_line(&words(&["ls | wc -l"])), "ls | wc -l");
        assert_eq!(
            command_line(&words(&["python3", "-c", "print(6*7)"])),
            "python3 -c 'print(6*7)'"
        );
        assert_eq!(
            command_line(&words(&["echo", "it's", ""])),
            "echo 'it'\\''s' ''"
        );
    }
}
