//! `GET /metrics`: CPU, memory and disk usage of the sandbox.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use serde::Serialize;

use super::HttpError;

/// How long a CPU sample spans when there is no recent previous one.
const SAMPLE: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
pub struct Metrics {
    ts: i64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    mem_cache: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    disk_used: u64,
    disk_total: u64,
}

/// Aggregate CPU jiffies: (busy + idle, idle).
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    total: u64,
    idle: u64,
}

/// The previous sample, so calls at least `SAMPLE` apart need not wait.
static LAST: Mutex<Option<(Instant, CpuTimes)>> = Mutex::new(None);

pub async fn metrics() -> Result<Json<Metrics>, HttpError> {
    let stat = read("/proc/stat")?;
    let now = parse_cpu(&stat).ok_or_else(|| HttpError::internal("cannot parse /proc/stat"))?;
    let previous = *LAST.lock().unwrap_or_else(|e| e.into_inner());
    let (before, after) = match previous {
        Some((at, before)) if at.elapsed() >= SAMPLE => (before, now),
        _ => {
            tokio::time::sleep(SAMPLE).await;
            let later = parse_cpu(&read("/proc/stat")?)
                .ok_or_else(|| HttpError::internal("cannot parse /proc/stat"))?;
            (now, later)
        }
    };
    *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), after));

    let total = after.total.saturating_sub(before.total);
    let idle = after.idle.saturating_sub(before.idle);
    let cpu_used_pct = if total == 0 {
        0.0
    } else {
        let pct = 100.0 * (total.saturating_sub(idle)) as f64 / total as f64;
        (pct * 100.0).round() / 100.0
    };

    let meminfo = read("/proc/meminfo")?;
    let field = |name: &str| meminfo_kib(&meminfo, name).map(|kib| kib * 1024);
    let mem_total = field("MemTotal").unwrap_or(0);
    let available = field("MemAvailable").unwrap_or_else(|| {
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    let mem_used = mem_total.saturating_sub(available);
    let mem_cache = field("Cached").unwrap_or(0);

    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = s.blocks() * frag;
            let free = s.blocks_free() * frag;
            (total, total.saturating_sub(free))
        }
        Err(e) => {
            tracing::warn!(error = %e, "statvfs / failed");
            (0, 0)
        }
    };

    Ok(Json(Metrics {
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        cpu_count: cpu_count(&stat),
        cpu_used_pct,
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total / (1024 * 1024),
        mem_used_mib: mem_used / (1024 * 1024),
        disk_used,
        disk_total,
    }))
}

fn read(path: &str) -> Result<String, HttpError> {
    std::fs::read_to_string(path).map_err(|e| HttpError::internal(format!("reading {path}: {e}")))
}

/// The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ...
fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    if values.len() < 4 {
        return None;
    }
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        total: values.iter().sum(),
        idle,
    })
}

/// Online CPUs: the `cpuN` lines of /proc/stat.
fn cpu_count(stat: &str) -> u32 {
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    n.max(1)
}

fn meminfo_kib(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 5 0 5 35 5 0 0 0 0 0\ncpu1 5 0 5 35 5 0 0 0 0 0\nintr 1\n";
        let t = parse_cpu(stat).unwrap();
        assert_eq!((t.total, t.idle), (100, 80));
        assert_eq!(cpu_count(stat), 2);
        let mem = "MemTotal:       2048 kB\nMemFree:  1024 kB\nMemAvailable:   1536 kB\n";
        assert_eq!(meminfo_kib(mem, "MemTotal"), Some(2048));
        assert_eq!(meminfo_kib(mem, "MemAvailable"), Some(1536));
        assert_eq!(meminfo_kib(mem, "Mem"), None);
    }
}
