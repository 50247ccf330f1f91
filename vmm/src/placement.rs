//! Where snapvm's threads run (`--cpus`): the guest's own threads (its
//! vCPUs and the vsock device thread, the whole per-request path) on the
//! CPUs given, and a snapshot's background threads (supervisor, copiers,
//! persist) on the other CPUs snapvm may use, so neither queues behind the
//! other on a shared core. Without `--cpus` the scheduler places them all.

use snapvm_snapshot::CpuSet;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("--cpus {given}: CPUs {outside} are not among those snapvm may run on ({allowed})")]
    NotAllowed {
        given: CpuSet,
        outside: CpuSet,
        allowed: CpuSet,
    },
    #[error("--cpus: cannot read the CPUs snapvm may run on: {0}")]
    Affinity(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPlacement {
    /// vCPU threads and the vsock device thread.
    pub guest: CpuSet,
    /// Snapshot supervisor, copiers and persist thread; None when the
    /// guest has every CPU (then they share them, unpinned).
    pub background: Option<CpuSet>,
}

impl CpuPlacement {
    /// The guest on `guest`, the background on the rest of `allowed`.
    pub fn within(guest: CpuSet, allowed: &CpuSet) -> Result<CpuPlacement, PlacementError> {
        if let Some(outside) = guest.without(allowed) {
            return Err(PlacementError::NotAllowed {
                given: guest,
                outside,
                allowed: allowed.clone(),
            });
        }
        let background = allowed.without(&guest);
        Ok(CpuPlacement { guest, background })
    }

    /// [`CpuPlacement::within`] the CPUs the calling thread may use (call
    /// at start-up, before any pinning).
    pub fn new(guest: CpuSet) -> Result<CpuPlacement, PlacementError> {
        let allowed = CpuSet::allowed().map_err(|e| PlacementError::Affinity(e.to_string()))?;
        Self::within(guest, &allowed)
    }

    /// Pins one of the guest's threads; a failure only costs the placement.
    pub fn pin_guest_thread<T>(&self, what: &str, thread: &std::thread::JoinHandle<T>) {
        if let Err(e) = self.guest.pin_thread(thread) {
            tracing::warn!("{what} not kept on CPUs {}: {e}", self.guest);
        }
    }

    /// Pins the calling thread to the background CPUs (if there are any).
    pub fn pin_background_here(&self, what: &str) {
        if let Some(cpus) = &self.background {
            if let Err(e) = cpus.pin_current_thread() {
                tracing::warn!("{what} not kept on CPUs {cpus}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    #[test]
    fn the_background_gets_the_cpus_the_guest_does_not() {
        let p = CpuPlacement::within(set("1"), &set("0-3")).unwrap();
        assert_eq!(p.background, Some(set("0,2-3")));
        let all = CpuPlacement::within(set("0-1"), &set("0-1")).unwrap();
        assert_eq!(all.background, None);
    }

    #[test]
    fn cpus_outside_the_allowed_set_are_refused_by_name() {
        let e = CpuPlacement::within(set("1-3"), &set("0-1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cpus 1-3: CPUs 2-3 are not among those snapvm may run on (0-1)"
        );
    }
}
