//! The API's JSON bodies. Requests refuse unknown fields, so a typo is a
//! 400 rather than a silently ignored setting. Shapes follow Firecracker's
//! where the meaning is the same (`snapshot_path`, `mem_file_path`,
//! `snapshot_type`, `resume_vm`, `action_type`, `fault_message`).

use serde::{Deserialize, Serialize};

/// `PATCH /vm`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    pub state: VmTargetState,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum VmTargetState {
    Paused,
    Resumed,
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
    /// Only `Full`.
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

/// `GET /`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started` (waiting for `PUT /snapshot/load`), `Running`,
    /// `Paused` or `Stopped`.
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// Live progress of a snapshot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Progress {
    /// Copy units saved (2 MiB chunks; 4 KiB pages for sync-wp), of the
    /// total (0 for the fork baseline).
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Bytes of guest memory in the image so far.
    pub bytes_written: u64,
    /// The image's length (guest RAM).
    pub image_len: u64,
}

/// `GET /snapshot/{id}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SnapshotStatus {
    pub id: String,
    pub snapshot_path: String,
    pub mode: String,
    pub workers: u64,
    /// `copying` (memory streaming into the image; the snapshot's instant
    /// has passed), `persisting` (fsync, state file, rename), `done`
    /// (durable) or `failed`.
    pub state: String,
    /// Why it failed (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub progress: Progress,
    /// The engine's metrics so far (complete once done): the same object as
    /// the snapshot's `metrics.json`.
    pub metrics: serde_json::Value,
}

/// `GET /snapshots`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotStatus>,
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
