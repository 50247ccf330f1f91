//! Which dirty tracking costs a guest writing steadily less (issue #20):
//! userfaultfd write protection at 2 MiB, what snapvm's `DirtyTracker`
//! does (snapshot/src/tracking.rs), or KVM's dirty log
//! (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`, 4 KiB pages).
//!
//! Boots the scribble guest in this process (every vCPU writes one word per
//! 4 KiB page across `pct` % of its heap, forever), waits for its first
//! pass, then alternates windows `off`, `uffd`, `kvm-dirty-log` (`rounds`
//! times, `window` seconds each). While a tracker is on, every `interval`
//! it collects the dirty set and arms again, as one snapshot interval
//! would: uffd re-protects the chunks written since (one fault per chunk
//! per interval follows), the dirty log's GET clears and re-protects the
//! pages written (one fault per 4 KiB page per interval follows). Prints
//! one JSON line per window: the guest's passes per second (its write
//! rate), relative to the `off` windows, the dirty units seen per
//! interval and the time collecting + arming took.
//!
//! `cargo run --release -p snapvm-bench --example dirty_log_probe -- [MiB=2048] [pct=50] [interval_ms=1000] [window_s=5] [rounds=2]`

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use snapvm_snapshot::uffd::{feature, Event, FaultKind, RegisterMode, Uffd};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::memory::HostRegion;
use snapvm_vmm::{PageBacking, Vm, VmConfig};

const CHUNK: u64 = 2 << 20;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(default)
}

/// The guest's passes over its buffer so far (0 until its probe is set up).
fn passes(vm: &Vm) -> u64 {
    vm.heartbeats().unwrap_or_default().iter().sum()
}

/// The uffd tracker: WP-registered guest RAM, a thread that lets a write
/// through and marks its chunk, and re-arming of the marked chunks.
struct UffdTracker {
    uffd: Arc<Uffd>,
    regions: Vec<HostRegion>,
    dirty: Arc<Vec<AtomicBool>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UffdTracker {
    fn start(regions: &[HostRegion]) -> UffdTracker {
        let uffd = Arc::new(Uffd::new(feature::PAGEFAULT_FLAG_WP).expect("userfaultfd"));
        let chunks: usize = regions.iter().map(|r| r.len / CHUNK as usize).sum();
        let dirty: Arc<Vec<AtomicBool>> =
            Arc::new((0..chunks).map(|_| AtomicBool::new(false)).collect());
        for r in regions {
            uffd.register(r.host_addr as u64, r.len as u64, RegisterMode::WP)
                .expect("register");
            uffd.write_protect(r.host_addr as u64, r.len as u64, true, false)
                .expect("write-protect");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (uffd, dirty, stop) = (uffd.clone(), dirty.clone(), stop.clone());
            let regions = regions.to_vec();
            std::thread::spawn(move || serve(&uffd, &regions, &dirty, &stop))
        };
        UffdTracker {
            uffd,
            regions: regions.to_vec(),
            dirty,
            stop,
            thread: Some(thread),
        }
    }

    /// Collects the dirty chunks and protects them again.
    fn rearm(&self) -> usize {
        let mut n = 0;
        let mut i = 0;
        for r in &self.regions {
            for c in 0..(r.len as u64 / CHUNK) {
                if self.dirty[i].swap(false, Ordering::AcqRel) {
                    n += 1;
                    let _ =
                        self.uffd
                            .write_protect(r.host_addr as u64 + c * CHUNK, CHUNK, true, false);
                }
                i += 1;
            }
        }
        n
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host_addr as u64, r.len as u64);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(uffd: &Uffd, regions: &[HostRegion], dirty: &[AtomicBool], stop: &AtomicBool) {
    let mut events = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut fds = [libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one live pollfd; 50 ms so that `stop` is seen.
        if unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) } <= 0 {
            continue;
        }
        events.clear();
        if uffd.read_events(&mut events).is_err() {
            continue;
        }
        for ev in &events {
            let Event::PageFault { address, kind } = *ev else {
                continue;
            };
            let chunk = address & !(CHUNK - 1);
            let mut i = 0;
            for r in regions {
                let (start, len) = (r.host_addr as u64, r.len as u64);
                if (start..start + len).contains(&address) {
                    dirty[i + ((chunk - start) / CHUNK) as usize].store(true, Ordering::Release);
                    break;
                }
                i += (len / CHUNK) as usize;
            }
            match kind {
                FaultKind::WriteProtect => {
                    let _ = uffd.write_protect(chunk, CHUNK, false, false);
                }
                FaultKind::Missing { .. } => {
                    let _ = uffd.wake(address, 4096);
                }
            }
        }
    }
}

/// Turns KVM's dirty log on or off for every memslot.
fn set_dirty_log(vm: &Vm, on: bool) {
    for r in vm.memory().regions() {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: r.guest_addr,
            memory_size: r.len as u64,
            userspace_addr: r.host_addr as u64,
        };
        // SAFETY: the same slot, addresses and live mapping the VM registered;
        // only the flags change.
        unsafe { vm.vm_fd().set_user_memory_region(region) }.expect("memslot flags");
    }
}

/// KVM_GET_DIRTY_LOG of every slot (clears and re-protects what it reports).
fn collect_dirty_log(vm: &Vm) -> usize {
    vm.memory()
        .regions()
        .iter()
        .map(|r| {
            vm.vm_fd()
                .get_dirty_log(r.slot, r.len)
                .expect("KVM_GET_DIRTY_LOG")
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
        })
        .sum()
}

fn main() {
    let mib = arg(1, 2048);
    let pct = arg(2, 50);
    let interval = Duration::from_millis(arg(3, 1000));
    let window = Duration::from_secs(arg(4, 5));
    let rounds = arg(5, 2);
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(format!("mode=scribble scribble_pct={pct}")),
        },
        memory_size: mib << 20,
        vcpus: 1,
        serial_out: Box::new(std::io::sink()),
        serial_in: false,
        backing: PageBacking::Huge,
    };
    let mut vm = snapvm_vmm::builder::boot(config).expect("boot");
    vm.start().expect("start");
    while passes(&vm) < 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut off_rate = Vec::new();
    for round in 0..rounds {
        for how in ["off", "uffd", "kvm-dirty-log"] {
            let tracker = match how {
                "uffd" => Some(UffdTracker::start(vm.memory().regions())),
                "kvm-dirty-log" => {
                    set_dirty_log(&vm, true);
                    None
                }
                _ => None,
            };
            let (p0, t0) = (passes(&vm), Instant::now());
            let (mut units, mut arm, mut intervals) = (0usize, Duration::ZERO, 0u32);
            while t0.elapsed() < window {
                std::thread::sleep(interval.min(window.saturating_sub(t0.elapsed())));
                let t = Instant::now();
                units += match (how, &tracker) {
                    ("uffd", Some(tr)) => tr.rearm(),
                    ("kvm-dirty-log", _) => collect_dirty_log(&vm),
                    _ => 0,
                };
                arm += t.elapsed();
                intervals += 1;
            }
            let rate = (passes(&vm) - p0) as f64 / t0.elapsed().as_secs_f64();
            if let Some(tr) = tracker {
                tr.stop();
            }
            if how == "kvm-dirty-log" {
                set_dirty_log(&vm, false);
            }
            if how == "off" {
                off_rate.push(rate);
            }
            let base = off_rate.iter().sum::<f64>() / off_rate.len().max(1) as f64;
            println!(
                "{{\"round\":{round},\"tracking\":\"{how}\",\"memory_mib\":{mib},\"scribble_pct\":{pct},\"interval_ms\":{},\"passes_per_s\":{rate:.3},\"vs_off\":{:.3},\"dirty_units_per_interval\":{},\"unit_bytes\":{},\"collect_and_arm_ms_per_interval\":{:.3}}}",
                interval.as_millis(),
                rate / base,
                units / intervals.max(1) as usize,
                if how == "kvm-dirty-log" { 4096 } else { CHUNK },
                arm.as_secs_f64() * 1e3 / intervals.max(1) as f64,
            );
        }
    }
    vm.shutdown();
}
