//! `process.Process` against the real envd binary.

// common/mod.rs is shared and not ours to change; it trips this lint.
mod common;

use std::time::Duration;

use base64::Engine;
use common::{Envd, Frame, Frames, basic, envelope};
use serde_json::{Value, json};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Guard against hangs only; never an assertion about speed.
const GUARD: Duration = Duration::from_secs(30);

/// (home, uid) of a user from /etc/passwd.
fn passwd(name: &str) -> (String, u32) {
    let text = std::fs::read_to_string("/etc/passwd").unwrap();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 7 && f[0] == name {
            return (f[5].to_string(), f[2].parse().unwrap());
        }
    }
    panic!("user {name} missing from /etc/passwd (the tests need it)");
}

fn bash(script: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false})
}

/// Everything a finished process stream carried.
#[derive(Debug, Default)]
struct Run {
    pid: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    /// Order in which stdout/stderr/pty chunks arrived.
    data_frames: Vec<(String, usize)>,
    keepalives: usize,
    end: Option<Value>,
    /// The end-stream frame's `error`, if any.
    error: Option<Value>,
}

impl Run {
    fn exit_code(&self) -> i64 {
        let end = self.end.as_ref().expect("an end event");
        end["exitCode"].as_i64().unwrap_or(0)
    }
    fn status(&self) -> &str {
        self.end.as_ref().expect("an end event")["status"]
            .as_str()
            .unwrap_or("")
    }
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn decode(b64: &Value) -> Vec<u8> {
    B64.decode(b64.as_str().unwrap_or("")).expect("base64 data")
}

/// Checks the protocol shape (start first, end last, end-stream closes) and
/// collects a stream's frames.
fn summarize(frames: &[Frame]) -> Run {
    let mut run = Run::default();
    let last = frames.last().expect("at least the end-stream frame");
    assert!(
        last.end,
        "stream must close with an end-stream frame: {frames:?}"
    );
    run.error = last.json.get("error").cloned();
    let events: Vec<&Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| &f.json["event"])
        .collect();
    if run.error.is_none() {
        assert!(!events.is_empty(), "no events: {frames:?}");
    }
    for (i, ev) in events.iter().enumerate() {
        let obj = ev.as_object().expect("event object");
        assert_eq!(obj.len(), 1, "one oneof member per event: {ev}");
        if i == 0 {
            run.pid = ev["start"]["pid"].as_u64().expect("first event is start");
            assert!(run.pid > 0);
            continue;
        }
        assert!(ev.get("start").is_none(), "start only once");
        assert!(run.end.is_none(), "nothing after end: {ev}");
        if let Some(data) = ev.get("data") {
            for (key, buf) in [
                ("stdout", &mut run.stdout),
                ("stderr", &mut run.stderr),
                ("pty", &mut run.pty),
            ] {
                if let Some(v) = data.get(key) {
                    let bytes = decode(v);
                    run.data_frames.push((key.to_string(), bytes.len()));
                    buf.extend_from_slice(&bytes);
                }
            }
        } else if ev.get("keepalive").is_some() {
            run.keepalives += 1;
        } else if let Some(end) = ev.get("end") {
            run.end = Some(end.clone());
        } else {
            panic!("unexpected event {ev}");
        }
    }
    run
}

async fn collect(frames: Frames) -> Vec<Frame> {
    tokio::time::timeout(GUARD, frames.collect())
        .await
        .expect("stream did not finish")
}

async fn run(envd: &Envd, body: Value, headers: &[(&str, &str)]) -> Run {
    let frames = envd.stream("process.Process/Start", body, headers).await;
    let run = summarize(&collect(frames).await);
    assert!(
        run.error.is_none(),
        "unexpected stream error {:?}",
        run.error
    );
    assert!(run.end.is_some(), "no end event");
    run
}

async fn next(frames: &mut Frames) -> Frame {
    tokio::time::timeout(GUARD, frames.next())
        .await
        .expect("no frame in time")
        .expect("stream ended early")
}

/// Reads the first frame, which must be `start`, and returns the pid.
async fn started(frames: &mut Frames) -> u64 {
    let f = next(frames).await;
    assert!(!f.end, "stream ended instead of starting: {:?}", f.json);
    f.json["event"]["start"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("first event must be start: {}", f.json))
}

/// Reads frames until the concatenated data of `key` contains `needle`.
async fn read_until(frames: &mut Frames, key: &str, needle: &str) -> String {
    let mut seen = Vec::new();
    loop {
        let f = next(frames).await;
        assert!(
            !f.end,
            "stream ended before {needle:?}; saw {:?}",
            String::from_utf8_lossy(&seen)
        );
        if let Some(v) = f.json["event"]["data"].get(key) {
            seen.extend_from_slice(&decode(v));
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains(needle) {
                return text;
            }
        }
        assert!(
            f.json["event"].get("end").is_none(),
            "process ended before {needle:?}"
        );
    }
}

/// Collects the rest of a stream whose `start` frame was already read.
async fn finish(pid: u64, frames: Frames) -> Run {
    let mut all = vec![Frame {
        end: false,
        json: json!({"event": {"start": {"pid": pid}}}),
    }];
    all.extend(collect(frames).await);
    summarize(&all)
}

fn stream_error_code(run: &Run) -> &str {
    run.error
        .as_ref()
        .and_then(|e| e["code"].as_str())
        .unwrap_or("")
}

async fn signal(envd: &Envd, pid: u64, signal: &str) -> (u16, Value) {
    envd.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": signal}),
    )
    .await
}

async fn list(envd: &Envd) -> Vec<Value> {
    let (status, body) = envd.unary("process.Process/List", json!({})).await;
    assert_eq!(status, 200, "{body}");
    body["processes"].as_array().cloned().unwrap_or_default()
}

fn pid_alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

#[tokio::test]
async fn stdout_stderr_and_exit_code() {
    let envd = Envd::start().await;
    let r = run(
        &envd,
        bash("for i in $(seq 1 300); do echo out$i; echo err$i >&2; done; exit 3"),
        &[],
    )
    .await;
    let expect = |p: &str| (1..=300).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(r.stdout_str(), expect("out"));
    assert_eq!(String::from_utf8_lossy(&r.stderr), expect("err"));
    assert_eq!(r.exit_code(), 3);
    let end = r.end.as_ref().unwrap();
    assert_eq!(end["exited"], json!(true));
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(end["error"], "exit status 3");
}

#[tokio::test]
async fn success_has_no_error() {
    let envd = Envd::start().await;
    let r = run(&envd, bash("echo hello"), &[]).await;
    assert_eq!(r.stdout, b"hello\n");
    assert_eq!(r.exit_code(), 0);
    let end = r.end.as_ref().unwrap();
    assert_eq!(end["exited"], json!(true));
    assert_eq!(end["status"], "exit status 0");
    assert!(end.get("error").is_none(), "{end}");
}

#[tokio::test]
async fn runs_as_default_user() {
    let envd = Envd::start().await;
    let (home, uid) = passwd("user");
    let r = run(
        &envd,
        bash("id -un; id -u; echo $HOME; pwd; echo $USER $LOGNAME"),
        &[],
    )
    .await;
    assert_eq!(
        r.stdout_str(),
        format!("user\n{uid}\n{home}\n{home}\nuser user\n")
    );
}

#[tokio::test]
async fn runs_as_root_with_basic_auth() {
    let envd = Envd::start().await;
    let auth = basic("root");
    let r = run(
        &envd,
        bash("id -un; echo $HOME; pwd"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.stdout_str(), "root\n/root\n/root\n");
}

#[tokio::test]
async fn supplementary_groups_are_set() {
    let envd = Envd::start().await;
    let r = run(&envd, bash("id -G"), &[]).await;
    let out = std::process::Command::new("id")
        .args(["-G", "user"])
        .output()
        .unwrap();
    let mut want: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .split_whitespace()
        .collect();
    let stdout = r.stdout_str();
    let mut got: Vec<&str> = stdout.split_whitespace().collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn unknown_user_is_unauthenticated() {
    let envd = Envd::start().await;
    let auth = basic("no-such-user-kiln");
    let frames = envd
        .stream(
            "process.Process/Start",
            bash("echo hi"),
            &[("authorization", &auth)],
        )
        .await;
    let r = summarize(&collect(frames).await);
    assert_eq!(stream_error_code(&r), "unauthenticated");
    assert_eq!(
        r.error.as_ref().unwrap()["message"],
        "invalid username: 'no-such-user-kiln'"
    );
}

#[tokio::test]
async fn request_env_and_defaults() {
    let envd = Envd::start().await;
    let body = json!({"process": {
        "cmd": "/bin/bash",
        "args": ["-c", "echo \"$FOO|$HOME|$USER|$PATH|$SHELL\""],
        "envs": {"FOO": "bar baz", "HOME": "/override"}
    }, "stdin": false});
    let r = run(&envd, body, &[]).await;
    let out = r.stdout_str();
    let parts: Vec<&str> = out.trim_end().split('|').collect();
    assert_eq!(parts[0], "bar baz");
    assert_eq!(parts[1], "/override", "request envs win over defaults");
    assert_eq!(parts[2], "user");
    assert!(
        parts[3].contains("/usr/bin") && parts[3].contains("/bin"),
        "{out}"
    );
    assert!(!parts[4].is_empty());
}

#[tokio::test]
async fn envd_environment_is_not_inherited() {
    let envd = Envd::start().await;
    // envd's test process has CARGO_* variables; children must not.
    let r = run(&envd, bash("env | grep -c '^CARGO' || true"), &[]).await;
    assert_eq!(r.stdout_str().trim(), "0");
}

#[tokio::test]
async fn cwd_relative_home_and_missing() {
    let envd = Envd::start().await;
    let (home, _) = passwd("user");
    let body = json!({"process": {"cmd": "/bin/pwd", "cwd": "/tmp"}, "stdin": false});
    assert_eq!(run(&envd, body, &[]).await.stdout_str(), "/tmp\n");
    let body = json!({"process": {"cmd": "/bin/pwd", "cwd": "~"}, "stdin": false});
    assert_eq!(
        run(&envd, body, &[]).await.stdout_str(),
        format!("{home}\n")
    );

    let body = json!({"process": {"cmd": "/bin/pwd", "cwd": "/no/such/dir"}});
    let frames = envd.stream("process.Process/Start", body, &[]).await;
    let r = summarize(&collect(frames).await);
    assert_eq!(stream_error_code(&r), "invalid_argument");
    assert_eq!(
        r.error.as_ref().unwrap()["message"],
        "cwd '/no/such/dir' does not exist"
    );
}

#[tokio::test]
async fn missing_command_is_an_error() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/no/such/binary"}, "stdin": false});
    let frames = envd.stream("process.Process/Start", body, &[]).await;
    let r = summarize(&collect(frames).await);
    assert_eq!(stream_error_code(&r), "invalid_argument", "{:?}", r.error);
    let msg = r.error.as_ref().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("No such file or directory"), "{msg}");
}

#[tokio::test]
async fn large_output_arrives_complete_in_bounded_chunks() {
    let envd = Envd::start().await;
    let r = run(
        &envd,
        bash("head -c 5000000 /dev/zero | tr '\\0' 'x'; echo -n END"),
        &[],
    )
    .await;
    assert_eq!(r.stdout.len(), 5_000_003);
    assert!(r.stdout[..5_000_000].iter().all(|b| *b == b'x'));
    assert!(r.stdout.ends_with(b"END"));
    assert!(r.data_frames.iter().all(|(_, n)| *n > 0 && *n <= 32 * 1024));
    assert_eq!(r.exit_code(), 0);
}

#[tokio::test]
async fn long_lines_are_not_split_or_limited() {
    let envd = Envd::start().await;
    let r = run(
        &envd,
        bash("head -c 200000 /dev/zero | tr '\\0' 'y'; echo"),
        &[],
    )
    .await;
    assert_eq!(r.stdout.len(), 200_001);
}

#[tokio::test]
async fn no_output_lost_when_process_exits_immediately() {
    let envd = Envd::start().await;
    let want: String = (1..=200).map(|i| format!("line-{i}\n")).collect();
    for i in 0..50 {
        let body = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "printf 'line-%s\\n' $(seq 1 200); printf tail >&2"]}, "stdin": false});
        let r = run(&envd, body, &[]).await;
        assert_eq!(r.stdout_str(), want, "run {i}");
        assert_eq!(r.stderr, b"tail", "run {i}");
    }
}

#[tokio::test]
async fn invalid_utf8_is_passed_through() {
    let envd = Envd::start().await;
    let r = run(&envd, bash("printf 'a\\xff\\xfe\\x80b\\xc3'"), &[]).await;
    assert_eq!(r.stdout, b"a\xff\xfe\x80b\xc3");
}

#[tokio::test]
async fn background_grandchild_does_not_hold_the_stream() {
    let envd = Envd::start().await;
    // The grandchild keeps stdout open but is silent: the stream must end.
    let r = run(&envd, bash("sleep 5 & echo parent"), &[]).await;
    assert_eq!(r.stdout_str(), "parent\n");
    assert_eq!(r.exit_code(), 0);
}

#[tokio::test]
async fn stdin_input_and_close() {
    let envd = Envd::start().await;
    // No "stdin" field: a stdin pipe is kept.
    let body = json!({"process": {"cmd": "/bin/cat"}});
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    for chunk in ["hello ", "world\n"] {
        let (status, body) = envd
            .unary(
                "process.Process/SendInput",
                json!({"process": {"pid": pid}, "input": {"stdin": B64.encode(chunk)}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        read_until(&mut frames, "stdout", "world").await,
        "hello world\n"
    );
    let (status, body) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rest = finish(pid, frames).await;
    assert_eq!(rest.exit_code(), 0);

    // The process is gone now: more input is not_found.
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("x")}}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn stdin_false_gives_eof_at_once() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/cat"}, "stdin": false});
    let r = run(&envd, body, &[]).await;
    assert!(r.stdout.is_empty());
    assert_eq!(r.exit_code(), 0);
    let pid = r.pid;
    // Input to a finished or stdin-less process is refused.
    let (status, _) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("x")}}),
        )
        .await;
    assert!(status >= 400);
}

#[tokio::test]
async fn stdin_disabled_on_running_process_is_refused() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": false});
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("x")}}),
        )
        .await;
    assert_eq!(body["code"], "failed_precondition", "{status} {body}");
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": B64.encode("x")}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 10, "rows": 10}}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    assert_eq!(signal(&envd, pid, "SIGNAL_SIGKILL").await.0, 200);
    collect(frames).await;
}

#[tokio::test]
async fn pty_echo_resize_and_errors() {
    let envd = Envd::start().await;
    let body = json!({
        "process": {"cmd": "/bin/bash", "args": ["--norc", "--noprofile", "-i"],
                     "envs": {"TERM": "xterm-256color", "PS1": "$ "}},
        "pty": {"size": {"cols": 80, "rows": 24}}
    });
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    let send = |data: &'static str| {
        envd.unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": B64.encode(data)}}),
        )
    };
    let (status, body) = send("echo $TERM; stty size; tty\n").await;
    assert_eq!(status, 200, "{body}");
    let out = read_until(&mut frames, "pty", "24 80").await;
    assert!(out.contains("xterm-256color"), "{out}");

    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    send("stty size\n").await;
    read_until(&mut frames, "pty", "30 100").await;

    // stdin to a PTY process and CloseStdin on it are refused.
    let (status, body) = envd
        .unary(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("x")}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (status, body) = envd
        .unary(
            "process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    send("exit 5\n").await;
    let r = finish(pid, frames).await;
    assert_eq!(r.exit_code(), 5);
    assert!(
        r.data_frames
            .iter()
            .all(|(k, n)| k == "pty" && *n <= 16 * 1024)
    );
}

#[tokio::test]
async fn pty_output_is_drained_before_end() {
    let envd = Envd::start().await;
    let body = json!({
        "process": {"cmd": "/bin/bash", "args": ["-c", "seq 1 2000"]},
        "pty": {"size": {"cols": 80, "rows": 24}}
    });
    let r = run(&envd, body, &[]).await;
    let text = String::from_utf8_lossy(&r.pty).replace("\r\n", "\n");
    let want: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(text, want);
}

#[tokio::test]
async fn kill_and_terminate() {
    let envd = Envd::start().await;
    for (sig, text) in [
        ("SIGNAL_SIGKILL", "signal: killed"),
        ("SIGNAL_SIGTERM", "signal: terminated"),
    ] {
        // The child of bash must die too: signals go to the process group.
        let mut frames = envd
            .stream(
                "process.Process/Start",
                bash("sleep 300 & echo $!; wait; echo unreachable"),
                &[],
            )
            .await;
        let pid = started(&mut frames).await;
        let child: u64 = read_until(&mut frames, "stdout", "\n")
            .await
            .trim()
            .parse()
            .unwrap();
        assert!(pid_alive(child));
        let (status, body) = signal(&envd, pid, sig).await;
        assert_eq!(status, 200, "{body}");
        let r = finish(pid, frames).await;
        assert_eq!(r.exit_code(), -1);
        assert_eq!(r.status(), text);
        let end = r.end.as_ref().unwrap();
        assert_eq!(end["error"], text);
        assert!(end.get("exited").is_none() || end["exited"] == json!(false));
        let deadline = std::time::Instant::now() + GUARD;
        while pid_alive(child) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {child} survived {sig}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn signal_errors() {
    let envd = Envd::start().await;
    let (status, body) = signal(&envd, 999_999, "SIGNAL_SIGKILL").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    assert_eq!(body["message"], "process with pid 999999 not found");

    let mut frames = envd
        .stream("process.Process/Start", bash("sleep 30"), &[])
        .await;
    let pid = started(&mut frames).await;
    let (status, body) = signal(&envd, pid, "SIGNAL_UNSPECIFIED").await;
    assert!(status >= 400, "{body}");
    assert_eq!(body["code"], "unimplemented");
    assert_eq!(signal(&envd, pid, "SIGNAL_SIGKILL").await.0, 200);
    collect(frames).await;
}

#[tokio::test]
async fn connect_timeout_kills_the_process() {
    let envd = Envd::start().await;
    let frames = envd
        .stream(
            "process.Process/Start",
            bash("sleep 300 & echo $!; wait"),
            &[("connect-timeout-ms", "1000")],
        )
        .await;
    let r = summarize(&collect(frames).await);
    assert_eq!(stream_error_code(&r), "deadline_exceeded", "{:?}", r.error);
    assert!(r.end.is_none());
    let child: u64 = r.stdout_str().trim().parse().expect("child pid");
    // The process and its child were killed.
    let deadline = std::time::Instant::now() + GUARD;
    while pid_alive(r.pid)
        || pid_alive(child)
        || list(&envd).await.iter().any(|p| p["pid"] == json!(r.pid))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "process survived its timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn process_outlives_its_stream() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/cat"}, "tag": "outlive"});
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    drop(frames);
    // Still running and reachable: send input, reconnect and see it.
    let mut again = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    assert_eq!(started(&mut again).await, pid);
    envd.unary(
        "process.Process/SendInput",
        json!({"process": {"tag": "outlive"}, "input": {"stdin": B64.encode("still here\n")}}),
    )
    .await;
    read_until(&mut again, "stdout", "still here").await;
    assert!(list(&envd).await.iter().any(|p| p["pid"] == json!(pid)));
    signal(&envd, pid, "SIGNAL_SIGKILL").await;
    collect(again).await;
}

#[tokio::test]
async fn connect_by_pid_and_tag_to_running_process() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/cat"}, "tag": "my-tag"});
    let mut start = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut start).await;

    let mut by_pid = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let mut by_tag = envd
        .stream(
            "process.Process/Connect",
            json!({"process": {"tag": "my-tag"}}),
            &[],
        )
        .await;
    assert_eq!(started(&mut by_pid).await, pid);
    assert_eq!(started(&mut by_tag).await, pid);

    envd.unary(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("ping\n")}}),
    )
    .await;
    for frames in [&mut start, &mut by_pid, &mut by_tag] {
        assert_eq!(read_until(frames, "stdout", "ping").await, "ping\n");
    }
    envd.unary(
        "process.Process/CloseStdin",
        json!({"process": {"tag": "my-tag"}}),
    )
    .await;
    for frames in [start, by_pid, by_tag] {
        let r = finish(pid, frames).await;
        assert_eq!(r.exit_code(), 0);
        assert!(r.error.is_none());
    }
}

#[tokio::test]
async fn connect_to_ended_process_and_unknown() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo done; exit 4"]},
                      "tag": "ended-tag", "stdin": false});
    let first = run(&envd, body, &[]).await;
    for selector in [json!({"pid": first.pid}), json!({"tag": "ended-tag"})] {
        let frames = envd
            .stream("process.Process/Connect", json!({"process": selector}), &[])
            .await;
        let r = summarize(&collect(frames).await);
        assert_eq!(r.pid, first.pid);
        assert!(r.stdout.is_empty(), "old output is not replayed");
        assert_eq!(r.exit_code(), 4);
        assert_eq!(r.status(), "exit status 4");
    }
    // Ended processes are not listed.
    assert!(
        !list(&envd)
            .await
            .iter()
            .any(|p| p["pid"] == json!(first.pid))
    );

    for (selector, message) in [
        (json!({"pid": 999_999}), "process with pid 999999 not found"),
        (json!({"tag": "nope"}), "process with tag nope not found"),
    ] {
        let frames = envd
            .stream("process.Process/Connect", json!({"process": selector}), &[])
            .await;
        let r = summarize(&collect(frames).await);
        assert_eq!(stream_error_code(&r), "not_found");
        assert_eq!(r.error.as_ref().unwrap()["message"], message);
    }
}

#[tokio::test]
async fn list_shows_running_processes() {
    let envd = Envd::start().await;
    let body = json!({
        "process": {"cmd": "/bin/sleep", "args": ["30"], "envs": {"A": "1"}, "cwd": "/tmp"},
        "tag": "list-tag", "stdin": false
    });
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    let procs = list(&envd).await;
    let p = procs
        .iter()
        .find(|p| p["pid"] == json!(pid))
        .unwrap_or_else(|| panic!("pid {pid} not in {procs:?}"));
    assert_eq!(p["tag"], "list-tag");
    assert_eq!(p["config"]["cmd"], "/bin/sleep");
    assert_eq!(p["config"]["args"], json!(["30"]));
    assert_eq!(p["config"]["envs"], json!({"A": "1"}));
    assert_eq!(p["config"]["cwd"], "/tmp");
    signal(&envd, pid, "SIGNAL_SIGKILL").await;
    collect(frames).await;
}

#[tokio::test]
async fn keepalives_follow_the_requested_interval() {
    let envd = Envd::start().await;
    let r = run(
        &envd,
        bash("sleep 3; echo bye"),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    assert!(r.keepalives >= 1, "no keepalive in 3 s with a 1 s interval");
    assert_eq!(r.stdout_str(), "bye\n");
}

#[tokio::test]
async fn stream_input_client_stream() {
    let envd = Envd::start().await;
    let body = json!({"process": {"cmd": "/bin/cat"}});
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    let mut req = Vec::new();
    req.extend(envelope(
        0,
        json!({"start": {"process": {"pid": pid}}})
            .to_string()
            .as_bytes(),
    ));
    req.extend(envelope(
        0,
        json!({"data": {"input": {"stdin": B64.encode("one ")}}})
            .to_string()
            .as_bytes(),
    ));
    req.extend(envelope(0, json!({"keepalive": {}}).to_string().as_bytes()));
    req.extend(envelope(
        0,
        json!({"data": {"input": {"stdin": B64.encode("two\n")}}})
            .to_string()
            .as_bytes(),
    ));
    let resp = envd
        .client
        .post(envd.url("/process.Process/StreamInput"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    // One message frame ({}), then the end-stream frame ({}).
    assert_eq!(bytes[0], 0, "{bytes:?}");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes[5..5 + len]).unwrap(),
        json!({})
    );
    assert_eq!(bytes[5 + len] & 2, 2, "end-stream frame follows");
    assert_eq!(read_until(&mut frames, "stdout", "two").await, "one two\n");
    signal(&envd, pid, "SIGNAL_SIGKILL").await;
    collect(frames).await;
}

#[tokio::test]
async fn binary_protobuf_encoding() {
    use buffa::Message;
    use kiln_proto::process::__buffa::oneof::process_event::Event;
    use kiln_proto::process::__buffa::oneof::process_event::data_event::Output;
    use kiln_proto::process::{ProcessConfig, StartRequest, StartResponse};

    let envd = Envd::start().await;
    let req = StartRequest {
        process: ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), "printf 'bin\\xff'; exit 2".into()],
            ..Default::default()
        }
        .into(),
        stdin: Some(false),
        ..Default::default()
    };
    let resp = envd
        .client
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+proto")
        .header("connect-protocol-version", "1")
        .body(envelope(0, &req.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/connect+proto"
    );
    let body = resp.bytes().await.unwrap().to_vec();
    let mut rest = &body[..];
    let mut events = Vec::new();
    let mut end_stream = None;
    while rest.len() >= 5 {
        let flag = rest[0];
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let payload = &rest[5..5 + len];
        if flag & 2 != 0 {
            end_stream = Some(serde_json::from_slice::<Value>(payload).unwrap());
        } else {
            let msg = StartResponse::decode_from_slice(payload).expect("StartResponse");
            events.push(
                msg.event
                    .as_option()
                    .and_then(|e| e.event.clone())
                    .expect("event"),
            );
        }
        rest = &rest[5 + len..];
    }
    assert_eq!(end_stream, Some(json!({})));
    assert!(matches!(events.first(), Some(Event::Start(s)) if s.pid > 0));
    let mut stdout = Vec::new();
    let mut end = None;
    for e in &events[1..] {
        match e {
            Event::Data(d) => {
                if let Some(Output::Stdout(b)) = &d.output {
                    stdout.extend_from_slice(b);
                }
            }
            Event::End(e) => end = Some(e.clone()),
            Event::Keepalive(_) => {}
            Event::Start(_) => panic!("second start"),
        }
    }
    assert_eq!(stdout, b"bin\xff");
    let end = end.expect("end event");
    assert_eq!((end.exit_code, end.exited), (2, true));
    assert_eq!(end.status, "exit status 2");
}

#[tokio::test]
async fn malformed_requests_get_connect_errors() {
    let envd = Envd::start().await;
    // Envelope claims 100 bytes but carries 3.
    let mut bad = vec![0u8, 0, 0, 0, 100];
    bad.extend_from_slice(b"{\"p");
    let resp = envd
        .client
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(bad)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        (status == 200 && text.contains("\"error\"")) || status >= 400,
        "{status} {text}"
    );
    // Not JSON at all.
    let resp = envd
        .client
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(envelope(0, b"not json"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = String::from_utf8_lossy(&resp.bytes().await.unwrap()).into_owned();
    assert!(
        (status == 200 && text.contains("invalid_argument")) || status >= 400,
        "{status} {text}"
    );
    // Unary with a wrong field type.
    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"pid": "x"}}),
        )
        .await;
    assert!(status >= 400, "{status} {body}");
    // Missing selector.
    let (status, body) = envd.unary("process.Process/SendSignal", json!({})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    // envd survived all of it.
    let r = run(&envd, bash("echo alive"), &[]).await;
    assert_eq!(r.stdout_str(), "alive\n");
}

#[tokio::test]
async fn slow_client_loses_nothing() {
    let envd = Envd::start().await;
    let mut frames = envd
        .stream(
            "process.Process/Start",
            bash("head -c 3000000 /dev/zero | tr '\\0' z; echo done >&2"),
            &[],
        )
        .await;
    let pid = started(&mut frames).await;
    // Stop reading for a while: the process must wait for us, not drop data.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = finish(pid, frames).await;
    assert_eq!(r.stdout.len(), 3_000_000);
    assert!(r.stdout.iter().all(|b| *b == b'z'));
    assert_eq!(r.stderr, b"done\n");
    assert_eq!(r.exit_code(), 0);
}

#[tokio::test]
async fn children_get_default_sigpipe() {
    let envd = Envd::start().await;
    // With SIGPIPE ignored, `yes` would report a write error on stderr.
    let r = run(&envd, bash("yes | head -n 2"), &[]).await;
    assert_eq!(r.stdout_str(), "y\ny\n");
    assert!(
        r.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[tokio::test]
async fn tag_and_pid_selectors_work_for_every_rpc() {
    let envd = Envd::start().await;
    let body = json!({
        "process": {"cmd": "/bin/bash", "args": ["--norc", "--noprofile", "-i"], "envs": {"PS1": "$ "}},
        "pty": {"size": {"cols": 50, "rows": 10}},
        "tag": "pty-tag"
    });
    let mut frames = envd.stream("process.Process/Start", body, &[]).await;
    let pid = started(&mut frames).await;
    let (status, body) = envd
        .unary(
            "process.Process/Update",
            json!({"process": {"tag": "pty-tag"}, "pty": {"size": {"cols": 61, "rows": 17}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    envd.unary(
        "process.Process/SendInput",
        json!({"process": {"tag": "pty-tag"}, "input": {"pty": B64.encode("stty size\n")}}),
    )
    .await;
    read_until(&mut frames, "pty", "17 61").await;
    let (status, body) = envd
        .unary(
            "process.Process/SendSignal",
            json!({"process": {"tag": "pty-tag"}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let r = finish(pid, frames).await;
    assert_eq!(r.status(), "signal: killed");
}

#[tokio::test]
async fn sandbox_env_vars_then_request_envs() {
    let envd = Envd::start().await;
    let resp = envd
        .client
        .post(envd.url("/init"))
        .json(&json!({"envVars": {"A": "sandbox", "B": "sandbox", "HOME": "/sandbox-home"}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let body = json!({"process": {
        "cmd": "/bin/bash",
        "args": ["-c", "echo \"$A $B $HOME\""],
        "envs": {"B": "request"}
    }, "stdin": false});
    let r = run(&envd, body, &[]).await;
    assert_eq!(r.stdout_str(), "sandbox request /sandbox-home\n");
}
