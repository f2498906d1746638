//! Runtime benchmark: template snapshot, create latency (sequential and
//! concurrent), pause/resume, and idle memory per sandbox.
//! Run as root through `bench/runtime.sh`, which builds envd and the base rootfs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runtime::network::NetworkConfig;
use kiln_runtime::template::TemplateMeta;
use kiln_runtime::{CreateRequest, Runtime, RuntimeConfig};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<44} n={:<3} p50={:>8.1} ms  p99={:>8.1} ms",
        v.len(),
        pct(&v, 0.5).as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3
    );
}

async fn create_and_first_command(rt: &Arc<Runtime>) -> (String, Duration) {
    let t = Instant::now();
    let info = rt
        .create(CreateRequest {
            template_id: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let out = rt
        .envd(&info.id)
        .unwrap()
        .run("true", "user", Duration::from_secs(30))
        .await
        .expect("first command");
    assert_eq!(out.exit_code, 0);
    (info.id, t.elapsed())
}

/// memory.usage_in_bytes of a sandbox's cgroup (v1), or memory.current (v2).
fn cgroup_memory(id: &str) -> Option<u64> {
    for p in [
        format!("/sys/fs/cgroup/memory/kiln/{id}/memory.usage_in_bytes"),
        format!("/sys/fs/cgroup/kiln/{id}/memory.current"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&p) {
            return s.trim().parse().ok();
        }
    }
    None
}

fn main() {
    let base = std::env::var("KILN_TEST_BASE_ROOTFS")
        .unwrap_or_else(|_| "/var/lib/kiln/cache/base-rootfs".into());
    let envd = std::env::var("KILN_TEST_ENVD").expect("KILN_TEST_ENVD");
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let conc: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let dir = PathBuf::from(format!("/var/tmp/kiln-bench-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(dir.join("data"), dir.join("run"));
    cfg.network = NetworkConfig {
        subnet: "10.215.0.0/16".parse().unwrap(),
        table_name: "kiln_bench".into(),
        name_prefix: "kbn".into(),
        ..NetworkConfig::default()
    };
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let rt = Runtime::start(cfg).expect("runtime");
    rt.create_template(&TemplateMeta::new("bench"), base.as_ref(), envd.as_ref())
        .expect("template");
    tokio.block_on(async {
        let mut snaps = Vec::new();
        for _ in 0..3 {
            snaps.push(rt.snapshot_template("bench").await.expect("snapshot"));
        }
        summary("template snapshot (cold boot + checkpoint)", snaps);

        let mut seq = Vec::new();
        for _ in 0..n {
            let (id, took) = create_and_first_command(&rt).await;
            seq.push(took);
            rt.kill(&id).await.unwrap();
            // Let the background teardown finish so runs do not overlap.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        summary("create → first command, concurrency 1", seq);

        let t = Instant::now();
        let all = futures::future::join_all((0..conc).map(|_| create_and_first_command(&rt))).await;
        let wall = t.elapsed();
        let ids: Vec<String> = all.iter().map(|(id, _)| id.clone()).collect();
        summary(&format!("create → first command, concurrency {conc}"), all.into_iter().map(|(_, d)| d).collect());
        println!("{:<44} {:.1} ms for {conc}", "  wall time", wall.as_secs_f64() * 1e3);

        tokio::time::sleep(Duration::from_secs(3)).await;
        let mems: Vec<u64> = ids.iter().filter_map(|id| cgroup_memory(id)).collect();
        if !mems.is_empty() {
            let avg = mems.iter().sum::<u64>() as f64 / mems.len() as f64 / 1048576.0;
            println!("{:<44} {avg:.1} MiB (cgroup memory, {} sandboxes)", "idle memory per sandbox", mems.len());
        }

        let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
        let id = &ids[0];
        for _ in 0..5 {
            pauses.push(rt.pause(id).await.expect("pause"));
            resumes.push(rt.resume(id).await.expect("resume"));
        }
        summary("pause (checkpoint of an idle sandbox)", pauses);
        summary("resume (restore until envd answers)", resumes);
        let mut mem_pauses = Vec::new();
        let mut mem_resumes = Vec::new();
        for mb in [10, 100, 500] {
            let client = rt.envd(id).unwrap();
            client
                .run("pkill -f memhold; true", "user", Duration::from_secs(10))
                .await
                .unwrap();
            client
                .start_background(
                    &format!("exec -a memhold python3 -c \"import os,time; b=os.urandom({mb}*1048576); time.sleep(10**6)\""),
                    "user",
                    &format!("mem{mb}"),
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let p = rt.pause(id).await.expect("pause with memory");
            let r = rt.resume(id).await.expect("resume with memory");
            println!("{:<44} pause {:>7.1} ms  resume {:>7.1} ms", format!("holding {mb} MiB"), p.as_secs_f64() * 1e3, r.as_secs_f64() * 1e3);
            mem_pauses.push(p);
            mem_resumes.push(r);
        }
        for id in &ids {
            rt.kill_and_wait(id).await.unwrap();
        }
    });
    let _ = rt.shutdown_network();
    let _ = std::fs::remove_dir_all(&dir);
}
