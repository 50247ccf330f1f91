//! The VM's vCPUs as one component: their fds, the control that pauses
//! them (`vcpu_control.rs`), and their state for a snapshot.
//!
//! Saving completes any I/O exit KVM still has pending on a vCPU that has
//! run (one `KVM_RUN` with `immediate_exit`: the saved RIP is then past the
//! instruction), then reads each vCPU (`vcpu_state::capture`). Restoring
//! writes the states into freshly created, never-run vCPUs
//! (`vcpu_state::restore`) and tells the control which had started.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::component::{Pausable, PauseFailed, Persist};
use crate::error::VmStateError;
use crate::vcpu::{lock_vcpu, SharedVcpuFd};
use crate::vcpu_control::{VcpuControl, VcpuStatus};
use crate::vcpu_state::{self as vstate, VcpuState};

/// The vCPUs of one VM.
#[derive(Debug)]
pub struct VcpuSet {
    pub fds: Vec<SharedVcpuFd>,
    pub control: Arc<VcpuControl>,
    /// The VM has an in-kernel irqchip (each vCPU a LAPIC).
    pub lapic: bool,
    /// The MSRs a snapshot reads (KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Vec<u32>,
}

/// What the vCPUs were at a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSetState {
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Per vCPU: has it started running guest code (vCPU 0 always has)?
    pub started: Vec<bool>,
    /// Entry address the guest gave with START_APS, once it did.
    pub ap_entry: Option<u64>,
}

impl VcpuSet {
    /// Fresh vCPUs (from `vcpu::create_vcpu`), none started.
    pub fn new(
        fds: Vec<VcpuFd>,
        control: Arc<VcpuControl>,
        lapic: bool,
        msr_list: Vec<u32>,
    ) -> Self {
        VcpuSet {
            fds: fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect(),
            control,
            lapic,
            msr_list,
        }
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Every vCPU's state as it is; the vCPUs must be held. Unlike
    /// `save`, pending exits are left pending (for inspection in tests).
    pub fn states(&self) -> Result<Vec<VcpuState>, VmStateError> {
        if !self.control.is_paused() {
            return Err(VmStateError::NotPaused);
        }
        self.fds
            .iter()
            .enumerate()
            .map(|(i, fd)| vstate::capture(i, &lock_vcpu(fd), &self.msr_list, self.lapic))
            .collect()
    }
}

impl Persist for VcpuSet {
    type State = VcpuSetState;
    /// The vCPUs freshly created for the restored VM, never run.
    type ConstructorArgs = VcpuSet;
    type Error = VmStateError;

    fn save(&self) -> Result<VcpuSetState, VmStateError> {
        if !self.control.is_paused() {
            return Err(VmStateError::NotPaused);
        }
        let statuses = self.control.statuses();
        let mut vcpus = Vec::with_capacity(self.fds.len());
        let mut started = Vec::with_capacity(self.fds.len());
        for (index, fd) in self.fds.iter().enumerate() {
            let mut fd = lock_vcpu(fd);
            let has_run = statuses.get(index) != Some(&VcpuStatus::NotStarted);
            if has_run {
                vstate::complete_pending_exit(index, &mut fd)?;
            }
            started.push(has_run);
            vcpus.push(vstate::capture(index, &fd, &self.msr_list, self.lapic)?);
        }
        Ok(VcpuSetState {
            vcpus,
            started,
            ap_entry: self.control.ap_entry(),
        })
    }

    fn restore(fresh: VcpuSet, state: &VcpuSetState) -> Result<VcpuSet, VmStateError> {
        if fresh.fds.len() != state.vcpus.len() {
            return Err(VmStateError::Invalid(format!(
                "{} vCPUs created for {} saved",
                fresh.fds.len(),
                state.vcpus.len()
            )));
        }
        for (index, (fd, vs)) in fresh.fds.iter().zip(&state.vcpus).enumerate() {
            vstate::restore(index, &lock_vcpu(fd), vs)?;
        }
        fresh.control.set_restored(&state.started, state.ap_entry);
        Ok(fresh)
    }
}

/// The vCPUs of a VM that has started, as a pausable component (a VM not
/// started yet has nothing running to pause).
pub struct RunningVcpus<'a> {
    pub set: &'a VcpuSet,
    pub started: bool,
}

impl Pausable for RunningVcpus<'_> {
    fn name(&self) -> &'static str {
        "vCPUs"
    }

    fn pause(&self) -> Result<(), PauseFailed> {
        if !self.started {
            return Err(PauseFailed::new(
                self.name(),
                crate::vcpu_control::PauseError::NotStarted,
            ));
        }
        self.set
            .control
            .pause()
            .map_err(|e| PauseFailed::new(self.name(), e))
    }

    fn resume(&self) {
        if let Err(e) = self.set.control.resume() {
            tracing::debug!("vCPUs: resume: {e}");
        }
    }

    fn is_paused(&self) -> bool {
        self.set.control.is_paused()
    }
}
