//! `kiln keys`: API keys and teams, on this machine's database (an admin
//! command: it needs the server's data dir or database URL, not a key).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kiln_api::db::Db;

#[derive(Args, Debug)]
pub struct KeysArgs {
    /// The server's data dir (its SQLite database).
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/kiln",
        env = "KILN_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// PostgreSQL instead of the data dir's SQLite.
    #[arg(long, global = true, env = "KILN_DATABASE_URL")]
    database_url: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key (and its team, if new); prints the key once.
    Create {
        /// Team the key belongs to.
        #[arg(long, default_value = kiln_api::server::DEFAULT_TEAM)]
        team: String,
        /// A name for the key.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Sandboxes the team may run at once (sets the team's limit).
        #[arg(long)]
        concurrency: Option<i64>,
        /// Longest sandbox lifetime of the team, in seconds (sets the team's limit).
        #[arg(long)]
        max_lifetime: Option<i64>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Delete a key by id.
    Delete { id: String },
}

pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("kiln.db").display()));
    if args.database_url.is_none() && !args.data_dir.join("kiln.db").exists() {
        bail!(
            "no database at {}: start `kiln serve` once first (or pass --data-dir)",
            args.data_dir.join("kiln.db").display()
        );
    }
    let db = Db::connect(&url).await.context("opening the database")?;
    match args.command {
        KeysCommand::Create {
            team,
            name,
            concurrency,
            max_lifetime,
        } => {
            let t = match db.team_by_name(&team).await? {
                Some(t) => t,
                None => {
                    db.create_team(
                        &team,
                        concurrency.unwrap_or(100),
                        max_lifetime.unwrap_or(86_400),
                    )
                    .await?
                }
            };
            if concurrency.is_some() || max_lifetime.is_some() {
                db.set_team_limits(
                    &t.id,
                    concurrency.unwrap_or(t.max_concurrent),
                    max_lifetime.unwrap_or(t.max_lifetime_s),
                )
                .await?;
            }
            let (id, key) = kiln_api::auth::create_key(&db, &t, &name).await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "team": team, "key": key})
                );
            } else {
                println!("{key}");
                eprintln!("key {id} for team '{team}' (shown only now)");
            }
        }
        KeysCommand::List => {
            let keys = db.list_keys(None).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.team.clone(),
                            k.name.clone(),
                            k.mask.clone(),
                            kiln_api::util::rfc3339(k.created_at),
                            k.last_used
                                .map(kiln_api::util::rfc3339)
                                .unwrap_or_else(|| "never".into()),
                        ]
                    })
                    .collect();
                crate::table::print(
                    &["ID", "TEAM", "NAME", "KEY", "CREATED", "LAST USED"],
                    &rows,
                );
            }
        }
        KeysCommand::Delete { id } => {
            if !db.delete_key(&id, None).await? {
                bail!("no key with id {id}");
            }
            eprintln!("deleted key {id}");
        }
    }
    Ok(())
}
