//! `snapvm-bench pause`: pause/resume round trips of a running guest, in
//! this process (the VM is booted through `snapvm_vmm`, no `snapvm`
//! binary involved).
//!
//! Boots the embedded guest in `mode=counter` (every vCPU bumps its probe
//! heartbeat in a loop), then repeatedly pauses, checks that the heartbeats
//! are frozen (the VM really is held), resumes and waits until every
//! heartbeat moved again. Prints one JSON object on stdout.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::{PageBacking, Vm, VmConfig};

use crate::cli::{self, PauseArgs};
use crate::error::{BenchError, Result};

/// How long to wait for the guest to boot and start counting.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a resumed vCPU may take to show progress.
const RESUME_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two looks at the heartbeats after a resume.
const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// `snapvm-bench pause`: checks the flags, runs, prints the JSON result.
pub fn command(args: &PauseArgs) -> Result<()> {
    cli::init_vmm_logging(&args.log_level)?;
    let (memory_size, vcpus) = cli::machine_size(&args.memory, args.vcpus)?;
    if args.cycles == 0 {
        return Err(BenchError::NoCycles);
    }
    let result = run(vcpus, args.cycles, memory_size)?;
    println!("{}", result.to_json());
    Ok(())
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn from_ns(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        Percentiles {
            p50: us(h.value_at_quantile(0.5)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
            self.p50, self.p99, self.max
        )
    }
}

/// Results of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    pub vcpus: usize,
    pub cycles: u32,
    /// `Vm::pause()`: kick until every vCPU is held.
    pub pause: Percentiles,
    /// From `Vm::resume()` until every vCPU thread is back on its way into
    /// KVM_RUN (recorded by the vCPU threads themselves).
    pub resume: Percentiles,
    /// pause + resume.
    pub round_trip: Percentiles,
    /// From `Vm::resume()` until this thread saw every heartbeat move. With
    /// as many busy vCPUs as host cores this includes waiting for a core
    /// for the observing thread itself (a scheduler slice, ~4 ms).
    pub progress: Percentiles,
}

impl BenchResult {
    /// One JSON object (no serde needed for this flat shape).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"vcpus\":{},\"cycles\":{},\"pause_us\":{},\"resume_us\":{},\"round_trip_us\":{},\"progress_us\":{}}}",
            self.vcpus,
            self.cycles,
            self.pause.json(),
            self.resume.json(),
            self.round_trip.json(),
            self.progress.json()
        )
    }
}

fn histogram() -> Result<Histogram<u64>> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| BenchError::Histogram(format!("{e:?}")))
}

/// Boots the counter guest and measures `cycles` pause/resume round trips.
pub fn run(vcpus: usize, cycles: u32, memory_size: u64) -> Result<BenchResult> {
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some("mode=counter".into()),
        },
        memory_size,
        vcpus,
        // stdout carries the JSON result: the console goes to stderr.
        serial_out: Box::new(std::io::LineWriter::new(std::io::stderr())),
        serial_in: false,
        backing: PageBacking::Huge,
    };
    let mut vm = snapvm_vmm::builder::boot(config)?;
    vm.start()?;
    let result = measure(&vm, vcpus, cycles);
    vm.shutdown();
    result
}

fn check_running(vm: &Vm) -> Result<()> {
    match vm.exit_reason() {
        Some(exit) => Err(BenchError::GuestStopped(exit)),
        None => Ok(()),
    }
}

fn wait_for_counting(vm: &Vm, vcpus: usize) -> Result<()> {
    let start = Instant::now();
    let mut first: Option<Vec<u64>> = None;
    let mut last = String::from("none");
    loop {
        check_running(vm)?;
        match vm.heartbeats() {
            Ok(hb) if hb.len() == vcpus => match &first {
                None => first = Some(hb),
                Some(f) if hb.iter().zip(f).all(|(a, b)| a > b) => return Ok(()),
                Some(_) => last = format!("heartbeats {hb:?}"),
            },
            Ok(hb) => last = format!("{} probe slots", hb.len()),
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() > BOOT_TIMEOUT {
            return Err(BenchError::BootTimeout {
                vcpus,
                timeout: BOOT_TIMEOUT,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn measure(vm: &Vm, vcpus: usize, cycles: u32) -> Result<BenchResult> {
    wait_for_counting(vm, vcpus)?;
    let mut pause_h = histogram()?;
    let mut resume_h = histogram()?;
    let mut round_h = histogram()?;
    let mut progress_h = histogram()?;
    for cycle in 0..cycles {
        let probe = |source| BenchError::CycleProbe { cycle, source };
        let t0 = Instant::now();
        vm.pause()
            .map_err(|source| BenchError::Pause { cycle, source })?;
        let paused = t0.elapsed();
        let before = vm.heartbeats().map_err(probe)?;
        let again = vm.heartbeats().map_err(probe)?;
        if let Some((vcpu, (b, a))) = before
            .iter()
            .zip(&again)
            .enumerate()
            .find(|(_, (b, a))| b != a)
        {
            return Err(BenchError::NotHeld {
                cycle,
                vcpu,
                before: *b,
                after: *a,
            });
        }
        let t1 = Instant::now();
        vm.resume()
            .map_err(|source| BenchError::Resume { cycle, source })?;
        loop {
            let now = vm.heartbeats().map_err(probe)?;
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                break;
            }
            if t1.elapsed() > RESUME_TIMEOUT {
                check_running(vm)?;
                let vcpu = now
                    .iter()
                    .zip(&before)
                    .position(|(n, b)| n <= b)
                    .unwrap_or(0);
                return Err(BenchError::NoProgress {
                    cycle,
                    vcpu,
                    timeout: RESUME_TIMEOUT,
                });
            }
            // Few cores here: sleep rather than spin, so the observer does
            // not take a core from the vCPUs it is waiting for.
            std::thread::sleep(POLL_INTERVAL);
        }
        let progressed = t1.elapsed();
        // Every heartbeat moved, so every vCPU has left its hold.
        let resumed = vm.last_resume_latency().unwrap_or(progressed);
        let record = |h: &mut Histogram<u64>, d: Duration| {
            let _ = h.record((d.as_nanos() as u64).max(1));
        };
        record(&mut pause_h, paused);
        record(&mut resume_h, resumed);
        record(&mut round_h, paused + resumed);
        record(&mut progress_h, progressed);
    }
    Ok(BenchResult {
        vcpus,
        cycles,
        pause: Percentiles::from_ns(&pause_h),
        resume: Percentiles::from_ns(&resume_h),
        round_trip: Percentiles::from_ns(&round_h),
        progress: Percentiles::from_ns(&progress_h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let p = Percentiles {
            p50: 1.0,
            p99: 2.5,
            max: 10.0,
        };
        let r = BenchResult {
            vcpus: 2,
            cycles: 10,
            pause: p,
            resume: p,
            round_trip: p,
            progress: p,
        };
        assert_eq!(
            r.to_json(),
            "{\"vcpus\":2,\"cycles\":10,\"pause_us\":{\"p50\":1.0,\"p99\":2.5,\"max\":10.0},\"resume_us\":{\"p50\":1.0,\"p99\":2.5,\"max\":10.0},\"round_trip_us\":{\"p50\":1.0,\"p99\":2.5,\"max\":10.0},\"progress_us\":{\"p50\":1.0,\"p99\":2.5,\"max\":10.0}}"
        );
    }
}
