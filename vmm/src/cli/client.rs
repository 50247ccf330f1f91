//! The client commands' arguments: `snapvm snapshot ...`, `snapvm vm
//! ...`, `snapvm restore` (each talks to a running snapvm's API socket,
//! except `snapshot merge`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{parse_budget, parse_strategy};

/// The API socket of the snapvm to talk to.
#[derive(Debug, Args)]
pub struct ApiSockArg {
    /// The socket given to `snapvm run --api-sock`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of the running VM into DIR; prints its status (JSON).
    Create(SnapshotCreateArgs),
    /// Every snapshot of this snapvm (JSON).
    List(ApiSockArg),
    /// One snapshot's state, progress and metrics (JSON).
    Status(SnapshotIdArgs),
    /// Cancel a snapshot still copying (the guest runs on untouched).
    Cancel(SnapshotIdArgs),
    /// Write the full snapshot a chain of incremental ones stands for
    /// (no snapvm needed; prints a summary as JSON).
    Merge(SnapshotMergeArgs),
    /// Start (or replace) the snapshot schedule with --dir and --every,
    /// stop it with --stop, or show it (JSON).
    Schedule(SnapshotScheduleArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotScheduleArgs {
    #[command(flatten)]
    pub sock: ApiSockArg,
    /// Directory of the numbered snapshots and `latest`.
    #[arg(long, value_name = "DIR", requires = "every", conflicts_with = "stop")]
    pub dir: Option<PathBuf>,
    /// Interval between snapshots (30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration, requires = "dir")]
    pub every: Option<std::time::Duration>,
    /// Complete snapshots kept restorable (with their parents).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub keep: u64,
    /// Every N-th snapshot is full (1: all full).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub full_every: u64,
    /// Stop the schedule (a snapshot under way ends as it would have).
    #[arg(long)]
    pub stop: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotMergeArgs {
    /// The (incremental) snapshot directory, e.g. DIR/latest.
    pub dir: PathBuf,
    /// Where the full snapshot goes (must not exist unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing directory at --out.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotCreateArgs {
    #[command(flatten)]
    pub sock: ApiSockArg,
    /// Snapshot directory to write (must not exist unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// async-fork, stop-the-world, sync-wp or fork (default: async-fork).
    #[arg(long, value_name = "MODE", value_parser = parse_strategy)]
    pub mode: Option<snapvm_snapshot::Strategy>,
    /// Copier threads (default: the number of host cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: Option<u32>,
    /// Wait until the snapshot is written (a progress bar on a terminal).
    #[arg(long)]
    pub wait: bool,
    /// Replace an existing directory at DIR.
    #[arg(long)]
    pub overwrite: bool,
    /// Staging memory for write faults during the snapshot, e.g. 256M or 0
    /// (default: the server's --snapshot-memory-budget).
    #[arg(long, value_name = "SIZE", value_parser = parse_budget)]
    pub memory_budget: Option<u64>,
    /// Only what the guest wrote since this VM's last snapshot, which
    /// becomes its parent (`snapshot_type: "Diff"`).
    #[arg(long)]
    pub incremental: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotIdArgs {
    #[command(flatten)]
    pub sock: ApiSockArg,
    /// The snapshot id (as `snapshot create` or `snapshot list` print it).
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Hold every vCPU.
    Pause(ApiSockArg),
    /// Let the vCPUs run again (or start a loaded VM).
    Resume(ApiSockArg),
    /// Instance id, VM state and version (JSON).
    Status(ApiSockArg),
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub sock: ApiSockArg,
    /// The snapshot directory to load.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Leave the loaded VM paused (resume it with `snapvm vm resume`).
    #[arg(long)]
    pub no_resume: bool,
    /// Check every memory chunk's checksum before loading.
    #[arg(long)]
    pub verify: bool,
    /// Follow the memory load until the VM no longer needs the snapshot
    /// directory (a progress bar when stderr is a terminal); exits 1 if
    /// the load fails.
    #[arg(long)]
    pub wait: bool,
}
