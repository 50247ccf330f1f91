//! The owner's VM-wide requests: what it is, pause/resume, and loading a
//! snapshot into a waiting snapvm.

use std::io::Write;

use super::{InstanceInfo, LoadOrder, Owner, OwnerError, Slot, VmSource, VmTargetState};
use crate::devices::virtio::vsock::HostListener;
use crate::snapshotting::restore_cli::{restore_from_dir, RestoreOptions};
use crate::vm::Vm;

const NO_VM: &str = "no VM yet: load one with PUT /snapshot/load";

impl Owner {
    pub(super) fn vm_state_name(&self) -> &'static str {
        match &self.slot {
            Slot::Waiting(_) => "Not started",
            Slot::Vm { vm, started, .. } => {
                if vm.exit_reason().is_some() {
                    "Stopped"
                } else if !*started || vm.is_paused() {
                    "Paused"
                } else {
                    "Running"
                }
            }
        }
    }

    pub(super) fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.instance_id.clone(),
            state: self.vm_state_name().to_string(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "snapvm".to_string(),
            memory_load: self.memory_load(),
        }
    }

    /// A restored VM's memory load, if this VM was restored.
    pub(super) fn memory_load(&self) -> Option<super::MemoryLoad> {
        match &self.slot {
            Slot::Vm { vm, .. } => vm.memory().loader().map(|l| super::MemoryLoad::of(l)),
            Slot::Waiting(_) => None,
        }
    }

    /// The VM, if there is one that runs (or can: loaded, not started).
    pub(super) fn live_vm(&self) -> Result<(&Vm, bool), OwnerError> {
        match &self.slot {
            Slot::Waiting(_) => Err(OwnerError::Conflict(NO_VM.into())),
            Slot::Vm { vm, started, .. } => {
                if vm.exit_reason().is_some() {
                    Err(OwnerError::Conflict("the VM has stopped".into()))
                } else {
                    Ok((vm, *started))
                }
            }
        }
    }

    pub(super) fn vm_config(&self) -> Result<serde_json::Value, OwnerError> {
        let Slot::Vm { vm, source, .. } = &self.slot else {
            return Err(OwnerError::Conflict(NO_VM.into()));
        };
        let mut config = serde_json::json!({
            "machine_config": {
                "vcpu_count": vm.vcpu_count(),
                "mem_size_mib": vm.memory().size() >> 20,
                "huge_pages": vm.memory().backing().is_huge(),
                "page_backing": vm.memory().backing().label(),
            },
        });
        if let Some(p) = vm.cpu_placement() {
            config["machine_config"]["cpus"] = serde_json::json!({
                "guest": p.guest.to_string(),
                "background": p.background.as_ref().map(ToString::to_string),
            });
        }
        match source {
            VmSource::Boot { kernel, cmdline } => {
                config["boot_source"] = serde_json::json!({
                    "kernel_image_path": kernel,
                    "boot_args": cmdline,
                });
            }
            VmSource::Snapshot { path } => {
                config["snapshot"] = serde_json::json!({
                    "snapshot_path": path.display().to_string(),
                });
            }
        }
        Ok(config)
    }

    pub(super) fn set_vm_state(&mut self, target: VmTargetState) -> Result<(), OwnerError> {
        self.live_vm()?;
        let Slot::Vm { vm, started, .. } = &mut self.slot else {
            return Err(OwnerError::Conflict(NO_VM.into()));
        };
        match target {
            VmTargetState::Paused => {
                if !*started || vm.is_paused() {
                    return Ok(());
                }
                vm.pause()
                    .map_err(|e| OwnerError::Conflict(format!("cannot pause the VM: {e}")))?;
                tracing::info!("VM paused");
            }
            VmTargetState::Resumed => {
                if !*started {
                    vm.start()
                        .map_err(|e| OwnerError::Failed(format!("cannot start the VM: {e}")))?;
                    *started = true;
                    tracing::info!("loaded VM started");
                    return Ok(());
                }
                if !vm.is_paused() {
                    return Ok(());
                }
                vm.resume()
                    .map_err(|e| OwnerError::Conflict(format!("cannot resume the VM: {e}")))?;
                tracing::info!("VM resumed");
            }
        }
        Ok(())
    }

    pub(super) fn load(&mut self, order: &LoadOrder) -> Result<(), OwnerError> {
        let loader = match &mut self.slot {
            Slot::Waiting(l) => l,
            Slot::Vm { .. } => return Err(OwnerError::Conflict(
                "a VM is already running: PUT /snapshot/load needs a snapvm started with --no-boot"
                    .into(),
            )),
        };
        let dir = order.dir.clone();
        let serial_out: Box<dyn Write + Send> = crate::vm::VmConfig::serial_sink(&loader.serial)
            .map_err(|e| OwnerError::Failed(e.to_string()))?;
        // A failed load consumed the listener: bind the address again.
        let listener = match (loader.kv_listener.take(), &loader.kv_addr) {
            (Some(l), _) => Some(l),
            (None, Some(addr)) => Some(
                HostListener::bind(addr)
                    .map_err(|e| OwnerError::Failed(format!("cannot listen on {addr}: {e}")))?,
            ),
            (None, None) => None,
        };
        let t = std::time::Instant::now();
        let opts = RestoreOptions {
            verify: order.verify,
            serial_out,
            serial_in: loader.serial_in,
            kv_listener: listener,
            backing: loader.backing,
            cpus: loader.cpus.clone(),
        };
        let mut vm =
            restore_from_dir(&dir, opts).map_err(|e| OwnerError::Invalid(e.to_string()))?;
        let mut started = false;
        if order.resume {
            vm.start()
                .map_err(|e| OwnerError::Failed(format!("cannot start the loaded VM: {e}")))?;
            started = true;
        } else if let Some(l) = vm.memory().loader() {
            // Nothing runs yet: the memory may load meanwhile.
            l.start_prefetch();
        }
        tracing::info!(
            "loaded {} in {:.1} ms ({})",
            dir.display(),
            t.elapsed().as_secs_f64() * 1e3,
            if started { "running" } else { "paused" }
        );
        self.slot = Slot::Vm {
            vm: Box::new(vm),
            source: VmSource::Snapshot { path: dir },
            started,
        };
        Ok(())
    }
}
