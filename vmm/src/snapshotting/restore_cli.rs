//! `snapvm run --restore DIR`: open and validate a snapshot directory, map
//! its memory lazily, rebuild the VM from its state.

use std::io::Write;
use std::path::Path;

use snapvm_snapshot::{BackgroundPriority, PersistError, SnapshotDir};

use crate::builder::{self, RestoreConfig};
use crate::devices::virtio::vsock::HostListener;
use crate::vcpu_control::VmExit;
use crate::vm::{Vm, VmStopper};
use crate::vmstate::{ram_from_mapped, VmState, VmStateError};

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
///
/// Without `verify` the memory image is checked anyway, in the background
/// ([`verify_in_background`]): the restore stays O(state), and a corrupt chunk stops the VM with an error naming it
/// instead of going unnoticed.
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
    let vm = builder::restore(config, ram, &state).map_err(state_err)?;
    if !verify {
        verify_in_background(dir, opened, vm.stopper());
    }
    Ok(vm)
}

/// Checks every chunk of the image against its checksum on an idle-priority
/// thread (reading the file, not the guest's mapping, which the guest may
/// have written to since). A mismatch stops the VM with an exit error
/// naming the chunk; a clean image logs once at info. A thread
/// that cannot be started only costs the check (logged).
fn verify_in_background(path: &Path, opened: SnapshotDir, stopper: VmStopper) {
    let dir = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("restore-verify".into())
        .spawn(move || {
            if let Err(e) =
                snapvm_snapshot::priority::apply_to_current_thread(BackgroundPriority::Idle)
            {
                tracing::debug!("restore verification keeps normal priority: {e}");
            }
            let t = std::time::Instant::now();
            match opened.verify_chunks() {
                Ok(()) => tracing::info!(
                    "{}: every memory chunk matches its checksum (checked in {:.1} s)",
                    dir.display(),
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => {
                    let msg = format!(
                        "restored snapshot {} is corrupt: {e}; the VM was stopped",
                        dir.display()
                    );
                    // The owner reports it (one line) when the VM stops.
                    stopper.stop(VmExit::Error(msg));
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot check {} in the background: {e}; use --verify",
            path.display()
        );
    }
}
