//! The API's JSON bodies. Requests refuse unknown fields, so a typo is a
//! 400 rather than a silently ignored setting. Shapes follow Firecracker's
//! where the meaning is the same (`snapshot_path`, `mem_file_path`,
//! `snapshot_type`, `resume_vm`, `action_type`, `fault_message`).

use serde::{Deserialize, Serialize};

pub use crate::owner::{InstanceInfo, Progress, SnapshotList, SnapshotStatus, VmTargetState};

/// `PATCH /vm`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    pub state: VmTargetState,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The snapshot directory snapvm writes (atomically).
    pub snapshot_path: String,
    /// Accepted for Firecracker compatibility: snapvm keeps the memory
    /// image inside the directory, so this must be absent or
    /// `<snapshot_path>/memory.img`.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// `Full` (default) or `Diff`: only what the guest wrote since this
    /// VM's last snapshot (which becomes its parent).
    #[serde(default)]
    pub snapshot_type: Option<String>,
    /// `async-fork` (default), `stop-the-world`, `fork` or `sync-wp`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Copier threads (1..=64); default: the number of host cores.
    #[serde(default)]
    pub workers: Option<u32>,
    /// Replace an existing directory at `snapshot_path`.
    #[serde(default)]
    pub overwrite: bool,
    /// Staging memory for write faults during the snapshot, in bytes
    /// (default: `--snapshot-memory-budget`, 256 MiB); rounded down to
    /// 2 MiB, 0 for none.
    #[serde(default)]
    pub memory_budget: Option<u64>,
}

/// `PUT /snapshot/schedule`: what `--snapshot-dir/--snapshot-every/
/// --snapshot-keep/--snapshot-full-every` give on the command line.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSet {
    /// Directory of the numbered snapshots and `latest` (absolute).
    pub snapshot_dir: String,
    /// Interval between snapshots: `30s`, `5m`, `1h`, `500ms`.
    pub every: String,
    /// Complete snapshots kept restorable, with their parents (1..=10000).
    #[serde(default = "default_keep")]
    pub keep: u64,
    /// Every n-th snapshot is full, the others incremental (1..=256).
    #[serde(default = "default_full_every")]
    pub full_every: u64,
}

fn default_keep() -> u64 {
    3
}

fn default_full_every() -> u64 {
    8
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Start the guest at once (default: loaded paused; resume with
    /// `PATCH /vm {"state": "Resumed"}`).
    #[serde(default)]
    pub resume_vm: bool,
    /// Check every memory chunk's checksum before loading.
    #[serde(default)]
    pub verify: bool,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: String,
}

/// Every error body.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<SnapshotCreate>(r#"{"snapshot_path":"/x","bogus":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = serde_json::from_str::<VmPatch>(r#"{"state":"Sleeping"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `Sleeping`"), "{e}");
    }

    #[test]
    fn defaults() {
        let c: SnapshotCreate = serde_json::from_str(r#"{"snapshot_path":"/x"}"#).unwrap();
        assert_eq!(c.mode, None);
        assert!(!c.overwrite);
        let l: SnapshotLoad = serde_json::from_str(r#"{"snapshot_path":"/x"}"#).unwrap();
        assert!(!l.resume_vm && !l.verify);
    }
}
