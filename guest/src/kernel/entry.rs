//! Ring-3 Rust entry points (reached by `iretq` from `boot.rs`) and the
//! panic handler.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use snapvm_guest::abi::{EXIT_STATUS_PANIC, MAX_CPUS};
use spin::Once;

use super::cmdline::Cmdline;
use super::paging::{self, STATIC_MAPPED_END};
use super::start_info::BootInfo;
use super::{heap, modes, probe, pv, serial, smp, tsc};

/// The banner tests look for; identical under every hypervisor.
pub const BANNER: &str = concat!("snapvm-guest ", env!("CARGO_PKG_VERSION"), " booted");

const MIB: u64 = 1 << 20;

static BOOT_INFO: Once<BootInfo> = Once::new();

/// The BSP's first Rust code: `cpu` is 0, `start_info` the PVH start info.
pub extern "C" fn bsp_entry(_cpu: u64, start_info: u64) -> ! {
    init_fpu();
    serial::Serial::init();
    pv::detect();

    let boot = BOOT_INFO.call_once(|| match BootInfo::parse(start_info, STATIC_MAPPED_END) {
        Ok(info) => info,
        Err(err) => {
            println!("warning: unusable start info at {start_info:#x}: {err}");
            BootInfo::empty()
        }
    });
    let mapped_end = paging::map_ram_above_4g(boot.ram_end());
    let heap_bytes = heap::init(boot, mapped_end);
    let (tsc_khz, tsc_source) = tsc::init();
    let cpus = pv::cpu_count().min(MAX_CPUS as u32);
    pv::register_probe(probe::init(cpus, tsc_khz));

    println!("{BANNER}");
    println!(
        "hypervisor={} cpus={} mem_mib={} heap_mib={} tsc_khz={} tsc_source={} cmdline=\"{}\"",
        pv::hypervisor_name(),
        cpus,
        boot.ram_bytes() / MIB,
        heap_bytes / MIB,
        tsc_khz,
        tsc_source,
        boot.cmdline(),
    );
    if mapped_end < boot.ram_end() {
        println!("warning: RAM above {} MiB is not mapped", mapped_end / MIB);
    }
    modes::run_bsp(Cmdline::new(boot.cmdline()), cpus, heap_bytes)
}

/// Every AP's first Rust code, `cpu` in 1..MAX_CPUS.
pub extern "C" fn ap_entry(cpu: u64, _start_info: u64) -> ! {
    init_fpu();
    smp::check_in();
    modes::run_ap(cpu as usize)
}

/// Puts x87 and SSE into their documented initial state, independent of
/// what the VMM left in the vCPU.
fn init_fpu() {
    let mxcsr: u32 = 0x1f80; // all exceptions masked, round to nearest
                             // SAFETY: fninit and ldmxcsr only change FPU control state; CR0/CR4 were
                             // set up for them by the boot stub.
    unsafe {
        asm!(
            "fninit",
            "ldmxcsr [{}]",
            in(reg) &mxcsr,
            options(nostack, readonly),
        )
    };
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // A panic while printing the panic: just stop.
    if !PANICKING.swap(true, Ordering::SeqCst) {
        serial::print_unlocked(format_args!("\nkernel panic: {info}\n"));
    }
    pv::poweroff(EXIT_STATUS_PANIC)
}
