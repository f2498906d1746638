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

/// The base rootfs and the static envd that templates are made of.
fn template_inputs() -> (String, String) {
    let base = std::env::var("KILN_TEST_BASE_ROOTFS")
        .unwrap_or_else(|_| "/var/lib/kiln/cache/base-rootfs".into());
    let envd = std::env::var("KILN_TEST_ENVD")
        .expect("KILN_TEST_ENVD must name a static envd binary (scripts/build-envd.sh)");
    (base, envd)
}

/// Makes and snapshots template `name` with the resources `set` gives it, and
/// creates a sandbox of it.
async fn sandbox_of_new_template(
    rt: &Arc<Runtime>,
    name: &str,
    set: impl FnOnce(&mut kiln_runtime::Resources),
) -> kiln_runtime::SandboxInfo {
    let (base, envd) = template_inputs();
    let mut meta = TemplateMeta::new(name);
    set(&mut meta.resources);
    rt.create_template(&meta, base.as_ref(), envd.as_ref())
        .unwrap();
    rt.snapshot_template(name).await.unwrap();
    rt.create(CreateRequest {
        template_id: name.into(),
        ..create_req(&[])
    })
    .await
    .unwrap()
}

static NODE: LazyLock<Node> = LazyLock::new(|| {
    let (base, envd) = template_inputs();
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

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
        let spare = spare_names(rt);
        let leftovers: Vec<_> = std::fs::read_dir(&netns)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            leftovers
                .iter()
                .all(|n: &String| !n.starts_with("krt") || spare.contains(n)),
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
        for cycle in 0..env_or("KILN_TEST_PAUSE_CYCLES", 100) {
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
        let creates = (0..env_or("KILN_TEST_CONCURRENT", 20)).map(|_| rt.create(create_req(&[])));
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

/// netns and host veth names of the slots kept ready ahead (not leftovers).
fn spare_names(rt: &Runtime) -> Vec<String> {
    let spare = rt.network().spare_slots();
    assert!(
        spare.len() <= test_network().spare_slots as usize,
        "{spare:?}"
    );
    spare
        .iter()
        .flat_map(|s| [s.netns_name.clone(), s.netns_name.replacen("-s", "-h", 1)])
        .collect()
}

/// What a sandbox could leave behind on the host, for sandboxes of this node.
fn leftovers(node: &Node, ids: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let spare = spare_names(&node.rt);
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    found.extend(
        names("/var/run/netns")
            .into_iter()
            .filter(|n| n.starts_with("krt-") && !spare.contains(n))
            .map(|n| format!("netns {n}")),
    );
    found.extend(
        names("/sys/class/net")
            .into_iter()
            .filter(|n| n.starts_with("krt-") && !spare.contains(n))
            .map(|n| format!("interface {n}")),
    );
    for sub in ["run/sandboxes", "data/sandboxes"] {
        let dir = node.dir.join(sub);
        found.extend(
            names(dir.to_str().unwrap())
                .into_iter()
                .map(|n| format!("{sub}/{n}")),
        );
    }
    let nft = std::process::Command::new("nft")
        .args(["list", "table", "inet", "kiln_rt_test"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&nft.stdout);
    found.extend(
        rules
            .lines()
            .filter(|l| l.trim_start().starts_with("chain sbx-"))
            .map(|l| format!("nft {}", l.trim())),
    );
    // Loop devices of writable layers (their images are unlinked once attached).
    for dev in names("/sys/block")
        .into_iter()
        .filter(|n| n.starts_with("loop"))
    {
        let backing = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
            .unwrap_or_default();
        if backing.contains(node.dir.to_str().unwrap()) {
            found.push(format!("loop device {dev}: {}", backing.trim()));
        }
    }
    found.extend(
        names(node.dir.join("data/layers").to_str().unwrap())
            .into_iter()
            .filter(|n| !n.starts_with("empty-"))
            .map(|n| format!("layer image {n}")),
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let run_dir = node.dir.join("run");
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(run_dir.to_str().unwrap()))
            .map(|l| format!("mount {l}")),
    );
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    for id in ids {
        if ps.lines().any(|l| l.contains(id.as_str())) {
            found.push(format!("process of {id}"));
        }
        for cg in [
            format!("/sys/fs/cgroup/memory/kiln/{id}"),
            format!("/sys/fs/cgroup/kiln/{id}"),
        ] {
            if std::path::Path::new(&cg).exists() {
                found.push(cg);
            }
        }
    }
    found
}

#[test]
fn root_create_kill_cycles_leave_nothing_behind() {
    let (node, _g) = node();
    let rt = &node.rt;
    let cycles = env_or("KILN_TEST_CREATE_CYCLES", 100);
    TOKIO.block_on(async {
        let mut all = Vec::new();
        let mut done = 0;
        while done < cycles {
            let batch = (cycles - done).min(10);
            let mut ids = Vec::new();
            for _ in 0..batch {
                let info = rt.create(create_req(&[])).await.unwrap();
                ids.push(info.id);
            }
            run(rt, &ids[0], "echo alive").await;
            let kills = ids.iter().map(|id| rt.kill_and_wait(id));
            for r in futures::future::join_all(kills).await {
                r.unwrap();
            }
            all.extend(ids);
            done += batch;
        }
        let left = leftovers(node, &all);
        assert!(
            left.is_empty(),
            "left behind after {cycles} create/kill cycles: {left:?}"
        );
    });
}

#[test]
fn root_writable_layer_is_size_limited() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let sbx = sandbox_of_new_template(rt, "small-disk", |r| r.disk_mb = 64).await;
        let id = sbx.id.as_str();
        let client = rt.envd(id).unwrap();
        let write = |path: &'static str| {
            let client = client.clone();
            async move {
                client
                    .run(
                        &format!("dd if=/dev/zero of={path} bs=1M count=100 2>&1; echo rc=$?; stat -c %s {path}"),
                        "user",
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap()
            }
        };
        // Past the limit: the write fails, the file stops short, the sandbox lives.
        let out = write("/home/user/big").await;
        assert!(!out.stdout.contains("rc=0"), "100 MiB fit in a 64 MiB layer: {out:?}");
        let size: u64 = out.stdout.lines().last().unwrap().trim().parse().unwrap();
        assert!(size <= 64 * 1024 * 1024, "{out:?}");
        let stats = rt.stats(id).unwrap();
        assert_eq!(stats.disk_limit_bytes, 64 * 1024 * 1024, "{stats:?}");
        assert!(stats.disk_bytes > 32 * 1024 * 1024, "{stats:?}");
        // /tmp is part of the same layer, which is full.
        let out = write("/tmp/big").await;
        assert!(!out.stdout.contains("rc=0"), "{out:?}");
        // Freed space can be used again.
        run(rt, id, "rm -f /home/user/big /tmp/big; echo kept > /home/user/kept").await;
        let out = run(rt, id, "dd if=/dev/zero of=/tmp/ok bs=1M count=20 2>&1; cat /home/user/kept").await;
        assert!(out.stdout.contains("kept"), "{out:?}");
        // The limit and the files survive a pause and resume.
        rt.pause(id).await.unwrap();
        rt.resume(id).await.unwrap();
        let out = run(rt, id, "cat /home/user/kept; stat -c %s /tmp/ok").await;
        assert_eq!(out.stdout, format!("kept\n{}\n", 20 * 1024 * 1024));
        let client = rt.envd(id).unwrap();
        let out = client
            .run(
                "dd if=/dev/zero of=/home/user/big bs=1M count=100 2>&1; echo rc=$?",
                "user",
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(!out.stdout.contains("rc=0"), "after resume: {out:?}");
        assert_eq!(rt.stats(id).unwrap().disk_limit_bytes, 64 * 1024 * 1024);
        rt.kill_and_wait(id).await.unwrap();
    });
    rt.delete_template("small-disk").unwrap();
}

/// The writable layer is on disk: files may outgrow the sandbox's memory
/// (with a tmpfs layer this sandbox was OOM-killed).
#[test]
fn root_files_can_outgrow_memory() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let sbx = sandbox_of_new_template(rt, "small-memory", |r| {
            r.memory_mb = 256;
            r.disk_mb = 2048;
        })
        .await;
        let id = sbx.id.as_str();
        let client = rt.envd(id).unwrap();
        // 600 MiB of files in a sandbox of 256 MiB, half of it in /tmp.
        let out = client
            .run(
                "set -e; yes kiln-tmp | head -c 300M > /tmp/a; yes kiln-home | head -c 300M > ~/b; \
                 md5sum /tmp/a ~/b | cut -d' ' -f1",
                "user",
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{out:?}");
        let sums = out.stdout.clone();
        assert_eq!(sums.lines().count(), 2, "{out:?}");
        let stats = rt.stats(id).unwrap();
        assert!(stats.disk_bytes > 600 * 1024 * 1024, "{stats:?}");
        // The files' page cache is not reported as the sandbox's memory
        // (measured: ~20 MiB here, while the cgroup's usage was at its limit).
        assert!(stats.memory_bytes < 192 * 1024 * 1024, "{stats:?}");
        assert_eq!(stats.disk_limit_bytes, 2048 * 1024 * 1024, "{stats:?}");
        assert_eq!(rt.info(id).unwrap().state, SandboxState::Running);
        // The files survive a pause and resume.
        rt.pause(id).await.unwrap();
        rt.resume(id).await.unwrap();
        let out = run(rt, id, "md5sum /tmp/a ~/b | cut -d' ' -f1").await;
        assert_eq!(out.stdout, sums);
        rt.kill_and_wait(id).await.unwrap();
        let left = leftovers(node, &[id.to_string()]);
        assert!(left.is_empty(), "{left:?}");
    });
    rt.delete_template("small-memory").unwrap();
}

#[test]
fn root_sudo_works_for_sudoers_only() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let sbx = rt.create(create_req(&[("KEEP_ME", "kept")])).await.unwrap();
        let id = sbx.id.as_str();
        let client = rt.envd(id).unwrap();
        let sh = |cmd: &'static str| {
            let client = client.clone();
            async move {
                client
                    .run(cmd, "user", Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("{cmd}: {e}"))
            }
        };
        let out = sh("ls -l /usr/bin/sudo; sudo id -u; sudo -u nobody id -un; echo secret | sudo tee /root/f >/dev/null; sudo cat /root/f; cat /root/f 2>&1 || echo denied-as-user").await;
        assert_eq!(out.exit_code, 0, "{out:?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(lines[0].ends_with("/usr/bin/sudo -> envd"), "{out:?}");
        assert_eq!(&lines[1..], ["0", "nobody", "secret", "cat: /root/f: Permission denied", "denied-as-user"], "{out:?}");
        // Exit codes and the environment: reset unless -E; VAR=value is passed.
        let out = sh("sudo sh -c 'exit 5'").await;
        assert_eq!(out.exit_code, 5, "{out:?}");
        let out = sh("sudo FOO=bar sh -c 'echo $FOO-$KEEP_ME-$HOME-$SUDO_USER'; sudo -E sh -c 'echo $KEEP_ME'").await;
        assert_eq!(out.stdout, "bar--/root-user\nkept\n", "{out:?}");
        // Only sudoers: nobody is not one.
        let out = sh("sudo -u nobody sudo id; echo rc=$?").await;
        assert!(out.stderr.contains("nobody is not in the sudoers file"), "{out:?}");
        assert!(out.stdout.contains("rc=1"), "{out:?}");
        // The socket survives a pause and resume.
        rt.pause(id).await.unwrap();
        rt.resume(id).await.unwrap();
        let out = rt
            .envd(id)
            .unwrap()
            .run("sudo apt-get --version >/dev/null && sudo whoami", "user", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(out.stdout, "root\n", "{out:?}");
        rt.kill_and_wait(id).await.unwrap();
    });
}

#[test]
fn root_memory_limit_is_enforced_and_reported() {
    let (node, _g) = node();
    let rt = &node.rt;
    TOKIO.block_on(async {
        let victim = rt.create(create_req(&[])).await.unwrap();
        let bystander = rt.create(create_req(&[])).await.unwrap();
        // The template's limit is 512 MiB; ask for 2 GiB and touch it.
        let client = rt.envd(&victim.id).unwrap();
        let out = client
            .run(
                "python3 -c \"b = bytearray(2048 * 1024 * 1024); print('allocated', len(b))\"",
                "user",
                Duration::from_secs(60),
            )
            .await;
        match out {
            // The allocation failed or the process was killed inside the sandbox.
            Ok(o) => {
                assert_ne!(o.exit_code, 0, "2 GiB fit in a 512 MiB sandbox: {o:?}");
                eprintln!("memory limit: the process failed inside the sandbox: {o:?}");
            }
            // gVisor's kernel is one host process: the memcg OOM killer may kill
            // the whole sandbox, which must then be reported.
            Err(_) => {
                let mut state = None;
                for _ in 0..100 {
                    let info = rt.info(&victim.id).unwrap();
                    if info.state == SandboxState::Exited {
                        state = Some(info);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let info = state.expect("a sandbox that died must be reported as exited");
                assert_eq!(info.exit_reason.as_deref(), Some("out of memory"));
                eprintln!("memory limit: the sandbox was killed and reported: {info:?}");
            }
        }
        // The host and the other sandbox are unharmed.
        assert_eq!(run(rt, &bystander.id, "echo fine").await.stdout, "fine\n");
        rt.kill_and_wait(&victim.id).await.unwrap();
        rt.kill_and_wait(&bystander.id).await.unwrap();
    });
}

/// A node of its own (dir, base rootfs, envd, config by platform) for tests
/// that restart it, on a subnet no other test suite uses.
fn own_node(
    name: &str,
    subnet: &'static str,
    prefix: &'static str,
) -> (PathBuf, String, String, impl Fn(&str) -> RuntimeConfig) {
    let (base, envd) = template_inputs();
    let dir = PathBuf::from(format!(
        "/var/tmp/kiln-rt-test-{}-{name}",
        std::process::id()
    ));
    let table = format!("kiln_rt_{name}");
    let d = dir.clone();
    let config = move |platform: &str| {
        let mut cfg = RuntimeConfig::new(d.join("data"), d.join("run"));
        cfg.platform = platform.into();
        cfg.network = NetworkConfig {
            subnet: subnet.parse().unwrap(),
            table_name: table.clone(),
            name_prefix: prefix.into(),
            ..NetworkConfig::default()
        };
        cfg
    };
    (dir, base, envd, config)
}

#[test]
fn root_restart_recovers_running_and_paused_sandboxes() {
    // A node of its own, so that "restarting" it does not disturb the others.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = &*NODE;
    // Not 10.218: root_build (kiln-templates) uses that one.
    let (dir, base, envd, config) = own_node("restart", "10.224.0.0/16", "krr");
    let config = || config("systrap");
    TOKIO.block_on(async {
        let first = Runtime::start(config()).unwrap();
        first
            .create_template(&TemplateMeta::new(TEMPLATE), base.as_ref(), envd.as_ref())
            .unwrap();
        first.snapshot_template(TEMPLATE).await.unwrap();
        let running = first.create(create_req(&[])).await.unwrap().id;
        let paused = first.create(create_req(&[])).await.unwrap().id;
        run(&first, &running, "echo kept > ~/kept.txt").await;
        run(&first, &paused, "echo kept-too > ~/kept.txt").await;
        first.pause(&paused).await.unwrap();
        // Leftovers of a crash: a half-made sandbox record with nothing behind it.
        let ghost = dir.join("data/sandboxes/ghostghostghostghost");
        std::fs::create_dir_all(&ghost).unwrap();
        let mut record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                dir.join("data/sandboxes")
                    .join(&running)
                    .join("record.json"),
            )
            .unwrap(),
        )
        .unwrap();
        record["id"] = "ghostghostghostghost".into();
        record["container_id"] = "ghostghostghostghost".into();
        record["state"] = "creating".into();
        record["slot"] = serde_json::Value::Null;
        record["pid"] = serde_json::Value::Null;
        std::fs::write(ghost.join("record.json"), record.to_string()).unwrap();

        // The server process restarts: a new runtime over the same directories.
        // (A dead process's background teardowns die with it; here the old
        // runtime lives on in this process, so let them finish first, or they
        // would free network slots the new runtime hands out again.)
        first.wait_for_teardowns();
        drop(first);
        let second = Runtime::start(config()).unwrap();
        let states: std::collections::HashMap<String, SandboxState> =
            second.list().into_iter().map(|s| (s.id, s.state)).collect();
        assert_eq!(states.get(&running), Some(&SandboxState::Running));
        assert_eq!(states.get(&paused), Some(&SandboxState::Paused));
        assert!(!states.contains_key("ghostghostghostghost"));
        assert!(!ghost.exists());
        assert_eq!(
            run(&second, &running, "cat ~/kept.txt").await.stdout,
            "kept\n"
        );
        second.resume(&paused).await.unwrap();
        assert_eq!(
            run(&second, &paused, "cat ~/kept.txt").await.stdout,
            "kept-too\n"
        );
        second.kill_and_wait(&running).await.unwrap();
        second.kill_and_wait(&paused).await.unwrap();
        second.shutdown_network().unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn root_ptrace_platform_and_snapshots_per_platform() {
    // A node of its own: it is restarted with another platform.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = &*NODE;
    let (dir, base, envd, config) = own_node("platform", "10.223.0.0/16", "krp");
    TOKIO.block_on(async {
        let ptrace = Runtime::start(config("ptrace")).unwrap();
        ptrace
            .create_template(&TemplateMeta::new(TEMPLATE), base.as_ref(), envd.as_ref())
            .unwrap();
        ptrace.snapshot_template(TEMPLATE).await.unwrap();
        assert!(ptrace.has_snapshot(TEMPLATE));
        let id = ptrace.create(create_req(&[])).await.unwrap().id;
        assert_eq!(run(&ptrace, &id, "echo $((6*7))").await.stdout, "42\n");
        ptrace.pause(&id).await.unwrap();
        ptrace.wait_for_teardowns();
        drop(ptrace);

        // Back on systrap: the template's snapshot is taken again on the
        // first create; the sandbox paused on ptrace cannot resume here.
        let systrap = Runtime::start(config("systrap")).unwrap();
        assert!(!systrap.has_snapshot(TEMPLATE));
        assert!(systrap.has_foreign_snapshot(TEMPLATE));
        let other = systrap.create(create_req(&[])).await.unwrap().id;
        assert!(systrap.has_snapshot(TEMPLATE));
        assert_eq!(run(&systrap, &other, "echo ok").await.stdout, "ok\n");
        let err = systrap.resume(&id).await.unwrap_err().to_string();
        assert!(err.contains("ptrace"), "{err}");
        systrap.kill_and_wait(&other).await.unwrap();
        systrap.kill_and_wait(&id).await.unwrap();
        systrap.shutdown_network().unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}
