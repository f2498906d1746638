//! Diagnostic: pause/resume a sandbox in a loop until it fails.
//! `KILN_TEST_ENVD=... cargo run --example pause_stress` (root).

use std::path::PathBuf;
use std::time::Duration;

use kiln_runtime::network::NetworkConfig;
use kiln_runtime::template::TemplateMeta;
use kiln_runtime::{CreateRequest, Runtime, RuntimeConfig};

fn main() {
    let base = std::env::var("KILN_TEST_BASE_ROOTFS")
        .unwrap_or_else(|_| "/var/lib/kiln/cache/base-rootfs".into());
    let envd = std::env::var("KILN_TEST_ENVD").expect("KILN_TEST_ENVD");
    let cycles: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let busy = std::env::var_os("BUSY").is_some();
    let dir = PathBuf::from(format!("/var/tmp/kiln-stress-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(dir.join("data"), dir.join("run"));
    cfg.network = NetworkConfig {
        subnet: "10.216.0.0/16".parse().unwrap(),
        table_name: "kiln_stress".into(),
        name_prefix: "kst".into(),
        ..NetworkConfig::default()
    };
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let rt = Runtime::start(cfg).unwrap();
    rt.create_template(&TemplateMeta::new("s"), base.as_ref(), envd.as_ref())
        .unwrap();
    tokio.block_on(async {
        rt.snapshot_template("s").await.unwrap();
        let info = rt
            .create(CreateRequest {
                template_id: "s".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let id = info.id;
        let c = rt.envd(&id).unwrap();
        c.start_background(
            "python3 -c 'import time\nwhile True: time.sleep(3600)'",
            "user",
            "idle",
        )
        .await
        .unwrap();
        if busy {
            c.start_background(
                "while true; do date >> /tmp/busy; sleep 0.05; done",
                "user",
                "busy",
            )
            .await
            .unwrap();
        }
        for i in 0..cycles {
            let p = rt.pause(&id).await;
            let r = match p {
                Ok(_) => rt.resume(&id).await,
                Err(e) => {
                    println!("cycle {i}: pause failed: {e}");
                    break;
                }
            };
            match r {
                Ok(d) => {
                    let out = rt
                        .envd(&id)
                        .unwrap()
                        .run("echo ok", "user", Duration::from_secs(10))
                        .await;
                    println!(
                        "cycle {i}: resumed in {d:?}, run: {:?}",
                        out.map(|o| o.stdout)
                    );
                }
                Err(e) => {
                    println!("cycle {i}: resume failed: {e}");
                    println!("dir {}", dir.display());
                    return;
                }
            }
        }
        rt.kill_and_wait(&id).await.unwrap();
    });
}
