//! `snapvm`: command-line front end of the VMM library.
//!
//! Exit status: the guest's poweroff status; 3 for a guest exception or
//! triple fault; 1 for VMM, KVM and usage errors. Every error is one line
//! on stderr starting with `snapvm: error: `.

use std::process::ExitCode;

use std::sync::mpsc::{self, Receiver, Sender};

use clap::Parser;
use snapvm_vmm::api::{self, ApiServer};
use snapvm_vmm::cli::{self, Cli, Command, RunArgs};
use snapvm_vmm::devices::virtio::{
    self,
    vsock::{HostListener, ListenAddr},
};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::owner::{self, Envelope, LoadSettings, Owner, SnapshotDefaults, VmSource};
use snapvm_vmm::placement::CpuPlacement;
use snapvm_vmm::snapshotting::restore_cli;
use snapvm_vmm::trigger;
use snapvm_vmm::{Vm, VmConfig, VmExit};

fn main() -> ExitCode {
    snapvm_vmm::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    return ExitCode::SUCCESS;
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    return fail("missing command (try 'snapvm --help')");
                }
                _ => {}
            }
            // clap renders several lines (usage, tips): keep the first.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::GuestElf(args) => guest_elf(args),
        Command::Snapshot(c) => client_command(|| api::commands::snapshot(c)),
        Command::Vm(c) => client_command(|| api::commands::vm(c)),
        Command::Restore(args) => client_command(|| api::commands::restore(&args)),
    }
}

/// `snapvm snapshot|vm|restore`: one API call (or a few), status 1 and one
/// line on failure.
fn client_command(f: impl FnOnce() -> Result<(), api::commands::CommandError>) -> ExitCode {
    if let Err(e) = cli::init_logging("warn") {
        return fail(e);
    }
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// The channel every request to the VM's owner goes through (API, trigger).
struct Requests {
    tx: Sender<Envelope>,
    rx: Receiver<Envelope>,
}

/// Starts the API server first, before any VM thread exists, so a bad
/// socket path fails fast and nothing else sees the socket's umask.
fn start_api(args: &RunArgs, requests: &Requests) -> Result<Option<ApiServer>, String> {
    let Some(path) = &args.api_sock else {
        return Ok(None);
    };
    snapvm_vmm::signals::install_stop()
        .map_err(|e| format!("cannot install the stop signal handlers: {e}"))?;
    ApiServer::start(path, requests.tx.clone())
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The owner's settings for the snapshots it takes, from the flags.
fn snapshot_defaults(args: &RunArgs) -> SnapshotDefaults {
    SnapshotDefaults {
        workers: snapshot_workers(args),
        priority: args.snapshot_priority,
        memory_budget: args.snapshot_memory_budget,
        track_dirty: args.snapshot_track_dirty,
        pool_at_start: args.snapshot_pool == cli::PoolTiming::AtStart
            && args.snapshot_mode.stages(),
    }
}

/// The instance id `GET /` reports.
fn instance_id() -> String {
    format!("snapvm-{}", std::process::id())
}

/// `--cpus`, checked against the CPUs this process may use.
fn cpu_placement(
    cpus: &Option<snapvm_snapshot::CpuSet>,
) -> Result<Option<CpuPlacement>, snapvm_vmm::placement::PlacementError> {
    cpus.clone().map(CpuPlacement::new).transpose()
}

fn snapshot_workers(args: &RunArgs) -> usize {
    args.snapshot_workers
        .map_or_else(cli::default_snapshot_workers, |n| n as usize)
}

fn guest_elf(args: cli::GuestElfArgs) -> ExitCode {
    use std::io::Write;
    let image = KernelImage::embedded();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.path)
        .and_then(|mut f| f.write_all(&image.bytes));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format_args!("cannot write {}: {e}", args.path.display())),
    }
}

/// Prints the one-line error and returns status 1.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    // Keep it to one line whatever the message contains.
    let msg = msg.to_string().replace('\n', " ");
    eprintln!("snapvm: error: {msg}");
    ExitCode::from(1)
}

/// Guest RAM in bytes (validated against host RAM) and the vCPU count, as
/// every command that boots a VM takes them.
fn machine_size(memory: &str, vcpus: u32) -> Result<(u64, usize), cli::ConfigError> {
    let memory_size = cli::guest_memory_size(memory, cli::host_ram_bytes())?;
    let vcpus = cli::validate_vcpus(vcpus)? as usize;
    Ok((memory_size, vcpus))
}

fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = cli::init_logging(&args.log_level) {
        return fail(e);
    }
    if let Err(e) = args.validate_snapshot_flags() {
        return fail(e);
    }
    let cpus = match cpu_placement(&args.cpus) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // Until (and unless) a trigger or a schedule takes snapshots on
    // SIGUSR1, it is logged and ignored: its default action would end the
    // VM and the data in it.
    if let Err(e) = snapvm_vmm::signals::install_snapshot_ignored() {
        return fail(format_args!("cannot install the SIGUSR1 handler: {e}"));
    }
    let (tx, rx) = mpsc::channel();
    let requests = Requests { tx, rx };
    let api = match start_api(&args, &requests) {
        Ok(api) => api,
        Err(e) => return fail(e),
    };
    if args.waits_for_load() {
        return match api {
            Some(api) => run_waiting(&args, api, requests, cpus),
            None => fail("--no-boot needs --api-sock: a VM comes only through PUT /snapshot/load"),
        };
    }
    if args.restore.is_some() {
        return run_restored(args, api, requests, cpus);
    }
    let (memory_size, vcpus) = match machine_size(args.memory(), args.vcpus()) {
        Ok(size) => size,
        Err(e) => return fail(e),
    };
    let kernel = match &args.kernel {
        Some(path) => match KernelImage::from_path(path) {
            Ok(k) => k,
            Err(e) => return fail(e),
        },
        None => KernelImage::embedded(),
    };
    let serial_out = match VmConfig::serial_sink(&args.serial) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // Bind before anything boots, so a busy port fails fast with one line.
    let kv_listen = args.effective_kv_listen();
    let listener = match &kv_listen {
        Some(addr) => {
            let addr = ListenAddr::parse(addr);
            match HostListener::bind(&addr) {
                Ok(l) => Some(l),
                Err(e) => return fail(format_args!("cannot listen on {addr}: {e}")),
            }
        }
        None => None,
    };
    let cmdline = match (&listener, &args.cmdline) {
        (Some(_), Some(c)) => Some(format!("{c} {}", virtio::cmdline_word())),
        (Some(_), None) => Some(virtio::cmdline_word()),
        (None, c) => c.clone(),
    };
    let config = VmConfig {
        boot: BootConfig {
            kernel,
            initrd: args.initrd.clone(),
            cmdline,
        },
        memory_size,
        vcpus,
        serial_out,
        serial_in: true,
        backing: args.hugepages(),
    };
    let mut vm = match snapvm_vmm::builder::boot(config) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    if let Some(p) = cpus {
        vm.set_cpu_placement(p);
    }
    if let Some(l) = listener {
        let bound = l.local_addr();
        if let Err(e) = vm.attach_vsock(l) {
            return fail(e);
        }
        tracing::info!("forwarding {bound} to guest vsock port 6379");
    }
    if let Err(e) = vm.start() {
        return fail(e);
    }
    let source = VmSource::Boot {
        kernel: args
            .kernel
            .as_ref()
            .map_or_else(|| "bundled".to_string(), |p| p.display().to_string()),
        cmdline: args.cmdline.clone(),
    };
    run_to_exit(vm, &args, api, requests, source)
}

/// Runs a started VM under its owner until it stops (taking the snapshots
/// asked for with --snapshot-dir, serving the API when there is one) and
/// maps its exit to the process status.
fn run_to_exit(
    vm: Vm,
    args: &RunArgs,
    api: Option<ApiServer>,
    requests: Requests,
    source: VmSource,
) -> ExitCode {
    let scheduled = args.snapshot_dir.is_some() && args.snapshot_every.is_some();
    let trigger = match &args.snapshot_dir {
        Some(_) if scheduled => None,
        Some(dir) => {
            let plan = trigger::TriggerPlan {
                dir: dir.clone(),
                at: args
                    .snapshot_at
                    .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
                mode: args.snapshot_mode,
                workers: snapshot_workers(args),
            };
            match trigger::Trigger::start(plan, requests.tx.clone()) {
                Ok(t) => Some(t),
                Err(e) => return fail(format_args!("cannot start the snapshot trigger: {e}")),
            }
        }
        None => None,
    };
    let mut owner = Owner::with_vm(vm, source, instance_id());
    owner.set_snapshot_defaults(snapshot_defaults(args));
    if let (Some(dir), Some(every)) = (&args.snapshot_dir, args.snapshot_every) {
        let order = owner::ScheduleOrder {
            dir: dir.clone(),
            every,
            keep: args.snapshot_keep as usize,
            full_every: args.snapshot_full_every as usize,
        };
        if let Err(e) = owner.start_schedule(order) {
            return fail(format_args!("{e}"));
        }
    }
    let Requests { tx, rx } = requests;
    // Only the API and the trigger send requests from here on: with the
    // API gone, the owner stops.
    drop(tx);
    let exit = owner::run(owner, &rx, api.is_some(), api.is_some());
    drop(trigger);
    // Answers in flight go out, then the socket file is removed.
    drop(api);
    exit_status(exit)
}

fn exit_status(exit: VmExit) -> ExitCode {
    tracing::info!("VM stopped: {exit:?}");
    match exit {
        VmExit::Error(msg) => fail(msg),
        other => ExitCode::from(other.exit_status() as u8),
    }
}

/// `snapvm run --no-boot --api-sock PATH`: no VM until `PUT /snapshot/load`
/// restores one (with `--kv-listen`, `--serial` as for `--restore`).
fn run_waiting(
    args: &RunArgs,
    server: ApiServer,
    requests: Requests,
    cpus: Option<CpuPlacement>,
) -> ExitCode {
    let kv_addr = args.kv_listen.as_deref().map(ListenAddr::parse);
    let kv_listener = match &kv_addr {
        Some(addr) => match HostListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => return fail(format_args!("cannot listen on {addr}: {e}")),
        },
        None => None,
    };
    let settings = LoadSettings {
        serial: args.serial.clone(),
        serial_in: true,
        kv_addr,
        kv_listener,
        cpus,
        backing: args.hugepages(),
    };
    tracing::info!("no VM: waiting for PUT /snapshot/load");
    let mut owner = Owner::waiting(settings, instance_id());
    owner.set_snapshot_defaults(snapshot_defaults(args));
    let Requests { tx, rx } = requests;
    drop(tx);
    let exit = owner::run(owner, &rx, true, true);
    drop(server);
    exit_status(exit)
}

/// `snapvm run --restore DIR`: the guest continues where it was at the
/// snapshot. Only an explicit --kv-listen is bound for a restored vsock
/// device.
fn run_restored(
    args: RunArgs,
    api: Option<ApiServer>,
    requests: Requests,
    cpus: Option<CpuPlacement>,
) -> ExitCode {
    let t_restore = std::time::Instant::now();
    let Some(dir) = args.restore.clone() else {
        return fail("--restore needs a directory");
    };
    let serial_out = match VmConfig::serial_sink(&args.serial) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let listener = match &args.kv_listen {
        Some(addr) => {
            let addr = ListenAddr::parse(addr);
            match HostListener::bind(&addr) {
                Ok(l) => Some(l),
                Err(e) => return fail(format_args!("cannot listen on {addr}: {e}")),
            }
        }
        None => None,
    };
    let opts = restore_cli::RestoreOptions {
        verify: args.verify,
        serial_out,
        serial_in: true,
        kv_listener: listener,
        backing: args.hugepages(),
        cpus,
    };
    let mut vm = match restore_cli::restore_from_dir(&dir, opts) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    if let Err(e) = vm.start() {
        return fail(e);
    }
    tracing::info!(
        "restored {} and resumed the guest in {:.1} ms (open, rebuild, start; memory loads meanwhile)",
        dir.display(),
        t_restore.elapsed().as_secs_f64() * 1e3
    );
    run_to_exit(vm, &args, api, requests, VmSource::Snapshot { path: dir })
}
