//! `snapvm`: command-line front end of the VMM library.
//!
//! Exit status: the guest's poweroff status; 3 for a guest exception or
//! triple fault; 1 for VMM, KVM and usage errors. Every error is one line
//! on stderr starting with `snapvm: error: `.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{self, BenchCommand, Cli, Command, RunArgs};
use vmm::devices::virtio::{
    self,
    vsock::{HostListener, ListenAddr},
};
use vmm::loader::{BootConfig, KernelImage};
use vmm::snapshotting::{restore_cli, trigger};
use vmm::{Vm, VmConfig, VmExit};

fn main() -> ExitCode {
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
        Command::Bench(BenchCommand::Pause(args)) => bench_pause(args),
        Command::Bench(BenchCommand::Snapshot(args)) => bench_snapshot(args),
        Command::GuestElf(args) => guest_elf(args),
    }
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

fn init_logging(level: &str) -> Result<(), cli::ConfigError> {
    let level = cli::validate_log_level(level)?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    Ok(())
}

/// Guest RAM in bytes (validated against host RAM) and the vCPU count, as
/// every command that boots a VM takes them.
fn machine_size(memory: &str, vcpus: u32) -> Result<(u64, usize), cli::ConfigError> {
    let memory_size = cli::guest_memory_size(memory, cli::host_ram_bytes())?;
    let vcpus = cli::validate_vcpus(vcpus)? as usize;
    Ok((memory_size, vcpus))
}

fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        return fail(e);
    }
    if let Err(e) = args.validate_snapshot_flags() {
        return fail(e);
    }
    if args.restore.is_some() {
        return run_restored(args);
    }
    let (memory_size, vcpus) = match machine_size(&args.memory, args.vcpus) {
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
        backing: args.hugepages,
    };
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
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
    run_to_exit(vm, &args)
}

/// Runs a started VM until it stops (taking the snapshots asked for with
/// --snapshot-dir) and maps its exit to the process status.
fn run_to_exit(mut vm: Vm, args: &RunArgs) -> ExitCode {
    let exit = match &args.snapshot_dir {
        Some(dir) => {
            if let Err(e) = trigger::install_sigusr1() {
                return fail(format_args!("cannot install the SIGUSR1 handler: {e}"));
            }
            let plan = trigger::TriggerPlan {
                dir: dir.clone(),
                at: args
                    .snapshot_at
                    .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
                mode: args.snapshot_mode,
                workers: args
                    .snapshot_workers
                    .map_or_else(cli::default_snapshot_workers, |n| n as usize),
                keep_memory: args.snapshot_keep_memory,
            };
            trigger::run_until_exit(&mut vm, &plan)
        }
        None => vm.wait(),
    };
    tracing::info!("VM stopped: {exit:?}");
    match exit {
        VmExit::Error(msg) => fail(msg),
        other => ExitCode::from(other.exit_status() as u8),
    }
}

/// `snapvm run --restore DIR`: the guest continues where it was at the
/// snapshot. Only an explicit --kv-listen is bound for a restored vsock
/// device.
fn run_restored(args: RunArgs) -> ExitCode {
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
    let mut vm = match restore_cli::restore_from_dir(&dir, args.verify, serial_out, true, listener)
    {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    if let Err(e) = vm.start() {
        return fail(e);
    }
    tracing::info!(
        "restored {} and resumed the guest in {:.1} ms (open, map, rebuild, start)",
        dir.display(),
        t_restore.elapsed().as_secs_f64() * 1e3
    );
    run_to_exit(vm, &args)
}

fn bench_pause(args: cli::BenchPauseArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        return fail(e);
    }
    let (memory_size, vcpus) = match machine_size(&args.memory, args.vcpus) {
        Ok(size) => size,
        Err(e) => return fail(e),
    };
    if args.cycles == 0 {
        return fail(cli::ConfigError::NoCycles);
    }
    match vmm::bench_pause::run(vcpus, args.cycles, memory_size) {
        Ok(result) => {
            println!("{}", result.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn bench_snapshot(args: cli::BenchSnapshotArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        return fail(e);
    }
    let (memory_size, vcpus) = match machine_size(&args.memory, args.vcpus) {
        Ok(size) => size,
        Err(e) => return fail(e),
    };
    if !args.dir.is_dir() {
        return fail(format_args!(
            "--dir {}: not a directory",
            args.dir.display()
        ));
    }
    let params = vmm::bench_snapshot::Params {
        memory_size,
        vcpus,
        modes: args.modes,
        workers: args.workers,
        backing: args.hugepages,
        dir: args.dir,
        populate_fraction: args.populate_fraction,
        warm: args.warm,
        baseline: std::time::Duration::from_millis(args.baseline_ms.max(1)),
    };
    let result = vmm::bench_snapshot::run(&params, &mut |row| {
        println!("{}", row.to_json());
    });
    match result {
        Ok(rows) => {
            println!();
            print!("{}", vmm::bench_snapshot::markdown(&rows));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
