//! `snapvm run --restore DIR`: open and validate a snapshot directory, map
//! its memory lazily, rebuild the VM from its state.

use std::io::Write;
use std::path::Path;

use snapshot::{PersistError, SnapshotDir};

use crate::devices::virtio::vsock::HostListener;
use crate::vm::Vm;
use crate::vmstate::{ram_from_mapped, RestoreConfig, VmState, VmStateError};

/// Why a restore failed; each renders as one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot restore {}: {source}", .dir.display())]
    Snapshot {
        dir: std::path::PathBuf,
        source: PersistError,
    },
    #[error("cannot restore {}: {source}", .dir.display())]
    State {
        dir: std::path::PathBuf,
        source: VmStateError,
    },
}

/// Opens `dir` (state file and image size checked; with `verify`, every
/// chunk checksum too), maps its memory copy-on-write and builds a VM
/// ready to [`Vm::start`] (a saved vsock device takes host connections
/// from `kv_listener`): the guest continues where it was at the
/// snapshot's fork instant.
pub fn restore_from_dir(
    dir: &Path,
    verify: bool,
    serial_out: Box<dyn Write + Send>,
    serial_in: bool,
    kv_listener: Option<HostListener>,
) -> Result<Vm, RestoreError> {
    let snap_err = |source| RestoreError::Snapshot {
        dir: dir.into(),
        source,
    };
    let state_err = |source| RestoreError::State {
        dir: dir.into(),
        source,
    };
    let opened = SnapshotDir::open(dir).map_err(snap_err)?;
    if verify {
        opened.verify_chunks().map_err(snap_err)?;
    }
    let state = VmState::decode(opened.vm_state()).map_err(state_err)?;
    let ram = ram_from_mapped(opened.map_all().map_err(snap_err)?).map_err(state_err)?;
    let config = RestoreConfig {
        serial_out,
        serial_in,
        kv_listener,
    };
    Vm::restore(config, ram, &state).map_err(state_err)
}
