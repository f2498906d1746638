//! Template builds with real gVisor sandboxes. They need root, `runsc`, the
//! base rootfs (`KILN_TEST_BASE_ROOTFS`, default
//! `/var/lib/kiln/cache/base-rootfs`) and a static envd (`KILN_TEST_ENVD`);
//! `scripts/test.sh` provides all of them.
//!
//! One runtime node (subnet 10.218.0.0/16, nft table `kiln_tpl_test`,
//! interfaces `ktb*`) serves every test; tests run one at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use kiln_runtime::network::NetworkConfig;
use kiln_runtime::{CreateRequest, Resources, Runtime, RuntimeConfig};
use kiln_templates::{
    BuildError, BuildFrom, BuildLog, BuildSpec, Builder, Step, StepKind, parse_dockerfile,
};

struct Node {
    rt: Arc<Runtime>,
    dir: PathBuf,
    envd: PathBuf,
    base: PathBuf,
}

static TOKIO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

static NODE: LazyLock<Node> = LazyLock::new(|| {
    let base = std::env::var("KILN_TEST_BASE_ROOTFS")
        .unwrap_or_else(|_| "/var/lib/kiln/cache/base-rootfs".into());
    let envd = std::env::var("KILN_TEST_ENVD")
        .expect("KILN_TEST_ENVD must name a static envd binary (scripts/build-envd.sh)");
    // Same filesystem as the base rootfs: layers and templates hard-link it.
    let dir = PathBuf::from(format!("/var/tmp/kiln-tpl-test-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(dir.join("data"), dir.join("run"));
    cfg.network = NetworkConfig {
        subnet: "10.218.0.0/16".parse().unwrap(),
        table_name: "kiln_tpl_test".into(),
        name_prefix: "ktb".into(),
        ..NetworkConfig::default()
    };
    let rt = Runtime::start(cfg).expect("starting the runtime");
    Node {
        rt,
        dir,
        envd: envd.into(),
        base: base.into(),
    }
});

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());
/// Tests in this file; the last one to finish cleans the node up.
const TESTS: usize = 6;
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// Held by a running test: serialises tests, and after the last one removes
/// the node's firewall table and directory (unless containers or mounts were
/// left behind by a failure: those stay for inspection).
struct Turn {
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
            NODE.rt.wait_for_teardowns();
            if runsc_containers(&NODE).is_empty() && mounts_under(&NODE.dir).is_empty() {
                let _ = NODE.rt.shutdown_network();
                let _ = std::fs::remove_dir_all(&NODE.dir);
            }
        }
    }
}

fn node() -> (&'static Node, Turn) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    (&NODE, Turn { _serial: guard })
}

fn builder(node: &Node) -> Builder {
    Builder::new(
        node.rt.clone(),
        node.dir.join("cache"),
        node.envd.clone(),
        node.base.clone(),
    )
}

fn spec(id: &str, steps: Vec<Step>) -> BuildSpec {
    BuildSpec {
        target_id: id.into(),
        from: BuildFrom::Base,
        steps,
        start_cmd: None,
        ready_cmd: None,
        resources: Resources::default(),
        force: false,
    }
}

fn run_step(cmd: &str) -> Step {
    Step::new(StepKind::Run {
        cmd: cmd.into(),
        user: None,
    })
}

/// Collects the build log (and echoes it, for failures).
#[derive(Default, Clone)]
struct Logs(Arc<Mutex<Vec<BuildLog>>>);

impl Logs {
    fn sink(&self) -> impl Fn(BuildLog) + Send + Sync + 'static {
        let logs = self.0.clone();
        move |l: BuildLog| {
            eprintln!("[{:?}] {:?} {}", l.level, l.step, l.message);
            logs.lock().unwrap().push(l);
        }
    }

    fn text(&self) -> String {
        let logs = self.0.lock().unwrap();
        logs.iter()
            .map(|l| l.message.clone())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn sh(rt: &Arc<Runtime>, id: &str, user: &str, cmd: &str) -> String {
    let out = rt
        .envd(id)
        .unwrap()
        .run(cmd, user, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert_eq!(
        out.exit_code, 0,
        "{cmd:?}: stdout {:?} stderr {:?}",
        out.stdout, out.stderr
    );
    out.stdout.trim_end().to_string()
}

fn runsc_containers(node: &Node) -> Vec<String> {
    let out = Command::new("runsc")
        .arg(format!("--root={}", node.dir.join("run/runsc").display()))
        .args(["list", "-quiet"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(d.as_ref()))
        .map(str::to_string)
        .collect()
}

/// After a failed build: no template, sandbox, container, mount or temp dir.
fn assert_nothing_left(node: &Node, id: &str) {
    node.rt.wait_for_teardowns();
    assert!(
        matches!(
            node.rt.template(id),
            Err(kiln_runtime::Error::TemplateNotFound(_))
        ),
        "template {id} exists"
    );
    assert!(!node.rt.template_dir(id).exists());
    assert!(
        node.rt.list().is_empty(),
        "sandboxes left: {:?}",
        node.rt.list()
    );
    assert_eq!(
        runsc_containers(node),
        Vec::<String>::new(),
        "containers left"
    );
    assert_eq!(mounts_under(&node.dir), Vec::<String>::new(), "mounts left");
    let tmp: Vec<_> = std::fs::read_dir(node.dir.join("cache/tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "temp dirs left: {tmp:?}");
    let flat: Vec<_> = std::fs::read_dir(node.dir.join("cache/flat"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(flat.is_empty(), "flatten dirs left: {flat:?}");
}

#[test]
fn root_dockerfile_template_shows_every_step() {
    let (node, _g) = node();
    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path();
    std::fs::write(c.join("app.txt"), "app content\n").unwrap();
    std::fs::write(c.join("secret.txt"), "do not copy\n").unwrap();
    std::fs::write(c.join(".dockerignore"), "secret.txt\n").unwrap();
    std::fs::create_dir_all(c.join("bin")).unwrap();
    std::fs::write(c.join("bin/tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::create_dir_all(c.join("bundle")).unwrap();
    std::fs::write(c.join("bundle/inner.txt"), "from the archive\n").unwrap();
    let tar = Command::new("tar")
        .current_dir(c)
        .args(["-czf", "bundle.tar.gz", "-C", "bundle", "inner.txt"])
        .status()
        .unwrap();
    assert!(tar.success());
    let dockerfile = r#"
FROM kiln-base
ARG GREETING=hello
ENV APP_DIR=/opt/app
ENV MSG="${GREETING} world" \
    LITERAL='$GREETING'
WORKDIR $APP_DIR
COPY app.txt ./
COPY . /opt/ctx/
COPY --chown=user --chmod=750 bin/ /opt/tools/
ADD bundle.tar.gz /opt/bundle/
RUN echo "built as $(id -un) in $(pwd)" > built.txt && echo "step output line"
USER app
RUN whoami > ~/whoami.txt
CMD ["sleep", "infinity"]
"#;
    let parsed = parse_dockerfile(dockerfile, c, &HashMap::new()).unwrap();
    assert_eq!(parsed.from, "kiln-base");
    assert_eq!(parsed.start_cmd.as_deref(), Some("sleep infinity"));
    let mut s = spec("tpl-docker", parsed.steps);
    s.start_cmd = parsed.start_cmd;
    let logs = Logs::default();
    let sink = logs.sink();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let outcome = builder(node).build(s, &sink).await.unwrap();
        let n = 11;
        assert_eq!((outcome.steps_run, outcome.steps_cached), (n, 0));
        assert!(outcome.rootfs_bytes > 50_000_000, "{outcome:?}");
        assert!(outcome.snapshot_bytes > 1_000_000, "{outcome:?}");
        let text = logs.text();
        assert!(text.contains("[1/11] ENV GREETING=hello"), "{text}");
        assert!(text.contains("[10/11] USER app"), "{text}");
        assert!(text.contains("step output line"), "{text}");

        let meta = rt.template("tpl-docker").unwrap();
        assert_eq!(meta.user, "app");
        assert_eq!(meta.workdir.as_deref(), Some("/opt/app"));
        assert_eq!(meta.env.get("MSG").map(String::as_str), Some("hello world"));

        let info = rt
            .create(CreateRequest {
                template_id: "tpl-docker".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let id = info.id.clone();
        // ENV (expanded, literal), WORKDIR as the default cwd, USER as the default user.
        assert_eq!(
            sh(
                rt,
                &id,
                "app",
                "echo \"$MSG|$LITERAL|$APP_DIR\"; pwd; whoami"
            )
            .await,
            "hello world|$GREETING|/opt/app\n/opt/app\napp"
        );
        // RUN ran as root (the USER came later) in the WORKDIR; the second as app.
        assert_eq!(
            sh(
                rt,
                &id,
                "app",
                "cat /opt/app/built.txt /home/app/whoami.txt"
            )
            .await,
            "built as root in /opt/app\napp"
        );
        // COPY: a file into the workdir, a context without ignored files,
        // a directory's contents with owner and mode, an extracted archive.
        assert_eq!(
            sh(rt, &id, "app", "cat /opt/app/app.txt").await,
            "app content"
        );
        assert_eq!(
            sh(rt, &id, "app", "ls -A /opt/ctx | sort | tr '\\n' ' '").await,
            ".dockerignore app.txt bin bundle bundle.tar.gz"
        );
        assert_eq!(
            sh(
                rt,
                &id,
                "root",
                "stat -c '%U %a' /opt/tools/tool.sh && /opt/tools/tool.sh"
            )
            .await,
            "user 750\ntool"
        );
        assert_eq!(
            sh(rt, &id, "app", "cat /opt/bundle/inner.txt").await,
            "from the archive"
        );
        // Provisioning: user 1000 with its home, the node's resolver, hosts.
        assert_eq!(
            sh(rt, &id, "user", "id -u; echo $HOME; cat /etc/hostname").await,
            "1000\n/home/user\nkiln"
        );
        let dns = rt.dns_address().to_string();
        assert_eq!(
            sh(rt, &id, "app", "cat /etc/resolv.conf").await,
            format!("nameserver {dns}")
        );
        assert!(
            sh(rt, &id, "app", "cat /etc/hosts")
                .await
                .contains("localhost")
        );
        // The start command runs.
        assert!(
            sh(rt, &id, "root", "ps -eo args")
                .await
                .contains("sleep infinity")
        );
        rt.kill_and_wait(&id).await.unwrap();
    });
}

#[test]
fn root_rebuild_reruns_only_changed_steps() {
    let (node, _g) = node();
    let rt = &node.rt;
    let steps = |last: &str| {
        vec![
            Step::new(StepKind::Env(vec![("A".into(), "1".into())])),
            run_step("echo first > /first.txt"),
            Step::new(StepKind::Workdir("/work".into())),
            run_step(&format!("echo {last} > /work/last.txt")),
        ]
    };
    let logs = Logs::default();
    let sink = logs.sink();
    TOKIO.block_on(async {
        let b = builder(node);
        let o = b
            .build(spec("tpl-cache", steps("v1")), &sink)
            .await
            .unwrap();
        assert_eq!((o.steps_run, o.steps_cached), (4, 0));
        let o = b
            .build(spec("tpl-cache", steps("v1")), &sink)
            .await
            .unwrap();
        assert_eq!((o.steps_run, o.steps_cached), (0, 4));
        assert!(logs.text().contains("CACHED"));
        let o = b
            .build(spec("tpl-cache", steps("v2")), &sink)
            .await
            .unwrap();
        assert_eq!((o.steps_run, o.steps_cached), (1, 3));
        // force skips the cache.
        let mut forced = spec("tpl-cache", steps("v2"));
        forced.force = true;
        let o = b.build(forced, &sink).await.unwrap();
        assert_eq!((o.steps_run, o.steps_cached), (4, 0));

        let info = rt
            .create(CreateRequest {
                template_id: "tpl-cache".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            sh(
                rt,
                &info.id,
                "user",
                "cat /first.txt /work/last.txt; pwd; echo $A"
            )
            .await,
            "first\nv2\n/work\n1"
        );
        rt.kill_and_wait(&info.id).await.unwrap();
    });
}

#[test]
fn root_start_and_ready_commands() {
    let (node, _g) = node();
    let rt = &node.rt;
    let mut s = spec(
        "tpl-server",
        vec![run_step("mkdir -p /srv && echo served > /srv/index.html")],
    );
    s.start_cmd = Some("cd /srv && python3 -m http.server 8000".into());
    s.ready_cmd = Some("[ -n \"$(ss -Htln sport = :8000)\" ]".into());
    let logs = Logs::default();
    let sink = logs.sink();
    TOKIO.block_on(async {
        builder(node).build(s, &sink).await.unwrap();
        let info = rt
            .create(CreateRequest {
                template_id: "tpl-server".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            sh(
                rt,
                &info.id,
                "user",
                "curl -sS --max-time 5 http://127.0.0.1:8000/index.html"
            )
            .await,
            "served"
        );
        rt.kill_and_wait(&info.id).await.unwrap();
    });
}

#[test]
fn root_failing_step_names_itself_and_leaves_nothing() {
    let (node, _g) = node();
    let logs = Logs::default();
    let sink = logs.sink();
    TOKIO.block_on(async {
        let steps = vec![
            run_step("echo fine"),
            run_step("echo before the failure; echo broken-thing >&2; exit 3"),
            run_step("echo never"),
        ];
        let err = builder(node)
            .build(spec("tpl-fail", steps), &sink)
            .await
            .unwrap_err();
        match &err {
            BuildError::StepFailed {
                index,
                step,
                exit_code,
                output_tail,
            } => {
                assert_eq!(*index, 2);
                assert!(step.starts_with("RUN echo before the failure"), "{step}");
                assert_eq!(*exit_code, 3);
                assert!(output_tail.contains("broken-thing"), "{output_tail}");
                assert!(output_tail.contains("before the failure"), "{output_tail}");
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("exit code 3"), "{err}");
        assert!(!logs.text().contains("never"));
        assert_nothing_left(node, "tpl-fail");

        // A COPY from outside the context fails before any sandbox runs.
        let ctx = tempfile::tempdir().unwrap();
        let copy = Step::new(StepKind::Copy {
            context: ctx.path().into(),
            src: "../etc/passwd".into(),
            dest: "/x".into(),
            user: None,
            mode: None,
        });
        let err = builder(node)
            .build(spec("tpl-fail", vec![copy]), &sink)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BuildError::StepInvalid { index: 1, reason, .. } if reason.contains("outside")),
            "{err}"
        );
        // An unknown base template.
        let mut s = spec("tpl-fail", vec![]);
        s.from = BuildFrom::Template("no-such-template".into());
        let err = builder(node).build(s, &sink).await.unwrap_err();
        assert!(matches!(err, BuildError::UnknownTemplate(_)), "{err}");
        assert_nothing_left(node, "tpl-fail");
    });
}

#[test]
fn root_ready_command_that_never_succeeds_times_out() {
    let (node, _g) = node();
    let logs = Logs::default();
    let sink = logs.sink();
    let mut s = spec("tpl-never-ready", vec![]);
    s.ready_cmd = Some("test -e /never".into());
    TOKIO.block_on(async {
        let started = Instant::now();
        let err = builder(node)
            .with_ready_timeout(Duration::from_secs(3))
            .build(s, &sink)
            .await
            .unwrap_err();
        match &err {
            BuildError::NotReady { cmd, timeout, .. } => {
                assert_eq!(cmd, "test -e /never");
                assert_eq!(*timeout, Duration::from_secs(3));
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(
            err.to_string().contains("did not succeed within 3s"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
        assert_nothing_left(node, "tpl-never-ready");
    });
}

#[test]
fn root_template_on_template() {
    let (node, _g) = node();
    let rt = &node.rt;
    let logs = Logs::default();
    let sink = logs.sink();
    TOKIO.block_on(async {
        let b = builder(node);
        let mut parent = spec(
            "tpl-parent",
            vec![
                Step::new(StepKind::Env(vec![("FROM_PARENT".into(), "yes".into())])),
                run_step("echo parent > /parent.txt"),
                // Build sandboxes reach the internet (DNS through the node's resolver).
                run_step(
                    "curl -sS --max-time 20 -o /dev/null -w '%{http_code}' http://deb.debian.org/debian/dists/bookworm/Release > /net.txt",
                ),
            ],
        );
        parent.force = false;
        b.build(parent, &sink).await.unwrap();
        let mut child = spec(
            "tpl-child",
            vec![
                Step::new(StepKind::User {
                    name: "worker".into(),
                    sudo: true,
                }),
                // Kiln's sudo works in RUN steps (the image's cannot under gVisor).
                run_step("sudo sh -c 'echo $SUDO_USER > /root/by-sudo'"),
            ],
        );
        child.from = BuildFrom::Template("tpl-parent".into());
        b.build(child, &sink).await.unwrap();
        let info = rt
            .create(CreateRequest {
                template_id: "tpl-child".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            sh(
                rt,
                &info.id,
                "worker",
                "cat /parent.txt; echo $FROM_PARENT; whoami; stat -c %a /etc/sudoers.d/worker; cat /net.txt; echo; sudo cat /root/by-sudo; sudo whoami"
            )
            .await,
            "parent\nyes\nworker\n440\n200\nworker\nroot"
        );
        rt.kill_and_wait(&info.id).await.unwrap();
    });
}
