//! Runtime tests with real gVisor sandboxes. They need root, `runsc`, a base
//! root filesystem (`KILN_TEST_BASE_ROOTFS`, default
//! `/var/lib/kiln/cache/base-rootfs`) and a static envd (`KILN_TEST_ENVD`);
//! `scripts/test.sh` provides all of them.
//!
//! The tests share one runtime and one template (made once), and run one at
//! a time: a 2-core machine gains nothing from running them in parallel.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use kiln_runtime::network::NetworkConfig;
use kiln_runtime::template::TemplateMeta;
use kiln_runtime::{CreateRequest, Runtime, RuntimeConfig, SandboxState};

const TEMPLATE: &str = "test-base";

struct Node {
    rt: Arc<Runtime>,
    dir: PathBuf,
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
    // Same filesystem as the base rootfs: templates hard-link it.
    let dir = PathBuf::from(format!("/var/tmp/kiln-rt-test-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(dir.join("data"), dir.join("run"));
    cfg.network = test_network();
    let rt = Runtime::start(cfg).expect("starting the runtime");
    let meta = TemplateMeta::new(TEMPLATE);
    rt.create_template(&meta, base.as_ref(), envd.as_ref())
        .expect("creating the template");
    let took = TOKIO
        .block_on(rt.snapshot_template(TEMPLATE))
        .expect("snapshotting the template");
    eprintln!("template snapshot took {took:?}");
    Node { rt, dir }
});

fn test_network() -> NetworkConfig {
    NetworkConfig {
        subnet: "10.214.0.0/16".parse().unwrap(),
        table_name: "kiln_rt_test".into(),
        name_prefix: "krt".into(),
        ..NetworkConfig::default()
    }
}

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn node() -> (&'static Node, std::sync::MutexGuard<'static, ()>) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    (&NODE, guard)
}

async fn run(rt: &Arc<Runtime>, id: &str, cmd: &str) -> kiln_runtime::envd::CommandOutput {
    let client = rt.envd(id).unwrap();
    let out = client
        .run(cmd, "user", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("running {cmd:?} in {id}: {e}"));
    assert_eq!(
        out.exit_code, 0,
        "{cmd:?} in {id}: status {:?}, stdout {:?}, stderr {:?}",
        out.status, out.stdout, out.stderr
    );
    out
}

fn create_req(env: &[(&str, &str)]) -> CreateRequest {
    CreateRequest {
        template_id: TEMPLATE.into(),
        env_vars: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        access_token: Some("test-token-123".into()),
        ..Default::default()
    }
}

#[test]
fn root_create_run_and_kill() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let info = rt
            .create(create_req(&[("KILN_TEST_VAR", "hello-env")]))
            .await
            .unwrap();
        assert_eq!(info.state, SandboxState::Running);
        let id = info.id.clone();
        let out = run(rt, &id, "echo hello; whoami; pwd; echo $KILN_TEST_VAR").await;
        assert_eq!(out.stdout, "hello\nuser\n/home/user\nhello-env\n");
        // Writes land in the sandbox's own overlay, never in the template.
        run(
            rt,
            &id,
            "echo data > /home/user/f.txt && cat /home/user/f.txt",
        )
        .await;
        assert!(
            !node
                .dir
                .join("data/templates")
                .join(TEMPLATE)
                .join("rootfs/home/user/f.txt")
                .exists()
        );
        // envd demands the access token.
        let addr = info.envd_addr.unwrap();
        let resp = reqwest::Client::new()
            .get(format!("http://{addr}/envs"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        // Every sandbox gets its own entropy and hostname.
        let other = rt.create(create_req(&[])).await.unwrap();
        let a = run(rt, &id, "hostname; head -c 16 /dev/urandom | od -An -tx1")
            .await
            .stdout;
        let b = run(
            rt,
            &other.id,
            "hostname; head -c 16 /dev/urandom | od -An -tx1",
        )
        .await
        .stdout;
        assert_ne!(a, b);
        let netns = PathBuf::from("/var/run/netns");
        rt.kill_and_wait(&id).await.unwrap();
        rt.kill_and_wait(&other.id).await.unwrap();
        assert!(rt.info(&id).is_err());
        assert!(rt.list().iter().all(|s| s.id != id));
        let leftovers: Vec<_> = std::fs::read_dir(&netns)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers.iter().all(|n: &String| !n.starts_with("krt")),
            "{leftovers:?}"
        );
        assert!(rt.kill(&id).await.is_err(), "killing twice must fail");
    });
}

#[test]
fn root_sandboxes_are_isolated() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let a = rt.create(create_req(&[])).await.unwrap();
        let b = rt.create(create_req(&[])).await.unwrap();
        // The host reaches both.
        for s in [&a, &b] {
            let client = rt.envd(&s.id).unwrap();
            assert!(client.healthy(Duration::from_secs(2)).await);
        }
        // A host service on every address, e.g. what the host runs on its veth side.
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let b_ip = b.ip.unwrap();
        let probe = format!(
            "curl -s -m 2 -o /dev/null http://{b_ip}:49983/health && echo B-REACHED; \
             for h in 10.214.0.1 10.214.0.5 {gw}; do curl -s -m 2 -o /dev/null http://$h:{port}/ && echo HOST-REACHED; done; true",
            gw = "10.214.255.254"
        );
        let out = run(rt, &a.id, &probe).await;
        assert!(!out.stdout.contains("REACHED"), "{}", out.stdout);
        drop(listener);
        rt.kill_and_wait(&a.id).await.unwrap();
        rt.kill_and_wait(&b.id).await.unwrap();
    });
}

#[test]
fn root_pause_and_resume_keep_processes_memory_and_files() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let info = rt.create(create_req(&[("KEEP", "me")])).await.unwrap();
        let id = info.id.clone();
        // A process holding state only in memory; it reports it on request.
        run(rt, &id, "echo on-disk > ~/disk.txt; echo in-tmpfs > /tmp/mem.txt").await;
        let client = rt.envd(&id).unwrap();
        client
            .start_background(
                "python3 -c \"import os,signal,time,random\nsecret=str(random.random())\nopen('/tmp/secret','w').write(secret)\nsignal.signal(signal.SIGUSR1, lambda *a: open('/tmp/echo','w').write(secret))\nopen('/tmp/ready','w').write(str(os.getpid()))\nwhile True: time.sleep(3600)\"",
                "user",
                "holder",
            )
            .await
            .unwrap();
        run(rt, &id, "for i in $(seq 100); do [ -s /tmp/ready ] && exit 0; sleep 0.05; done; exit 1").await;
        let secret = run(rt, &id, "cat /tmp/secret").await.stdout;
        for cycle in 0..3 {
            rt.pause(&id).await.unwrap_or_else(|e| panic!("pause {cycle}: {e}"));
            assert_eq!(rt.info(&id).unwrap().state, SandboxState::Paused);
            assert!(rt.envd(&id).is_err());
            rt.resume(&id).await.unwrap_or_else(|e| panic!("resume {cycle}: {e}"));
            assert_eq!(rt.info(&id).unwrap().state, SandboxState::Running);
            let out = run(
                rt,
                &id,
                "rm -f /tmp/echo; kill -USR1 $(cat /tmp/ready); for i in $(seq 100); do [ -s /tmp/echo ] && break; sleep 0.05; done; \
                 cat /tmp/echo; echo; cat ~/disk.txt /tmp/mem.txt; echo $KEEP",
            )
            .await;
            assert_eq!(out.stdout, format!("{secret}\non-disk\nin-tmpfs\nme\n"), "cycle {cycle}");
        }
        rt.kill_and_wait(&id).await.unwrap();
        assert!(!node.dir.join("data/sandboxes").join(&id).exists());
    });
}

#[test]
fn root_concurrent_creates() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let creates = (0..4).map(|_| rt.create(create_req(&[])));
        let infos: Vec<_> = futures::future::join_all(creates).await;
        let mut ids = Vec::new();
        for info in infos {
            let info = info.expect("concurrent create");
            ids.push(info.id.clone());
        }
        for id in &ids {
            let out = run(rt, id, "echo ok").await;
            assert_eq!(out.stdout, "ok\n");
        }
        let ips: std::collections::HashSet<_> =
            ids.iter().map(|id| rt.info(id).unwrap().ip).collect();
        assert_eq!(ips.len(), ids.len(), "every sandbox has its own address");
        for id in &ids {
            rt.kill_and_wait(id).await.unwrap();
        }
    });
}

#[test]
fn root_bad_requests_get_clear_errors() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let err = rt
            .create(CreateRequest {
                template_id: "no-such-template".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        let err = rt
            .create(CreateRequest {
                template_id: "../etc".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        assert!(rt.pause("aaaaaaaaaaaaaaaaaaaa").await.is_err());
        assert!(rt.resume("aaaaaaaaaaaaaaaaaaaa").await.is_err());
        let info = rt.create(create_req(&[])).await.unwrap();
        let err = rt.resume(&info.id).await.unwrap_err();
        assert!(err.to_string().contains("cannot resume"), "{err}");
        rt.kill_and_wait(&info.id).await.unwrap();
    });
}
