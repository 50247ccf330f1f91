//! Command line: clap definitions and the parsing/validation of values.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::layout;
use crate::memory::PageBacking;

mod client;
pub use client::*;

#[derive(Debug, Parser)]
#[command(
    name = "snapvm",
    version,
    about = "A small KVM virtual machine monitor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: boxing `RunArgs` would save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and run it until it powers off.
    Run(RunArgs),
    /// Write the bundled guest kernel (a PVH ELF) to PATH, e.g. to boot it under QEMU.
    GuestElf(GuestElfArgs),
    /// Snapshots of a running snapvm, through its API socket.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Pause, resume or inspect a running snapvm's VM, through its API socket.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Load a snapshot into a snapvm started with --no-boot.
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct GuestElfArgs {
    /// Where to write the ELF; an existing file is not overwritten.
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: an ELF with a PVH entry note, or a bzImage (default: the embedded snapvm guest).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM: 512M, 4G, 1024K or plain bytes; rounded up to 2 MiB
    /// [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Host CPUs the guest runs on (its vCPU threads and its vsock device
    /// thread), as taskset lists them: `1`, `2-3`, `0,2`. Snapshot copiers
    /// then run on the other CPUs, so a copy never shares a core with the
    /// guest. Default: no pinning.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<snapvm_snapshot::CpuSet>,
    /// Back guest RAM with transparent huge pages (`on`, MADV_HUGEPAGE),
    /// with 4 KiB pages only (`off`, MADV_NOHUGEPAGE), or with 2 MiB pages
    /// from the hugetlbfs pool (`hugetlbfs`, reserved at start: set
    /// vm.nr_hugepages first; for hosts with THP off) [default: on].
    #[arg(long, value_name = "on|off|hugetlbfs", value_parser = parse_hugepages)]
    pub hugepages: Option<PageBacking>,
    /// Where COM1 output goes: `stdout` or a file path.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Forward connections on this address (`HOST:PORT` or `unix:PATH`) to
    /// the guest's KV server over virtio-vsock. Default: 127.0.0.1:6379 when
    /// the bundled guest runs its default `kv` mode; otherwise off.
    #[arg(long, value_name = "ADDR")]
    pub kv_listen: Option<String>,
    /// Take a snapshot into --snapshot-dir this many seconds after start
    /// (fractions allowed). SIGUSR1 takes one into DIR-1, DIR-2, ...
    #[arg(long, value_name = "SECONDS")]
    pub snapshot_at: Option<f64>,
    /// Snapshot target directory (must not exist yet). With it, SIGUSR1
    /// takes a snapshot into DIR-N (N = 1, 2, ... per signal); without it,
    /// SIGUSR1 is logged and ignored. With --snapshot-every, the directory
    /// that holds the scheduled snapshots.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Take a snapshot into --snapshot-dir every DURATION (`30s`, `5m`,
    /// `1h`): DIR/snap-000001, ... and DIR/latest, a symlink to the newest
    /// complete one. Each is incremental (only what the guest wrote since
    /// the previous one) except every --snapshot-full-every-th. SIGUSR1
    /// takes the next one at once.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub snapshot_every: Option<std::time::Duration>,
    /// Scheduled snapshots kept restorable (with the parents they need);
    /// older ones are removed.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub snapshot_keep: u64,
    /// Every N-th scheduled snapshot is a full one (1: all full); the
    /// others are incremental. Bounds how many layers a restore reads.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub snapshot_full_every: u64,
    /// Track guest writes between snapshots (on), so that the next one may
    /// be incremental; off lifts every write-protection once a snapshot is
    /// done.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub snapshot_track_dirty: bool,
    /// async-fork, stop-the-world, sync-wp or fork (the VMM process forks
    /// and the child writes the snapshot).
    #[arg(long, value_name = "MODE", default_value = "async-fork", value_parser = parse_strategy)]
    pub snapshot_mode: snapvm_snapshot::Strategy,
    /// Writer threads for the snapshot (default: the number of host cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub snapshot_workers: Option<u32>,
    /// Staging memory for write faults during a snapshot: a guest write to
    /// memory not yet on disk copies the chunk here and goes on; with it
    /// full, the write waits for the chunk's disk write. The most a
    /// snapshot adds to snapvm's memory; allocated when --snapshot-pool
    /// says and kept. Rounded down to 2 MiB; 0 for none. Per API request:
    /// `"memory_budget"`.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_budget)]
    pub snapshot_memory_budget: u64,
    /// When the staging pool is allocated: at-start (populated in the
    /// background once the VM runs, or once a restored VM's memory is all
    /// in, so the first snapshot finds it warm) or first-snapshot (a VM
    /// that never snapshots never holds it; that first snapshot's write
    /// faults wait for the disk until the pool is populated). Only the
    /// modes that stage (async-fork, sync-wp) allocate it at start.
    #[arg(long, value_name = "at-start|first-snapshot", default_value = "at-start", value_parser = parse_pool_timing)]
    pub snapshot_pool: PoolTiming,
    /// Scheduling of the thread that commits the snapshot: normal, or idle
    /// (only spare CPU time: the guest wins every contended core, but a
    /// guest that keeps every core busy delays the commit without bound).
    /// The writers always run at normal priority (vCPU write faults can
    /// wait on them).
    #[arg(long, value_name = "idle|normal", default_value = "normal")]
    pub snapshot_priority: snapvm_snapshot::BackgroundPriority,
    /// Restore the VM from this snapshot directory instead of booting a
    /// kernel (memory, vCPUs and devices come from the snapshot).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    pub restore: Option<PathBuf>,
    /// With --restore: check every memory chunk's checksum first.
    #[arg(long)]
    pub verify: bool,
    /// Serve the HTTP API on this Unix socket (created 0600, removed on
    /// exit). It changes nothing about what runs: the VM boots (or is
    /// restored) as without it.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Boot nothing: wait for `PUT /snapshot/load` (or `snapvm restore`)
    /// on --api-sock to bring a VM. --kv-listen and --serial apply to it;
    /// the snapshot brings its own machine.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "restore"])]
    pub no_boot: bool,
}

/// Default of `--memory`.
pub const DEFAULT_MEMORY: &str = "512M";

impl RunArgs {
    pub fn memory(&self) -> &str {
        self.memory.as_deref().unwrap_or(DEFAULT_MEMORY)
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus.unwrap_or(1)
    }

    pub fn hugepages(&self) -> PageBacking {
        self.hugepages.unwrap_or(PageBacking::Huge)
    }

    /// `--no-boot`: snapvm waits for `PUT /snapshot/load`.
    pub fn waits_for_load(&self) -> bool {
        self.no_boot
    }

    /// In the waiting mode, flags that shape a booted VM mean nothing (the
    /// snapshot brings its own machine): refuse them rather than ignore.
    fn validate_wait_for_load(&self) -> Result<(), String> {
        if !self.waits_for_load() {
            return Ok(());
        }
        if self.api_sock.is_none() {
            return Err(
                "--no-boot needs --api-sock: a VM comes only through PUT /snapshot/load".into(),
            );
        }
        let given = [
            ("--memory", self.memory.is_some()),
            ("--vcpus", self.vcpus.is_some()),
            ("--snapshot-dir", self.snapshot_dir.is_some()),
        ];
        match given.iter().find(|(_, g)| *g) {
            Some((flag, _)) => Err(format!(
                "{flag} has no effect with --no-boot: snapvm boots nothing and waits for PUT /snapshot/load, whose snapshot brings its own machine"
            )),
            None => Ok(()),
        }
    }

    /// Checks the snapshot and restore flags that clap cannot (with a
    /// message naming the flags).
    pub fn validate_snapshot_flags(&self) -> Result<(), String> {
        if self.snapshot_at.is_some() && self.snapshot_dir.is_none() {
            return Err("--snapshot-at needs --snapshot-dir".into());
        }
        if let Some(s) = self.snapshot_at {
            if !s.is_finite() || s < 0.0 {
                return Err(format!("--snapshot-at {s}: expected seconds >= 0"));
            }
        }
        if self.verify && self.restore.is_none() {
            return Err("--verify needs --restore".into());
        }
        if self.snapshot_every.is_some() {
            if self.snapshot_dir.is_none() {
                return Err(
                    "--snapshot-every needs --snapshot-dir (where the snapshots go)".into(),
                );
            }
            if self.snapshot_at.is_some() {
                return Err("--snapshot-every and --snapshot-at exclude each other".into());
            }
            if self.snapshot_mode != snapvm_snapshot::Strategy::AsyncFork {
                return Err(
                    "--snapshot-every takes async-fork snapshots; leave --snapshot-mode out".into(),
                );
            }
            if self.snapshot_every.is_some_and(|d| d.is_zero()) {
                return Err("--snapshot-every must be longer than 0".into());
            }
        }
        self.validate_wait_for_load()
    }
}

/// Parses a duration: `30s`, `5m`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration '{s}': {e} (examples: 30s, 5m, 1h)"))
}

/// Parses a `--snapshot-mode` value.
pub fn parse_strategy(s: &str) -> Result<snapvm_snapshot::Strategy, String> {
    snapvm_snapshot::Strategy::from_name(s).ok_or_else(|| {
        format!("unknown snapshot mode '{s}': expected async-fork, stop-the-world, sync-wp or fork")
    })
}

/// Parses an on/off switch (also true/false, yes/no, 1/0).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("invalid value '{s}': expected on or off")),
    }
}

/// Parses a `--hugepages` value: on/off (also true/false, yes/no, 1/0).
pub fn parse_hugepages(s: &str) -> Result<PageBacking, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(PageBacking::Huge),
        "off" | "false" | "no" | "0" => Ok(PageBacking::Small),
        "hugetlbfs" | "hugetlb" => Ok(PageBacking::HugeTlb),
        _ => Err(format!(
            "invalid value '{s}' for --hugepages: expected on, off or hugetlbfs"
        )),
    }
}

/// Default for `--kv-listen`.
pub const DEFAULT_KV_LISTEN: &str = "127.0.0.1:6379";

impl RunArgs {
    /// Where to listen for KV clients, if anywhere: as given, or the
    /// default when the bundled guest will run its KV server (no `mode=` or
    /// `mode=kv`). Other modes and other kernels get no device unless
    /// asked, so they never compete for the port.
    pub fn effective_kv_listen(&self) -> Option<String> {
        if let Some(addr) = &self.kv_listen {
            return Some(addr.clone());
        }
        if self.kernel.is_some() {
            return None;
        }
        let mode = self
            .cmdline
            .as_deref()
            .unwrap_or("")
            .split_ascii_whitespace()
            .rev()
            .find_map(|w| w.strip_prefix("mode="));
        matches!(mode, None | Some("kv")).then(|| DEFAULT_KV_LISTEN.to_string())
    }
}

/// A configuration error: reported as one line, exit status 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size '{0}': {1}")]
    InvalidSize(String, String),
    #[error("memory size '{given}' ({requested} bytes) exceeds host RAM ({host} bytes)")]
    TooMuchMemory {
        given: String,
        requested: u64,
        host: u64,
    },
    #[error("memory size must be at least 2 MiB, got {0} bytes")]
    TooLittleMemory(u64),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {0} exceeds the maximum of {1}")]
    TooManyVcpus(u32, u32),
    #[error("invalid log level '{0}': expected error, warn, info, debug or trace")]
    LogLevel(String),
}

/// Parses `512M`, `4G`, `1024K`, `1T` or plain bytes (suffixes are binary,
/// case-insensitive, an optional trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = |why: &str| ConfigError::InvalidSize(s.to_string(), why.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        Some('t') => (&lower[..lower.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (lower, 0),
        Some(_) => {
            return Err(err(
                "expected a number with an optional K, M, G or T suffix",
            ))
        }
        None => return Err(err("empty size")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(
            "expected a number with an optional K, M, G or T suffix",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("number too large"))
}

/// When a VM's staging pool is allocated (`--snapshot-pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolTiming {
    /// Once the VM runs (a restored one: once its memory is all in).
    AtStart,
    /// At the VM's first snapshot that stages.
    FirstSnapshot,
}

/// Parses `--snapshot-pool`.
pub fn parse_pool_timing(s: &str) -> Result<PoolTiming, String> {
    match s {
        "at-start" => Ok(PoolTiming::AtStart),
        "first-snapshot" => Ok(PoolTiming::FirstSnapshot),
        other => Err(format!(
            "'{other}' is not a pool timing (expected at-start or first-snapshot)"
        )),
    }
}

/// Parses a staging budget (`--snapshot-memory-budget`): a size, 0 allowed.
pub fn parse_budget(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Parses and validates a guest memory size against host RAM: the result is
/// rounded up to 2 MiB.
pub fn guest_memory_size(s: &str, host_ram: Option<u64>) -> Result<u64, ConfigError> {
    let bytes = parse_size(s)?;
    if bytes == 0 {
        return Err(ConfigError::TooLittleMemory(0));
    }
    let rounded = layout::round_up_to_huge_page(bytes);
    if let Some(host) = host_ram {
        if rounded > host {
            return Err(ConfigError::TooMuchMemory {
                given: s.to_string(),
                requested: rounded,
                host,
            });
        }
    }
    Ok(rounded)
}

/// Snapshot writer threads when `--snapshot-workers` is not given: one per
/// host core (each has one disk write in flight at a time).
pub fn default_snapshot_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Largest vCPU count: the guest's per-CPU tables, and 8-bit APIC ids.
pub fn max_vcpus() -> u32 {
    (snapvm_guest::abi::MAX_CPUS as u32).min(255)
}

pub fn validate_vcpus(n: u32) -> Result<u32, ConfigError> {
    if n == 0 {
        return Err(ConfigError::NoVcpus);
    }
    let max = max_vcpus();
    if n > max {
        return Err(ConfigError::TooManyVcpus(n, max));
    }
    Ok(n)
}

pub fn validate_log_level(s: &str) -> Result<tracing::Level, ConfigError> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(tracing::Level::ERROR),
        "warn" => Ok(tracing::Level::WARN),
        "info" => Ok(tracing::Level::INFO),
        "debug" => Ok(tracing::Level::DEBUG),
        "trace" => Ok(tracing::Level::TRACE),
        _ => Err(ConfigError::LogLevel(s.to_string())),
    }
}

/// Logs at `level` (an error/warn/info/debug/trace name) to stderr; a second
/// call keeps the first subscriber.
pub fn init_logging(level: &str) -> Result<(), ConfigError> {
    let level = validate_log_level(level)?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    Ok(())
}

/// Host RAM from /proc/meminfo (`MemTotal`), if readable.
pub fn host_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total(&text)
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests;
