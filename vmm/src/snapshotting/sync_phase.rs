//! The sync phase (DESIGN.md §2, the parent's part of async-fork): the
//! snapshot's instant. In order:
//!
//! 0. **Arm** (guest running): the engine allocates the staging pool the
//!    first time, registers guest RAM with userfaultfd and write-protects
//!    it in steps; writes meanwhile are let through and noted.
//! 1. **Pause** the VM's components in order (`Vm::pausable`: the vCPUs,
//!    then the vsock device's thread, which parks between packets):
//!    nothing writes guest RAM any more. One paused before (`PATCH /vm`)
//!    stays paused.
//! 2. **Capture** every component's state (`component::Persist`: the KVM
//!    VM, the vCPUs, COM1, the PV ports, the vsock device) into one blob.
//! 3. **Begin**: the engine re-protects what was written since arm (or,
//!    for the baselines, protects or writes everything now; the fork
//!    baseline forks here).
//! 4. **Resume** what step 1 paused, in reverse order.
//! 5. **Start the copy**: the engine's workers begin writing chunks to the
//!    image (woken only now, so they cannot take the CPU of the thread
//!    resuming the vCPUs).
//!
//! Any failure before step 4 undoes what was done (the engine lifts its
//! protections) and resumes the guest: nothing is created. Only steps 1-4
//! stall the guest, and none of them grows with memory after `arm`.

use std::sync::Arc;
use std::time::Instant;

use snapvm_snapshot::{Engine, ImageFile, Region};

use super::checksums::checksum_chunks;
use super::fork::{self, ForkChild};
use super::metrics::SyncPhase;
use super::request::SnapshotError;
use crate::component;
use crate::vm::Vm;
use crate::vmstate::VcpuState;

/// What writes the memory once the guest runs again.
pub(super) enum Work {
    Engine(Arc<Engine>),
    Fork(ForkChild),
}

/// A snapshot past its instant.
pub(super) struct Begun {
    pub work: Work,
    /// Every component's state, encoded.
    pub blob: Vec<u8>,
    pub sync: SyncPhase,
    /// With `capture_checksums` (a test hook): guest RAM's chunk checksums.
    pub checksums: Option<Vec<u32>>,
}

/// Releases an `Engine::arm` that no `begin` consumed (an error between
/// the two); after `begin` it finds nothing to do.
struct DisarmOnDrop<'a>(&'a Engine);

impl Drop for DisarmOnDrop<'_> {
    fn drop(&mut self) {
        self.0.disarm();
    }
}

/// Runs the sync phase of a snapshot of `vm` into `image`, with `engine`
/// (None: the fork baseline). Returns once the guest runs again.
///
/// The caller keeps guest RAM mapped (a clone of it) until the engine's
/// `wait` returned or the fork child exited.
pub(super) fn run(
    vm: &Vm,
    regions: &[Region],
    engine: Option<&Arc<Engine>>,
    image: &Arc<ImageFile>,
    capture_checksums: bool,
) -> Result<Begun, SnapshotError> {
    // 0. Arm. Failing to arm only costs pause time: begin() takes the
    // full path.
    let _disarm = engine.map(|e| DisarmOnDrop(e.as_ref()));
    if let Some(engine) = engine {
        // SAFETY: the regions are this VM's anonymous private guest RAM
        // (GuestRam maps MAP_PRIVATE|MAP_ANONYMOUS), mapped read-write and
        // kept mapped by the caller until the engine is done; guest RAM is
        // never discarded or remapped while the VM lives. A disarm on
        // every early return releases it.
        if let Err(e) = unsafe { engine.arm(regions, image) } {
            tracing::warn!(
                "snapshot: write-protecting ahead of the pause failed ({e}); protecting in the pause instead"
            );
        }
    }

    // 1. Pause: the guest is stalled from here to resume().
    let mut sync = SyncPhase::default();
    let t0 = Instant::now();
    let components = vm.pausable();
    let paused = component::pause_all(&components)?;
    sync.pause = t0.elapsed();
    // With `--cpus`, the rest of the pause runs on the guest's CPUs, idle
    // now and where its vCPUs last ran: the state capture's vCPU ioctls
    // then do not pull the vCPUs' KVM context to another CPU (measured:
    // docs/journal/). The thread's own affinity comes back before the
    // resume.
    let affinity_before = vm.cpu_placement().and_then(|p| {
        let before = snapvm_snapshot::CpuSet::allowed().ok()?;
        p.guest.pin_current_thread().ok()?;
        Some(before)
    });
    let resume = |sync: &mut SyncPhase| {
        let t = Instant::now();
        if let Some(before) = &affinity_before {
            let _ = before.pin_current_thread();
        }
        component::resume_all(&paused);
        sync.resume = t.elapsed();
        sync.total = t0.elapsed();
    };

    // 2. Capture.
    let t = Instant::now();
    let blob = match vm.save_state().and_then(|s| {
        sync.guest_tsc = s.vcpus.vcpus.first().and_then(VcpuState::tsc);
        s.encode()
    }) {
        Ok(b) => b,
        Err(e) => {
            resume(&mut sync);
            return Err(e.into());
        }
    };
    sync.state_capture = t.elapsed();
    let t = Instant::now();
    let checksums = capture_checksums
        .then(|| checksum_chunks(regions))
        .flatten();
    sync.checksums = t.elapsed();

    // 3. Begin.
    let t = Instant::now();
    let work = match engine {
        Some(engine) => {
            // SAFETY: as for `arm` above.
            let begun = unsafe { engine.begin(regions, image) };
            sync.begin = t.elapsed();
            match begun {
                Ok(m) => {
                    sync.engine = m;
                    Work::Engine(engine.clone())
                }
                Err(e) => {
                    resume(&mut sync);
                    return Err(e.into());
                }
            }
        }
        None => {
            let forked = fork::spawn(regions, image, vm.background_cpus());
            sync.begin = t.elapsed();
            match forked {
                Ok(child) => Work::Fork(child),
                Err(e) => {
                    resume(&mut sync);
                    return Err(SnapshotError::Failed(format!("fork: {e}")));
                }
            }
        }
    };

    // 4. Resume.
    resume(&mut sync);

    // 5. Start the copy. A failure rolls the snapshot back; the engine's
    // `wait` reports it.
    if let Work::Engine(e) = &work {
        if let Err(err) = e.start_copy() {
            tracing::error!("snapshot: cannot start its writers: {err}");
        }
    }
    Ok(Begun {
        work,
        blob,
        sync,
        checksums,
    })
}
