//! Dockerfile → base reference + build steps, the way E2B's CLI maps one:
//! FROM is the base, RUN/COPY/ADD/ENV/ARG/WORKDIR/USER become steps,
//! CMD/ENTRYPOINT the start command. One stage only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::vars::{expand, shell_quote};
use crate::{Step, StepKind};

/// A parsed Dockerfile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedDockerfile {
    /// The FROM reference (an image or a template name; the caller resolves it).
    pub from: String,
    pub steps: Vec<Step>,
    /// From ENTRYPOINT/CMD.
    pub start_cmd: Option<String>,
    /// A Dockerfile has no ready command; the caller may set one.
    pub ready_cmd: Option<String>,
    /// LABELs, in order.
    pub labels: Vec<(String, String)>,
    /// Instructions that were read and ignored (line, instruction), e.g. EXPOSE.
    pub ignored: Vec<(usize, String)>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DockerfileError {
    #[error("Dockerfile line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("Dockerfile line {line}: unknown instruction '{instruction}'")]
    UnknownInstruction { line: usize, instruction: String },
    #[error("Dockerfile line {line}: {what} is not supported")]
    Unsupported { line: usize, what: String },
    #[error("the Dockerfile has no FROM instruction")]
    NoFrom,
}

enum Form {
    Exec(Vec<String>),
    Shell(String),
}

impl Form {
    fn parse(args: &str) -> Form {
        if args.starts_with('[')
            && let Ok(list) = serde_json::from_str::<Vec<String>>(args)
        {
            return Form::Exec(list);
        }
        Form::Shell(args.to_string())
    }
}

fn getter(vars: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    |name: &str| vars.get(name).cloned()
}

fn join_exec(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `text`; COPY/ADD sources are relative to `context`; `build_args`
/// override ARG defaults.
pub fn parse_dockerfile(
    text: &str,
    context: &Path,
    build_args: &HashMap<String, String>,
) -> Result<ParsedDockerfile, DockerfileError> {
    let mut out = ParsedDockerfile::default();
    let mut from: Option<String> = None;
    // ARGs declared before FROM (only FROM and redeclared ARGs see them).
    let mut global_args: HashMap<String, String> = HashMap::new();
    // Variables visible to later instructions: ARG values and ENV values.
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut entrypoint: Option<Form> = None;
    let mut cmd: Option<Form> = None;

    for (line, instruction, args) in logical_lines(text) {
        let syntax = |message: &str| DockerfileError::Syntax {
            line,
            message: message.to_string(),
        };
        let unsupported = |what: &str| DockerfileError::Unsupported {
            line,
            what: what.to_string(),
        };
        let upper = instruction.to_ascii_uppercase();
        if from.is_none() && upper != "FROM" && upper != "ARG" {
            return Err(syntax(&format!("{upper} before FROM")));
        }
        match upper.as_str() {
            "FROM" => {
                if from.is_some() {
                    return Err(unsupported(
                        "a second FROM (multi-stage builds; build each stage as its own template)",
                    ));
                }
                let glob_lookup = |name: &str| global_args.get(name).cloned();
                let words: Vec<&str> = args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--platform="))
                    .collect();
                let image = match words.as_slice() {
                    [image] => image,
                    [image, kw, _name] if kw.eq_ignore_ascii_case("as") => image,
                    _ => return Err(syntax("expected FROM <image> [AS <name>]")),
                };
                let image = expand(image, &glob_lookup);
                if image.is_empty() {
                    return Err(syntax("FROM names no image"));
                }
                from = Some(image);
            }
            "ARG" => {
                for word in tokenize(&args).map_err(|m| syntax(&m))? {
                    let (name, default) = match word.split_once('=') {
                        Some((n, d)) => (n.to_string(), Some(d.to_string())),
                        None => (word.clone(), None),
                    };
                    if name.is_empty() {
                        return Err(syntax("ARG needs a name"));
                    }
                    let value = match build_args.get(&name) {
                        Some(v) => Some(v.clone()),
                        None if from.is_none() => {
                            default.map(|d| expand(&d, &|n: &str| global_args.get(n).cloned()))
                        }
                        None => default
                            .map(|d| expand(&d, &getter(&vars)))
                            .or_else(|| global_args.get(&name).cloned()),
                    };
                    let Some(value) = value else { continue };
                    if from.is_none() {
                        global_args.insert(name, value);
                    } else {
                        // As E2B's CLI does: an ARG with a value becomes an ENV.
                        out.steps.push(Step::new(StepKind::Env(vec![(
                            name.clone(),
                            value.replace('$', r"\$"),
                        )])));
                        vars.insert(name, value);
                    }
                }
            }
            "RUN" => {
                if args.starts_with("--") {
                    let flag = args.split_whitespace().next().unwrap_or_default();
                    return Err(unsupported(&format!("RUN {flag}")));
                }
                if args.contains("<<") && args.trim_start().starts_with("<<") {
                    return Err(unsupported("a RUN heredoc"));
                }
                let cmd = match Form::parse(&args) {
                    Form::Exec(list) if list.is_empty() => {
                        return Err(syntax("RUN with an empty command"));
                    }
                    Form::Exec(list) => join_exec(&list),
                    Form::Shell(s) if s.trim().is_empty() => {
                        return Err(syntax("RUN with an empty command"));
                    }
                    Form::Shell(s) => s,
                };
                out.steps.push(Step::new(StepKind::Run { cmd, user: None }));
            }
            "COPY" | "ADD" => {
                let mut rest = args.as_str();
                let mut user = None;
                let mut mode = None;
                while let Some(stripped) = rest.strip_prefix("--") {
                    let (flag, tail) = stripped
                        .split_once(char::is_whitespace)
                        .unwrap_or((stripped, ""));
                    rest = tail.trim_start();
                    let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
                    match name {
                        "chown" => {
                            let v = expand(value, &getter(&vars));
                            if v.is_empty() {
                                return Err(syntax("--chown needs a user"));
                            }
                            user = Some(v);
                        }
                        "chmod" => {
                            let m = u32::from_str_radix(value, 8)
                                .ok()
                                .filter(|m| *m <= 0o7777)
                                .ok_or_else(|| {
                                    syntax(&format!("--chmod={value} is not an octal mode"))
                                })?;
                            mode = Some(m);
                        }
                        "link" => {}
                        "from" => {
                            return Err(unsupported(&format!(
                                "{upper} --from (multi-stage builds)"
                            )));
                        }
                        other => return Err(unsupported(&format!("{upper} --{other}"))),
                    }
                }
                let words: Vec<String> = match Form::parse(rest) {
                    Form::Exec(list) => list,
                    Form::Shell(s) => s.split_whitespace().map(str::to_string).collect(),
                };
                let words: Vec<String> = words.iter().map(|w| expand(w, &getter(&vars))).collect();
                if words.len() < 2 {
                    return Err(syntax(&format!("{upper} needs a source and a destination")));
                }
                let (dest, sources) = words.split_last().expect("checked above");
                // Several sources go into a directory.
                let dest = if sources.len() > 1 && !dest.ends_with('/') {
                    format!("{dest}/")
                } else {
                    dest.clone()
                };
                for src in sources {
                    if upper == "ADD"
                        && ["http://", "https://", "git@", "git://"]
                            .iter()
                            .any(|p| src.starts_with(p))
                    {
                        return Err(unsupported("ADD from a URL (use RUN curl)"));
                    }
                    let context = PathBuf::from(context);
                    let (src, dest) = (src.clone(), dest.clone());
                    let (user, mode) = (user.clone(), mode);
                    out.steps.push(Step::new(if upper == "ADD" {
                        StepKind::Add {
                            context,
                            src,
                            dest,
                            user,
                            mode,
                        }
                    } else {
                        StepKind::Copy {
                            context,
                            src,
                            dest,
                            user,
                            mode,
                        }
                    }));
                }
            }
            "ENV" => {
                let pairs = parse_pairs(&args).map_err(|m| syntax(&m))?;
                if pairs.is_empty() {
                    return Err(syntax("ENV needs NAME=value"));
                }
                for (name, value) in &pairs {
                    let v = expand(value, &|n: &str| vars.get(n).cloned());
                    vars.insert(name.clone(), v);
                }
                out.steps.push(Step::new(StepKind::Env(pairs)));
            }
            "LABEL" => {
                let pairs = parse_pairs(&args).map_err(|m| syntax(&m))?;
                for (k, v) in pairs {
                    out.labels.push((k, expand(&v, &getter(&vars))));
                }
            }
            "WORKDIR" => {
                let dir = expand(args.trim(), &getter(&vars));
                if dir.is_empty() {
                    return Err(syntax("WORKDIR needs a path"));
                }
                out.steps.push(Step::new(StepKind::Workdir(dir)));
            }
            "USER" => {
                let spec = expand(args.trim(), &getter(&vars));
                // A group (`user:group`) is not tracked: processes get the user's groups.
                let name = spec.split(':').next().unwrap_or_default().to_string();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(syntax("USER needs one user name"));
                }
                out.steps
                    .push(Step::new(StepKind::User { name, sudo: false }));
            }
            "CMD" => cmd = Some(Form::parse(&args)),
            "ENTRYPOINT" => entrypoint = Some(Form::parse(&args)),
            "EXPOSE" | "VOLUME" | "STOPSIGNAL" | "HEALTHCHECK" | "MAINTAINER" => {
                out.ignored.push((line, upper.clone()));
            }
            "SHELL" | "ONBUILD" => return Err(unsupported(&upper)),
            _ => {
                return Err(DockerfileError::UnknownInstruction {
                    line,
                    instruction: instruction.clone(),
                });
            }
        }
    }
    out.from = from.ok_or(DockerfileError::NoFrom)?;
    out.start_cmd = match (entrypoint, cmd) {
        (Some(Form::Exec(e)), Some(Form::Exec(c))) => {
            Some(join_exec(&[e, c].concat())).filter(|s| !s.is_empty())
        }
        (Some(Form::Exec(e)), Some(Form::Shell(c))) => Some(join_exec(
            &[e, vec!["/bin/sh".into(), "-c".into(), c]].concat(),
        )),
        (Some(Form::Exec(e)), None) => Some(join_exec(&e)).filter(|s| !s.is_empty()),
        (Some(Form::Shell(e)), _) => Some(e).filter(|s| !s.trim().is_empty()),
        (None, Some(Form::Exec(c))) => Some(join_exec(&c)).filter(|s| !s.is_empty()),
        (None, Some(Form::Shell(c))) => Some(c).filter(|s| !s.trim().is_empty()),
        (None, None) => None,
    };
    Ok(out)
}

/// The Dockerfile's instructions: (first line number, instruction, arguments),
/// with continuations joined and comments dropped.
fn logical_lines(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        // Comment lines (and parser directives) are dropped, also inside a continuation.
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_some()) {
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let line = raw.trim_end();
        let (body, continues) = match line.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (line, false),
        };
        let entry = current.get_or_insert_with(|| (i + 1, String::new()));
        entry.1.push_str(body);
        if !continues {
            let (n, text) = current.take().expect("just set");
            out.push(split_instruction(n, &text));
        }
    }
    if let Some((n, text)) = current {
        out.push(split_instruction(n, &text));
    }
    out
}

fn split_instruction(line: usize, text: &str) -> (usize, String, String) {
    let text = text.trim();
    match text.split_once(char::is_whitespace) {
        Some((inst, args)) => (line, inst.to_string(), args.trim().to_string()),
        None => (line, text.to_string(), String::new()),
    }
}

/// Splits on unquoted whitespace, removing quotes. A `$` that must stay
/// literal (single quotes, `\$`) comes out as `\$`, for [`expand`].
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), '$') => word.push_str(r"\$"),
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    Some('$') => word.push_str(r"\$"),
                    Some(n) if quote.is_none() || n == '"' || n == '\\' => word.push(n),
                    Some(n) => {
                        word.push('\\');
                        word.push(n);
                    }
                    None => word.push('\\'),
                }
            }
            (_, c) => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `A=1 B="x y"` pairs, or the legacy `NAME value with spaces` form.
fn parse_pairs(args: &str) -> Result<Vec<(String, String)>, String> {
    let words = tokenize(args)?;
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let (name, value) = args
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("'{}' needs a value", args.trim()))?;
        return Ok(vec![(name.to_string(), value.trim().to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("expected NAME=value, got '{w}'")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ParsedDockerfile, DockerfileError> {
        parse_dockerfile(text, Path::new("/ctx"), &HashMap::new())
    }

    fn run(cmd: &str) -> Step {
        Step::new(StepKind::Run {
            cmd: cmd.into(),
            user: None,
        })
    }

    fn copy(src: &str, dest: &str, user: Option<&str>, mode: Option<u32>) -> Step {
        Step::new(StepKind::Copy {
            context: "/ctx".into(),
            src: src.into(),
            dest: dest.into(),
            user: user.map(Into::into),
            mode,
        })
    }

    #[test]
    fn every_instruction() {
        let text = r#"
# syntax=docker/dockerfile:1
ARG BASE=python:3.12
FROM ${BASE} AS build
ARG VERSION=1.0
LABEL org.example.name="demo app" version=$VERSION
ENV APP_HOME=/app \
    GREETING="hello world"
ENV LEGACY value with spaces
WORKDIR $APP_HOME
# a comment between instructions
RUN apt-get update && \
    # comment inside a continuation
    apt-get install -y curl
RUN ["echo", "it's", "$HOME"]
COPY --chown=user:user --chmod=755 a.sh b/ ${APP_HOME}/bin
copy ["with space.txt", "/dest/"]
ADD --link archive.tar.gz /opt/
USER user
EXPOSE 8000
ENTRYPOINT ["python3", "-m"]
CMD ["http.server", "8000"]
"#;
        let p = parse(text).unwrap();
        assert_eq!(p.from, "python:3.12");
        assert_eq!(
            p.labels,
            vec![
                ("org.example.name".into(), "demo app".into()),
                ("version".into(), "1.0".into())
            ]
        );
        assert_eq!(p.ignored, vec![(20, "EXPOSE".into())]);
        assert_eq!(
            p.steps,
            vec![
                Step::new(StepKind::Env(vec![("VERSION".into(), "1.0".into())])),
                Step::new(StepKind::Env(vec![
                    ("APP_HOME".into(), "/app".into()),
                    ("GREETING".into(), "hello world".into())
                ])),
                Step::new(StepKind::Env(vec![(
                    "LEGACY".into(),
                    "value with spaces".into()
                )])),
                Step::new(StepKind::Workdir("/app".into())),
                run("apt-get update &&     apt-get install -y curl"),
                run(r#"echo 'it'\''s' '$HOME'"#),
                copy("a.sh", "/app/bin/", Some("user:user"), Some(0o755)),
                copy("b/", "/app/bin/", Some("user:user"), Some(0o755)),
                copy("with space.txt", "/dest/", None, None),
                Step::new(StepKind::Add {
                    context: "/ctx".into(),
                    src: "archive.tar.gz".into(),
                    dest: "/opt/".into(),
                    user: None,
                    mode: None
                }),
                Step::new(StepKind::User {
                    name: "user".into(),
                    sudo: false
                }),
            ]
        );
        assert_eq!(p.start_cmd.as_deref(), Some("python3 -m http.server 8000"));
        assert_eq!(p.ready_cmd, None);
    }

    #[test]
    fn build_args_override_defaults() {
        let text = "ARG TAG=3.11\nFROM python:$TAG\nARG TAG\nARG MODE=dev\nRUN echo $MODE\n";
        let args = HashMap::from([("MODE".to_string(), "prod".to_string())]);
        let p = parse_dockerfile(text, Path::new("/ctx"), &args).unwrap();
        assert_eq!(p.from, "python:3.11");
        assert_eq!(
            p.steps[..2],
            [
                Step::new(StepKind::Env(vec![("TAG".into(), "3.11".into())])),
                Step::new(StepKind::Env(vec![("MODE".into(), "prod".into())])),
            ]
        );
        // RUN is left to the shell.
        assert_eq!(p.steps[2], run("echo $MODE"));
    }

    #[test]
    fn env_quoting_keeps_literal_dollars_for_the_builder() {
        let p = parse("FROM x\nENV A='$HOME' B=\"$HOME/x\" C=\\$D\n").unwrap();
        assert_eq!(
            p.steps,
            vec![Step::new(StepKind::Env(vec![
                ("A".into(), r"\$HOME".into()),
                ("B".into(), "$HOME/x".into()),
                ("C".into(), r"\$D".into()),
            ]))]
        );
    }

    #[test]
    fn start_command_forms() {
        let p = parse("FROM x\nCMD python3 app.py --port 80\n").unwrap();
        assert_eq!(p.start_cmd.as_deref(), Some("python3 app.py --port 80"));
        let p = parse("FROM x\nENTRYPOINT [\"/entry.sh\"]\nCMD run fast\n").unwrap();
        assert_eq!(
            p.start_cmd.as_deref(),
            Some("/entry.sh /bin/sh -c 'run fast'")
        );
        let p = parse("FROM x\nCMD [\"echo\", \"a b\"]\nENTRYPOINT node server.js\n").unwrap();
        assert_eq!(p.start_cmd.as_deref(), Some("node server.js"));
        assert_eq!(parse("FROM x\n").unwrap().start_cmd, None);
    }

    #[test]
    fn errors_name_their_line() {
        let e = parse("FROM x\n\nRUN true\nFOO bar\n").unwrap_err();
        assert_eq!(
            e,
            DockerfileError::UnknownInstruction {
                line: 4,
                instruction: "FOO".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "Dockerfile line 4: unknown instruction 'FOO'"
        );
        let e = parse("FROM a AS one\nRUN true\nFROM b\n").unwrap_err();
        assert!(
            matches!(&e, DockerfileError::Unsupported { line: 3, what } if what.contains("multi-stage")),
            "{e}"
        );
        let e = parse("FROM a\nCOPY --from=build /x /y\n").unwrap_err();
        assert!(
            matches!(e, DockerfileError::Unsupported { line: 2, .. }),
            "{e}"
        );
        let e = parse("FROM a\nRUN echo \\\n  continued\nCOPY onlyone\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Syntax { line: 4, .. }), "{e}");
        let e = parse("RUN true\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Syntax { line: 1, .. }), "{e}");
        assert_eq!(parse("# nothing\n").unwrap_err(), DockerfileError::NoFrom);
        let e = parse("FROM a\nCOPY --chmod=9z a b\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Syntax { line: 2, .. }), "{e}");
        let e = parse("FROM a\nADD https://example.com/x.tgz /x\n").unwrap_err();
        assert!(
            matches!(e, DockerfileError::Unsupported { line: 2, .. }),
            "{e}"
        );
        let e = parse("FROM a\nENV A=\"unterminated\n").unwrap_err();
        assert!(matches!(e, DockerfileError::Syntax { line: 2, .. }), "{e}");
        let e = parse("FROM a\nSHELL [\"/bin/zsh\"]\n").unwrap_err();
        assert!(
            matches!(e, DockerfileError::Unsupported { line: 2, .. }),
            "{e}"
        );
        let e = parse("FROM a\nRUN --mount=type=cache,target=/x true\n").unwrap_err();
        assert!(
            matches!(e, DockerfileError::Unsupported { line: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn instructions_are_case_insensitive_and_user_drops_group() {
        let p = parse("from a\nuser app:staff\nworkdir rel/dir\n").unwrap();
        assert_eq!(
            p.steps,
            vec![
                Step::new(StepKind::User {
                    name: "app".into(),
                    sudo: false
                }),
                Step::new(StepKind::Workdir("rel/dir".into())),
            ]
        );
    }
}
