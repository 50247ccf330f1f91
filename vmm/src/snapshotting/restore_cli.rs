//! `snapvm run --restore DIR` and `PUT /snapshot/load`: open and validate
//! a snapshot directory, give guest RAM the backing a boot gives it, start
//! loading it lazily from the snapshot's image (`snapvm_snapshot::lazy`),
//! and rebuild the VM from its state.
//!
//! The restored VM is an ordinary VM: its memory is anonymous (THP or
//! 4 KiB as `--hugepages` says), it can be snapshotted at once (while its
//! memory still loads, chunks not yet loaded are copied from the parent
//! image), and once every chunk is in it no longer touches the directory.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};

use snapvm_snapshot::lazy::{LoadError, LoadOptions, Loader};
use snapvm_snapshot::persist::SnapshotChain;
use snapvm_snapshot::{PersistError, Region};

use crate::builder::{self, RestoreConfig};
use crate::devices::virtio::vsock::HostListener;
use crate::memory::{GuestRam, PageBacking};
use crate::placement::CpuPlacement;
use crate::vcpu_control::VmExit;
use crate::vm::{Vm, VmStopper};
use crate::vmstate::{VmState, VmStateError};

/// Background threads reading the image while the guest runs.
pub const PREFETCH_THREADS: usize = 2;

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
    #[error("cannot restore {}: {source}", .dir.display())]
    Load {
        dir: std::path::PathBuf,
        source: LoadError,
    },
    /// Memory failed to load before the guest started.
    #[error("{msg}; the VM was not started")]
    Failed {
        dir: std::path::PathBuf,
        msg: String,
    },
}

/// What a restore gets besides the snapshot.
pub struct RestoreOptions {
    /// Check every chunk's checksum before the guest starts (otherwise
    /// each chunk is checked as it loads).
    pub verify: bool,
    pub serial_out: Box<dyn Write + Send>,
    pub serial_in: bool,
    /// Where a saved vsock device takes host connections from.
    pub kv_listener: Option<HostListener>,
    /// Guest RAM's backing (`--hugepages`).
    pub backing: PageBacking,
    /// `--cpus`: the guest's threads here, the prefetch on the others.
    pub cpus: Option<CpuPlacement>,
}

/// Guest addresses the restored guest touches first: each vCPU's
/// instruction and stack pointers, page-table root and descriptor tables (physical for the
/// bundled guest, which identity-maps its memory; a kernel's virtual
/// addresses that fall outside guest RAM are simply not found), and the
/// vsock device's rings. Their chunks load before the rest.
fn hot_addresses(state: &VmState) -> Vec<u64> {
    let mut hot = Vec::new();
    for v in &state.vcpus.vcpus {
        let s = &v.sregs;
        hot.extend([v.regs.rip, v.regs.rsp, s.cr3 & !0xfff]);
        hot.extend([s.gdt.base, s.idt.base, s.tr.base]);
    }
    if let Some(vsock) = &state.vsock {
        for q in &vsock.transport.queues {
            hot.extend([q.desc_table, q.avail_ring, q.used_ring]);
        }
    }
    hot
}

/// Opens `dir` (state file and image size checked; with `verify`, every
/// chunk checksum too), gives the VM fresh guest RAM, starts loading it
/// from the image, and builds a VM ready to [`Vm::start`]: the guest
/// continues where it was at the snapshot's instant.
///
/// A chunk that fails to load (corrupt, unreadable) stops the VM with an
/// error naming the snapshot, the chunk and the checksums; the threads
/// that touched it never see its memory.
pub fn restore_from_dir(dir: &Path, opts: RestoreOptions) -> Result<Vm, RestoreError> {
    let snap_err = |source| RestoreError::Snapshot {
        dir: dir.into(),
        source,
    };
    let state_err = |source| RestoreError::State {
        dir: dir.into(),
        source,
    };
    // An incremental snapshot brings its parents (each checked).
    let opened = SnapshotChain::open(dir).map_err(snap_err)?;
    if opts.verify {
        opened.verify_chunks().map_err(snap_err)?;
    }
    let state = VmState::decode(opened.top().vm_state()).map_err(state_err)?;
    let total: u64 = state.memory_layout.iter().map(|r| r.len).sum();
    let mut ram = GuestRam::with_backing(total, opts.backing)
        .map_err(|e| state_err(VmStateError::Memory(e)))?;
    crate::vmstate::ram::check_layout(&ram, &state.memory_layout).map_err(state_err)?;
    let regions: Vec<Region> = ram
        .regions()
        .iter()
        .map(|r| Region::new(r.guest_addr, r.host_addr as u64, r.len as u64))
        .collect();
    // The VM does not exist yet when loading starts: a failure before it
    // does is found below; after, it stops the VM.
    let stopper: Arc<OnceLock<VmStopper>> = Arc::new(OnceLock::new());
    let me: Arc<OnceLock<Weak<Loader>>> = Arc::new(OnceLock::new());
    let on_error = {
        let (stopper, me) = (stopper.clone(), me.clone());
        move |msg: String| {
            if let Some(s) = stopper.get() {
                // The owner reports it (one line) when the VM stops.
                s.stop(VmExit::Error(format!("{msg}; the VM was stopped")));
                // Told to stop, the vCPUs never enter the guest again: the
                // threads blocked on the bad chunk may return (to zeros)
                // so that the VM can stop at all.
                if let Some(l) = me.get().and_then(Weak::upgrade) {
                    l.let_go();
                }
            }
        }
    };
    let load = LoadOptions {
        huge_pages: opts.backing == PageBacking::Huge,
        hugetlb: opts.backing == PageBacking::HugeTlb,
        prefetch_threads: PREFETCH_THREADS,
        cpus: opts.cpus.as_ref().and_then(|p| p.background.clone()),
        hot: hot_addresses(&state),
        ..LoadOptions::default()
    };
    let loader =
        Loader::start(&opened, &regions, load, on_error).map_err(|source| RestoreError::Load {
            dir: dir.into(),
            source,
        })?;
    let loader = Arc::new(loader);
    let _ = me.set(Arc::downgrade(&loader));
    ram.set_loader(loader);
    let config = RestoreConfig {
        serial_out: opts.serial_out,
        serial_in: opts.serial_in,
        kv_listener: opts.kv_listener,
    };
    let mut vm = builder::restore(config, ram, &state).map_err(state_err)?;
    let _ = stopper.set(vm.stopper());
    if let Some(l) = vm.memory().loader() {
        if let Some(msg) = l.progress().error {
            return Err(RestoreError::Failed {
                dir: dir.into(),
                msg,
            });
        }
    }
    if let Some(p) = opts.cpus {
        vm.set_cpu_placement(p);
    }
    Ok(vm)
}
