//! What the kernel does after booting, chosen by `mode=` on the command
//! line (default: [`DEFAULT_MODE`]).

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

use super::cmdline::Cmdline;
use super::probe::Heartbeat;
use super::{pv, smp};

/// Exit status for a bad command line (unknown mode, bad option value).
const EXIT_STATUS_USAGE: u8 = 2;
/// How long the BSP waits for APs to check in.
const AP_TIMEOUT_MS: u64 = 5_000;
/// An unmapped, canonical address: the identity map stops at 64 GiB and
/// this is PML4 slot 224.
const UNMAPPED_ADDR: u64 = 0x7000_0000_0000;
/// A non-canonical address: any access raises #GP.
const NON_CANONICAL_ADDR: u64 = 0x8000_0000_0000_0000;

/// The mode without `mode=`.
const DEFAULT_MODE: &str = "kv";

/// What the APs do, set by the BSP before it starts them.
static AP_ROLE: AtomicU8 = AtomicU8::new(ROLE_IDLE);
const ROLE_IDLE: u8 = 0;
const ROLE_COUNTER: u8 = 1;

pub fn run_bsp(cmdline: Cmdline, cpus: u32, heap_bytes: u64) -> ! {
    let mode = cmdline.get("mode").unwrap_or(DEFAULT_MODE);
    match mode {
        "kv" => {
            start_aps(cpus, ROLE_IDLE);
            super::kv_server::run(&cmdline, heap_bytes)
        }
        "bench" => super::bench_mode::run(&cmdline, heap_bytes),
        "idle" => {
            start_aps(cpus, ROLE_IDLE);
            idle_loop(0)
        }
        "poweroff" => poweroff(cmdline),
        "fault" => fault(cmdline.get("fault").unwrap_or("pf")),
        "counter" => counter_bsp(cpus),
        "scribble" => super::scribble::run_bsp(&cmdline, cpus, heap_bytes),
        "panic" => panic!("requested by mode=panic"),
        other => {
            println!("unknown mode '{other}'");
            pv::poweroff(EXIT_STATUS_USAGE)
        }
    }
}

pub fn run_ap(cpu: usize) -> ! {
    if super::scribble::active() {
        super::scribble::run_ap(cpu)
    }
    match AP_ROLE.load(Ordering::Acquire) {
        ROLE_COUNTER => counter_loop(cpu),
        _ => idle_loop(cpu),
    }
}

/// Starts the APs in `role`; returns how many checked in.
fn start_aps(cpus: u32, role: u8) -> u32 {
    AP_ROLE.store(role, Ordering::Release);
    match smp::start_aps(cpus) {
        0 => 0,
        started => smp::wait_for_aps(started, AP_TIMEOUT_MS),
    }
}

/// Sleeps in the VMM between heartbeats, so an idle guest costs nothing.
fn idle_loop(cpu: usize) -> ! {
    let mut heartbeat = Heartbeat::new(cpu);
    loop {
        heartbeat.beat();
        pv::wait_us(0);
    }
}

fn poweroff(cmdline: Cmdline) -> ! {
    let status = match cmdline.get_u64("status", 0).map(u8::try_from) {
        Ok(Ok(status)) => status,
        _ => {
            println!("bad status '{}'", cmdline.get("status").unwrap_or(""));
            pv::poweroff(EXIT_STATUS_USAGE)
        }
    };
    println!("poweroff status={status}");
    pv::poweroff(status)
}

/// Raises the requested exception from ring 3; the ring-0 stub reports it.
fn fault(kind: &str) -> ! {
    println!("fault: raising {kind}");
    // In each arm the instruction faults before it has any effect, and
    // the exception stub never returns here.
    match kind {
        // SAFETY: the store faults (#PF), nothing is written.
        "pf" => unsafe { asm!("mov qword ptr [{}], 0", in(reg) UNMAPPED_ADDR, options(nostack)) },
        // SAFETY: the load faults (#GP), nothing is read.
        "gp" => unsafe {
            asm!(
                "mov {tmp}, qword ptr [{addr}]",
                addr = in(reg) NON_CANONICAL_ADDR,
                tmp = out(reg) _,
                options(nostack),
            )
        },
        // SAFETY: ud2 only raises #UD.
        "ud" => unsafe { asm!("ud2", options(nostack)) },
        // SAFETY: dividing by zero raises #DE; registers are declared clobbered.
        "de" => unsafe {
            asm!(
                "div {zero}",
                zero = in(reg) 0u64,
                inout("rax") 1u64 => _,
                inout("rdx") 0u64 => _,
                options(nostack),
            )
        },
        other => {
            println!("unknown fault '{other}'");
            pv::poweroff(EXIT_STATUS_USAGE)
        }
    }
    println!("fault: {kind} did not fault");
    pv::poweroff(1)
}

fn counter_bsp(cpus: u32) -> ! {
    let aps = start_aps(cpus, ROLE_COUNTER);
    println!("counter mode: {} cpus running", aps + 1);
    counter_loop(0)
}

/// As fast as the vCPU runs: one heartbeat per iteration.
fn counter_loop(cpu: usize) -> ! {
    let mut heartbeat = Heartbeat::new(cpu);
    loop {
        heartbeat.beat();
    }
}
