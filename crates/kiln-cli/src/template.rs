//! `kiln template`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kiln_templates::{Step, StepKind};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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
    /// Build a template from a Dockerfile on the server (the files it copies are uploaded).
    #[command(alias = "bd")]
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Directory with the Dockerfile and the files it copies (the build context).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Template name (`name` or `name:tag`); sandboxes are created from it by this name.
    #[arg(long, short = 'n')]
    name: String,
    /// Dockerfile (default: DIR/e2b.Dockerfile, else DIR/Dockerfile).
    #[arg(long = "file", short = 'f')]
    dockerfile: Option<PathBuf>,
    /// vCPUs of the template's sandboxes.
    #[arg(long)]
    cpu: Option<u32>,
    /// Memory of the template's sandboxes in MB.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Command started in every sandbox (default: the Dockerfile's CMD/ENTRYPOINT).
    #[arg(long, short = 'c')]
    start_cmd: Option<String>,
    /// Command that exits 0 once the start command is ready (the snapshot waits for it).
    #[arg(long)]
    ready_cmd: Option<String>,
    /// Run every step again, ignoring cached layers.
    #[arg(long)]
    no_cache: bool,
    /// Value of a Dockerfile ARG (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
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
        TemplateCommand::Build(b) => build(&api, b, args.api.json).await?,
    }
    Ok(())
}

/// A COPY/ADD step's sources: uploaded as a tar under their hash.
#[derive(Debug, Clone, PartialEq)]
struct Upload {
    hash: String,
    context: PathBuf,
    src: String,
}

/// Builder steps → the steps E2B's SDKs send, plus the uploads COPY needs.
fn wire_steps(steps: &[Step]) -> Result<(Vec<Value>, Vec<Upload>)> {
    let mut out = Vec::with_capacity(steps.len());
    let mut uploads = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let mut v = match &step.kind {
            StepKind::Run { cmd, user } => {
                let mut args = vec![cmd.clone()];
                args.extend(user.clone());
                json!({"type": "RUN", "args": args})
            }
            StepKind::Copy {
                context,
                src,
                dest,
                user,
                mode,
            }
            | StepKind::Add {
                context,
                src,
                dest,
                user,
                mode,
            } => {
                let kind = if matches!(step.kind, StepKind::Copy { .. }) {
                    "COPY"
                } else {
                    "ADD"
                };
                let hash = files_hash(kind, context, src, dest)
                    .with_context(|| format!("step {} ({kind} {src} {dest})", i + 1))?;
                if !uploads.iter().any(|u: &Upload| u.hash == hash) {
                    uploads.push(Upload {
                        hash: hash.clone(),
                        context: context.clone(),
                        src: src.clone(),
                    });
                }
                let mode = mode.map(|m| format!("{m:04o}")).unwrap_or_default();
                json!({"type": kind, "args": [src, dest, user.clone().unwrap_or_default(), mode],
                       "filesHash": hash})
            }
            StepKind::Env(pairs) => {
                let args: Vec<&String> = pairs.iter().flat_map(|(k, v)| [k, v]).collect();
                json!({"type": "ENV", "args": args})
            }
            StepKind::Workdir(dir) => json!({"type": "WORKDIR", "args": [dir]}),
            StepKind::User { name, sudo: false } => json!({"type": "USER", "args": [name]}),
            StepKind::User { name, sudo: true } => {
                json!({"type": "USER", "args": [name, "true"]})
            }
        };
        v["force"] = json!(step.force);
        out.push(v);
    }
    Ok((out, uploads))
}

/// The content key of a COPY step: its text and every file it copies
/// (paths, modes, sizes, contents, link targets).
fn files_hash(kind: &str, context: &Path, src: &str, dest: &str) -> Result<String> {
    let sources = kiln_templates::context::collect(context, src).map_err(anyhow::Error::msg)?;
    let mut h = Sha256::new();
    h.update(format!("{kind} {src} {dest}\0").as_bytes());
    h.update(sources.hash().map_err(anyhow::Error::msg)?.as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// A gzipped tar of what `src` names in `context`, paths relative to the context.
fn tar_sources(context: &Path, src: &str) -> Result<std::fs::File> {
    let root = context
        .canonicalize()
        .with_context(|| format!("build context {}", context.display()))?;
    let sources = kiln_templates::context::collect(context, src).map_err(anyhow::Error::msg)?;
    let file = tempfile::tempfile().context("creating a temporary file")?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    for entry in &sources.entries {
        let Ok(rel) = entry.source.strip_prefix(&root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        tar.append_path_with_name(&entry.source, rel)
            .with_context(|| format!("adding {} to the upload", entry.source.display()))?;
    }
    let mut file = tar.into_inner()?.finish()?;
    use std::io::Seek;
    file.rewind()?;
    Ok(file)
}

fn dockerfile_path(dir: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    for name in ["e2b.Dockerfile", "Dockerfile"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no e2b.Dockerfile or Dockerfile in {} (pass -f FILE)",
        dir.display()
    )
}

fn parse_build_args(list: &[String]) -> Result<HashMap<String, String>> {
    list.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--build-arg '{kv}': expected NAME=VALUE"))
        })
        .collect()
}

/// Where build output goes: a spinner with the current step above which
/// log lines scroll (on a terminal), or plain lines.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner:.cyan} [{elapsed}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    fn line(&self, text: &str) {
        let text = format!("{:>6.1}s  {text}", self.started.elapsed().as_secs_f64());
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn status(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(text.to_string());
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn build(api: &Api, args: BuildArgs, json_out: bool) -> Result<()> {
    let started = Instant::now();
    let path = dockerfile_path(&args.dir, args.dockerfile.as_deref())?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let build_args = parse_build_args(&args.build_args)?;
    let parsed = kiln_templates::parse_dockerfile(&text, &args.dir, &build_args)
        .with_context(|| format!("{}", path.display()))?;
    let (steps, uploads) = wire_steps(&parsed.steps)?;
    let progress = Progress::new();
    let quiet = json_out;
    let say = |t: &str| {
        if !quiet {
            progress.line(t)
        }
    };

    // FROM names a template of ours (or a public one) if the server knows it, else an image.
    let from_template = match api
        .get(&format!(
            "/templates/aliases/{}",
            utf8_percent_encode(&parsed.from)
        ))
        .await
    {
        Ok(_) => true,
        Err(e) => e.to_string().contains("(403)"),
    };
    let mut request = json!({"name": args.name});
    if let Some(c) = args.cpu {
        request["cpuCount"] = json!(c);
    }
    if let Some(m) = args.memory_mb {
        request["memoryMB"] = json!(m);
    }
    progress.status("requesting the build");
    let created = api.post("/v3/templates", &request).await?;
    let template_id = created["templateID"]
        .as_str()
        .context("the server sent no templateID")?
        .to_string();
    let build_id = created["buildID"]
        .as_str()
        .context("the server sent no buildID")?
        .to_string();
    say(&format!(
        "template {template_id}, build {build_id} (from {})",
        parsed.from
    ));

    let http = reqwest::Client::new();
    for up in &uploads {
        let link = api
            .get(&format!("/templates/{template_id}/files/{}", up.hash))
            .await?;
        if link["present"].as_bool() == Some(true) {
            say(&format!("files of '{}' are already on the server", up.src));
            continue;
        }
        let url = link["url"]
            .as_str()
            .context("the server sent no upload URL")?;
        progress.status(&format!("uploading '{}'", up.src));
        let file = tar_sources(&up.context, &up.src)?;
        let size = file.metadata()?.len();
        let resp = http
            .put(url)
            .header("Content-Length", size)
            .body(reqwest::Body::from(tokio::fs::File::from_std(file)))
            .send()
            .await
            .with_context(|| format!("uploading the files of '{}'", up.src))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            bail!(
                "uploading the files of '{}' failed ({status}): {body}",
                up.src
            );
        }
        say(&format!("uploaded '{}' ({size} bytes)", up.src));
    }

    let mut start = json!({"force": args.no_cache, "steps": steps});
    if from_template {
        start["fromTemplate"] = json!(parsed.from);
    } else {
        start["fromImage"] = json!(parsed.from);
    }
    if let Some(c) = args.start_cmd.or(parsed.start_cmd) {
        start["startCmd"] = json!(c);
    }
    if let Some(c) = args.ready_cmd.or(parsed.ready_cmd) {
        start["readyCmd"] = json!(c);
    }
    api.post(
        &format!("/v2/templates/{template_id}/builds/{build_id}"),
        &start,
    )
    .await?;

    let mut offset = 0usize;
    let mut current = "waiting for the build to start".to_string();
    loop {
        progress.status(&current);
        let st = api
            .get(&format!(
                "/templates/{template_id}/builds/{build_id}/status?logsOffset={offset}&limit=100"
            ))
            .await?;
        let entries = st["logEntries"].as_array().cloned().unwrap_or_default();
        offset += entries.len();
        for e in &entries {
            let msg = e["message"].as_str().unwrap_or_default();
            if e["level"] == "error" {
                // The reason is printed once, at the end.
                continue;
            }
            say(msg);
            // The spinner names the step running now: its "[i/n] RUN ..." line, or the phase.
            if msg.starts_with('[') && msg.contains("] ") {
                current = msg.to_string();
            } else if let Some(step) = e["step"].as_str().filter(|s| s.parse::<usize>().is_err()) {
                current = step.to_string();
            }
            progress.status(&current);
        }
        let status = st["status"].as_str().unwrap_or("building");
        if status == "building" && offset == 0 {
            current = "starting the build".into();
        }
        if matches!(status, "ready" | "error") && entries.is_empty() {
            progress.finish();
            let took = started.elapsed();
            if status == "error" {
                let reason = st["reason"]["message"].as_str().unwrap_or("build failed");
                bail!("the build of '{}' failed: {reason}", args.name);
            }
            if json_out {
                let info = json!({"templateID": template_id, "buildID": build_id,
                                  "name": args.name, "status": status,
                                  "tookMs": took.as_millis() as u64});
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "template '{}' built in {:.1} s (id {template_id}); create sandboxes from it by name",
                    args.name,
                    took.as_secs_f64()
                );
            }
            return Ok(());
        }
        if entries.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Percent-encodes a path segment (a FROM reference may hold '/' and ':').
fn utf8_percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_becomes_sdk_steps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.py"), "print('hi')\n").unwrap();
        std::fs::create_dir(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/a.ini"), "a=1\n").unwrap();
        let text = "FROM python:3.12\n\
                    ARG V=1\n\
                    RUN pip install flask\n\
                    COPY --chown=user --chmod=755 app.py /app/\n\
                    COPY conf /etc/conf\n\
                    ENV A=1 B=\"x y\"\n\
                    WORKDIR /app\n\
                    USER user\n\
                    CMD [\"python\", \"app.py\"]\n";
        let parsed = kiln_templates::parse_dockerfile(text, dir.path(), &HashMap::new()).unwrap();
        assert_eq!(parsed.from, "python:3.12");
        let (steps, uploads) = wire_steps(&parsed.steps).unwrap();
        let kinds: Vec<&str> = steps.iter().map(|s| s["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["ENV", "RUN", "COPY", "COPY", "ENV", "WORKDIR", "USER"]
        );
        assert_eq!(steps[0]["args"], json!(["V", "1"]));
        assert_eq!(steps[1]["args"], json!(["pip install flask"]));
        assert_eq!(steps[2]["args"], json!(["app.py", "/app/", "user", "0755"]));
        assert_eq!(steps[3]["args"], json!(["conf", "/etc/conf", "", ""]));
        assert_eq!(steps[4]["args"], json!(["A", "1", "B", "x y"]));
        assert_eq!(steps[5]["args"], json!(["/app"]));
        assert_eq!(steps[6]["args"], json!(["user"]));
        assert!(steps.iter().all(|s| s["force"] == json!(false)));
        assert_eq!(uploads.len(), 2);
        assert_eq!(steps[2]["filesHash"], json!(uploads[0].hash));
        assert_eq!(steps[3]["filesHash"], json!(uploads[1].hash));
        assert_eq!(uploads[0].hash.len(), 64);

        // The hash follows the content.
        let before = uploads[0].hash.clone();
        std::fs::write(dir.path().join("app.py"), "print('changed')\n").unwrap();
        let (_, again) = wire_steps(&parsed.steps).unwrap();
        assert_ne!(again[0].hash, before);
        assert_eq!(again[1].hash, uploads[1].hash);

        // The upload holds the sources at their context-relative paths.
        let file = tar_sources(dir.path(), "conf").unwrap();
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["conf", "conf/a.ini"]);
    }

    #[test]
    fn a_missing_copy_source_names_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let parsed = kiln_templates::parse_dockerfile(
            "FROM base\nCOPY nothing.txt /x\n",
            dir.path(),
            &HashMap::new(),
        )
        .unwrap();
        let err = format!("{:#}", wire_steps(&parsed.steps).unwrap_err());
        assert!(err.contains("step 1 (COPY nothing.txt /x)"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn build_args_and_dockerfile_lookup() {
        let args = parse_build_args(&["A=1".into(), "B=x=y".into()]).unwrap();
        assert_eq!(args["B"], "x=y");
        assert!(parse_build_args(&["nope".into()]).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(dockerfile_path(dir.path(), None).is_err());
        std::fs::write(dir.path().join("Dockerfile"), "FROM base\n").unwrap();
        assert_eq!(
            dockerfile_path(dir.path(), None).unwrap(),
            dir.path().join("Dockerfile")
        );
        std::fs::write(dir.path().join("e2b.Dockerfile"), "FROM base\n").unwrap();
        assert_eq!(
            dockerfile_path(dir.path(), None).unwrap(),
            dir.path().join("e2b.Dockerfile")
        );
    }
}
