//! `kiln template`.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::{Api, ApiArgs};

#[derive(Args, Debug)]
pub struct TemplateArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Subcommand, Debug)]
enum TemplateCommand {
    /// Templates of your team and the public ones.
    #[command(alias = "ls")]
    List,
    /// Delete a template that no sandbox uses.
    #[command(alias = "dl")]
    Delete { template: String },
}

pub async fn run(args: TemplateArgs) -> Result<()> {
    let api = Api::new(&args.api)?;
    match args.command {
        TemplateCommand::List => {
            let list = api.get("/templates").await?;
            if args.api.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let s = |v: &Value, k: &str| {
                v.get(k)
                    .map(|x| match x {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default()
            };
            let rows: Vec<Vec<String>> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let aliases = t.get("aliases").and_then(Value::as_array).map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                    vec![
                        s(t, "templateID"),
                        aliases.unwrap_or_default(),
                        s(t, "cpuCount"),
                        s(t, "memoryMB"),
                        s(t, "buildStatus"),
                        s(t, "public"),
                        s(t, "createdAt"),
                    ]
                })
                .collect();
            crate::table::print(
                &[
                    "ID",
                    "NAMES",
                    "CPU",
                    "MEMORY MB",
                    "STATUS",
                    "PUBLIC",
                    "CREATED",
                ],
                &rows,
            );
        }
        TemplateCommand::Delete { template } => {
            api.delete(&format!("/templates/{template}")).await?;
            eprintln!("deleted template {template}");
        }
    }
    Ok(())
}
