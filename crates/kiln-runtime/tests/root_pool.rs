//! Warm pool, freezer and usage tests with real gVisor sandboxes. They need
//! root, `runsc`, a base root filesystem (`KILN_TEST_BASE_ROOTFS`, default
//! `/var/lib/kiln/cache/base-rootfs`) and a static envd (`KILN_TEST_ENVD`);
//! `scripts/test.sh` provides all of them.
//!
//! Own subnet, firewall table, name prefix and data directory, so this binary
//! can run beside the other runtime tests. Tests run one at a time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use kiln_runtime::network::NetworkConfig;
use kiln_runtime::template::TemplateMeta;
use kiln_runtime::{CreateRequest, Runtime, RuntimeConfig, SandboxState};

const TEMPLATE: &str = "pool-base";
const PREFIX: &str = "kpt";

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
    let dir = PathBuf::from(format!("/var/tmp/kiln-pool-test-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(dir.join("data"), dir.join("run"));
    cfg.network = NetworkConfig {
        subnet: "10.217.0.0/16".parse().unwrap(),
        table_name: "kiln_pool_test".into(),
        name_prefix: PREFIX.into(),
        ..NetworkConfig::default()
    };
    let rt = Runtime::start(cfg).expect("starting the runtime");
    rt.create_template(&TemplateMeta::new(TEMPLATE), base.as_ref(), envd.as_ref())
        .expect("creating the template");
    let took = TOKIO
        .block_on(rt.snapshot_template(TEMPLATE))
        .expect("snapshotting the template");
    eprintln!("template snapshot took {took:?}");
    Node { rt, dir }
});

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());
/// Tests in this file; the last one to finish cleans the node up.
const TESTS: usize = 3;
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// Held by a running test: serialises tests, and after the last one removes
/// the node's firewall table and directory (unless containers were left
/// behind by a failure: those stay for inspection).
struct Turn {
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == TESTS && containers(&NODE.dir).is_empty()
        {
            let _ = NODE.rt.shutdown_network();
            let _ = std::fs::remove_dir_all(&NODE.dir);
        }
    }
}

fn node() -> (&'static Node, Turn) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    (&NODE, Turn { _serial: guard })
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
        access_token: Some("pool-token-456".into()),
        ..Default::default()
    }
}

/// Waits until the pool holds `n` ready sandboxes.
async fn wait_filled(rt: &Arc<Runtime>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = rt.pool_status(TEMPLATE);
        if status.ready.len() == n {
            return status.ready;
        }
        assert!(
            Instant::now() < deadline,
            "pool did not fill to {n}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A container's cgroup file, v1 (per controller) or v2 (unified).
fn cgroup_file(controller: &str, cid: &str, v1: &str, v2: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/kiln/{cid}/{v1}"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/kiln/{cid}/{v2}")))
        .ok()
}

/// Whether the kernel's freezer holds the container frozen.
fn frozen(cid: &str) -> bool {
    match cgroup_file("freezer", cid, "freezer.state", "cgroup.events") {
        Some(s) if s.trim() == "FROZEN" => true,
        Some(s) => s.lines().any(|l| l.trim() == "frozen 1"),
        None => panic!("no freezer cgroup for {cid}"),
    }
}

fn cpu_ns(cid: &str) -> u64 {
    cgroup_file("cpuacct", cid, "cpuacct.usage", "cpu.stat")
        .and_then(|s| {
            s.trim().parse().ok().or_else(|| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us * 1000)
            })
        })
        .unwrap_or_else(|| panic!("no cpu usage for {cid}"))
}

/// Containers runsc knows under this node's root.
fn containers(dir: &Path) -> HashSet<String> {
    let out = std::process::Command::new("runsc")
        .arg(format!("--root={}", dir.join("run/runsc").display()))
        .args(["list", "-quiet"])
        .output()
        .expect("runsc list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// netns of this node's sandboxes (not the slots kept ready ahead).
fn our_netns(rt: &Runtime) -> Vec<String> {
    let spare: Vec<String> = rt
        .network()
        .spare_slots()
        .into_iter()
        .map(|s| s.netns_name)
        .collect();
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX) && !spare.contains(n))
                .collect()
        })
        .unwrap_or_default()
}

async fn assert_pool_gone(node: &Node, live: &[&str]) {
    let rt = &node.rt;
    rt.set_pool_size(TEMPLATE, 0).await.unwrap();
    let status = rt.pool_status(TEMPLATE);
    assert!(status.ready.is_empty(), "{status:?}");
    let expect: HashSet<String> = live.iter().map(|id| rt.container_id(id).unwrap()).collect();
    // Teardowns the runtime started in the background (a discarded broken
    // sandbox, the snapshot's container) may still be finishing.
    let deadline = Instant::now() + Duration::from_secs(15);
    while (containers(&node.dir) != expect || our_netns(rt).len() != live.len())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(containers(&node.dir), expect, "only live sandboxes remain");
    assert_eq!(our_netns(rt).len(), live.len(), "{:?}", our_netns(rt));
}

#[test]
fn root_pool_fills_frozen_hands_out_and_refills() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        rt.set_pool_size(TEMPLATE, 2).await.unwrap();
        let pooled = wait_filled(rt, 2).await;
        // Frozen: the kernel says so, and no CPU time accrues.
        for cid in &pooled {
            assert!(frozen(cid), "{cid} is not frozen");
        }
        let before: Vec<u64> = pooled.iter().map(|c| cpu_ns(c)).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after: Vec<u64> = pooled.iter().map(|c| cpu_ns(c)).collect();
        assert_eq!(before, after, "frozen sandboxes used CPU");
        // Pooled sandboxes are nobody's: list() does not show them.
        assert!(rt.list().is_empty(), "{:?}", rt.list());

        let t = Instant::now();
        let a = rt
            .create(create_req(&[("POOL_VAR", "from-pool")]))
            .await
            .unwrap();
        let handed_out = t.elapsed();
        let out = run(rt, &a.id, "echo $POOL_VAR; whoami; hostname").await;
        let first_command = t.elapsed();
        eprintln!("pooled create: {handed_out:?}, → first command: {first_command:?}");
        assert_eq!(
            out.stdout,
            format!("from-pool\nuser\nkiln-{}\n", &a.id[..8])
        );
        assert_eq!(a.state, SandboxState::Running);
        let cid_a = rt.container_id(&a.id).unwrap();
        assert!(
            pooled.contains(&cid_a),
            "{cid_a} did not come from the pool"
        );
        assert_ne!(cid_a, a.id);
        assert!(!frozen(&cid_a));
        // The token was applied: envd refuses requests without it.
        let resp = reqwest::Client::new()
            .get(format!("http://{}/envs", a.envd_addr.unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        let b = rt.create(create_req(&[])).await.unwrap();
        let cid_b = rt.container_id(&b.id).unwrap();
        assert!(
            pooled.contains(&cid_b),
            "{cid_b} did not come from the pool"
        );
        let entropy = "head -c 16 /dev/urandom | od -An -tx1";
        let ea = run(rt, &a.id, entropy).await.stdout;
        let eb = run(rt, &b.id, entropy).await.stdout;
        assert_ne!(ea, eb, "two sandboxes of one snapshot share random state");
        let ids: HashSet<String> = rt.list().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, HashSet::from([a.id.clone(), b.id.clone()]));

        // The pool refills with new containers.
        let refilled = wait_filled(rt, 2).await;
        assert!(refilled.iter().all(|c| !pooled.contains(c)));
        for cid in &refilled {
            assert!(frozen(cid), "{cid} is not frozen");
        }

        // Pause and resume work on a sandbox whose container id is not its id.
        rt.pause(&a.id).await.unwrap();
        rt.resume(&a.id).await.unwrap();
        let out = run(rt, &a.id, "echo $POOL_VAR").await;
        assert_eq!(out.stdout, "from-pool\n");

        assert_pool_gone(node, &[&a.id, &b.id]).await;
        rt.kill_and_wait(&a.id).await.unwrap();
        rt.kill_and_wait(&b.id).await.unwrap();
        assert!(containers(&node.dir).is_empty());
        assert!(our_netns(rt).is_empty(), "{:?}", our_netns(rt));
    });
}

#[test]
fn root_stats_of_a_running_sandbox() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let info = rt.create(create_req(&[])).await.unwrap();
        run(rt, &info.id, "head -c 20000000 /dev/urandom | sha256sum").await;
        let stats = rt.stats(&info.id).unwrap();
        eprintln!("stats: {stats:?}");
        assert!(stats.cpu_usage_ns > 0, "{stats:?}");
        assert!(stats.memory_bytes > 0, "{stats:?}");
        assert_eq!(stats.memory_limit_bytes, 512 * 1024 * 1024);
        assert_eq!(stats.oom_kills, 0);
        rt.pause(&info.id).await.unwrap();
        assert!(
            rt.stats(&info.id).is_err(),
            "a paused sandbox has no cgroup"
        );
        assert!(rt.stats("aaaaaaaaaaaaaaaaaaaa").is_err());
        rt.kill_and_wait(&info.id).await.unwrap();
    });
}

#[test]
fn root_pool_survives_broken_sandboxes_and_snapshot_refresh() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        rt.set_pool_size(TEMPLATE, 1).await.unwrap();
        let broken = wait_filled(rt, 1).await.remove(0);
        // Kill the pooled container behind the runtime's back.
        let cg = format!("/sys/fs/cgroup/freezer/kiln/{broken}/freezer.state");
        if Path::new(&cg).exists() {
            std::fs::write(&cg, "THAWED").unwrap();
        } else {
            std::fs::write(format!("/sys/fs/cgroup/kiln/{broken}/cgroup.freeze"), "0").unwrap();
        }
        let status = std::process::Command::new("runsc")
            .arg(format!("--root={}", node.dir.join("run/runsc").display()))
            .args(["kill", &broken, "KILL"])
            .status()
            .unwrap();
        assert!(status.success());
        // The create notices, discards it and restores instead.
        let a = rt.create(create_req(&[("X", "y")])).await.unwrap();
        assert_ne!(rt.container_id(&a.id).unwrap(), broken);
        assert_eq!(run(rt, &a.id, "echo $X").await.stdout, "y\n");
        rt.kill_and_wait(&a.id).await.unwrap();

        // A refreshed snapshot drains the pool of old-snapshot sandboxes.
        let old = wait_filled(rt, 1).await.remove(0);
        rt.snapshot_template(TEMPLATE).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let fresh = loop {
            let ready = rt.pool_status(TEMPLATE).ready;
            if ready.len() == 1 && ready[0] != old {
                break ready[0].clone();
            }
            assert!(Instant::now() < deadline, "old sandbox still pooled");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(!containers(&node.dir).contains(&old));
        let b = rt.create(create_req(&[])).await.unwrap();
        assert_eq!(rt.container_id(&b.id).unwrap(), fresh);
        run(rt, &b.id, "true").await;

        assert_pool_gone(node, &[&b.id]).await;
        rt.kill_and_wait(&b.id).await.unwrap();
        assert!(containers(&node.dir).is_empty());
        assert!(our_netns(rt).is_empty(), "{:?}", our_netns(rt));
    });
}
