//! Native Redis for reference (the async-fork paper's own setting): a
//! Debian `redis-server` on a free port in a temporary directory, the same
//! dataset (DEBUG POPULATE) and the same load, then one BGSAVE; the snapshot
//! window runs from the BGSAVE request until INFO persistence says the save
//! finished.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::kv_run::{self, ns, Common, Windows};
use crate::load::Load;
use crate::proc::{self, Proc};
use crate::resp::{self, Client};
use crate::stats::{self, Window};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisRun {
    pub memory_mib: u64,
    pub keys: u64,
    pub populate_s: f64,
    pub windows: Windows,
    pub latest_fork_usec: Option<f64>,
    pub bgsave_status: String,
    pub used_memory: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub child_peak_rss_bytes: Option<u64>,
    pub version: String,
    pub load_avg: Option<f64>,
}

pub fn run(c: &Common, redis_server: &str, memory_mib: u64) -> Result<RedisRun> {
    let port = proc::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = tempfile::Builder::new()
        .prefix("redis-")
        .tempdir_in(&c.work_dir)
        .map_err(|e| BenchError::io("create a directory in", &c.work_dir, e))?;
    let server = Proc::spawn(
        Command::new(redis_server).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            &dir.path().to_string_lossy(),
            "--dbfilename",
            "dump.rdb",
        ]),
        "install it with `apt-get install redis-server` (scripts/bench does)",
    )?;
    let r = drive(c, server, addr, memory_mib);
    drop(dir);
    r
}

fn drive(c: &Common, mut server: Proc, addr: SocketAddr, memory_mib: u64) -> Result<RedisRun> {
    let mut ctl = Client::connect(addr, Duration::from_secs(30))?;
    server.check_alive()?;
    let version = ctl
        .info("server")
        .ok()
        .and_then(|i| {
            i.into_iter()
                .find(|(k, _)| k == "redis_version")
                .map(|(_, v)| v)
        })
        .unwrap_or_default();
    let (keys, populate_s) = kv_run::populate(&mut ctl, c, memory_mib)?;
    let used_memory = ctl
        .info("memory")
        .ok()
        .and_then(|i| resp::info_f64(&i, "used_memory"));

    let epoch = Instant::now();
    let load = Load::start(&c.load_config(addr, keys), epoch)?;
    std::thread::sleep(c.warmup);
    let b0 = Instant::now();
    std::thread::sleep(c.baseline);
    let b1 = Instant::now();

    proc::reset_peak_rss(server.pid());
    let s0 = Instant::now();
    let reply = ctl.command(&["BGSAVE"], Duration::from_secs(30))?;
    if reply.first() != Some(&b'+') {
        let _ = load.finish();
        return Err(BenchError::Reply {
            what: "BGSAVE".into(),
            reply: String::from_utf8_lossy(&reply).into_owned(),
        });
    }
    let mut child_peak: Option<u64> = None;
    let done = loop {
        for ch in proc::children(server.pid()) {
            if let Some(p) = proc::peak_rss(ch) {
                child_peak = Some(child_peak.unwrap_or(0).max(p));
            }
        }
        let info = ctl.info("persistence")?;
        if resp::info_f64(&info, "rdb_bgsave_in_progress") == Some(0.0) {
            break (Instant::now(), info);
        }
        if s0.elapsed() > c.snapshot_timeout {
            let _ = load.finish();
            return Err(BenchError::Timeout {
                what: "BGSAVE to finish".into(),
                secs: c.snapshot_timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let peak_rss_bytes = proc::peak_rss(server.pid());
    std::thread::sleep(c.tail);
    let r = load.finish()?;
    let stats_info = ctl.info("stats").unwrap_or_default();
    let baseline = Window {
        start_ns: ns(epoch, b0),
        end_ns: ns(epoch, b1),
    };
    let snapshot = Window {
        start_ns: ns(epoch, s0),
        end_ns: ns(epoch, done.0),
    };
    let bgsave_status = done
        .1
        .iter()
        .find(|(k, _)| k == "rdb_last_bgsave_status")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    server.stop(Duration::from_secs(5));
    Ok(RedisRun {
        memory_mib,
        keys,
        populate_s,
        windows: Windows {
            baseline_latency: stats::summarize(&r.samples, baseline),
            baseline_equal_maxima_us: stats::window_maxima(&r.samples, baseline, snapshot),
            snapshot_latency: stats::summarize(&r.samples, snapshot),
            copy_window: None,
            copy_latency: None,
            baseline,
            snapshot,
            sent: r.sent,
            errors: r.errors,
            unanswered: r.unanswered,
            series: stats::series(&r.samples, c.bucket_ms),
        },
        latest_fork_usec: resp::info_f64(&stats_info, "latest_fork_usec"),
        bgsave_status,
        used_memory,
        peak_rss_bytes,
        child_peak_rss_bytes: child_peak,
        version,
        load_avg: proc::loadavg(),
    })
}
