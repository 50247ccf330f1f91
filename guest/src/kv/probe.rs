//! Latency probe: what the guest itself sees of its own service times.
//!
//! The point of snapvm is to show how a snapshot disturbs a running guest;
//! the guest measures two things with its own clock: how long each command
//! takes to execute, and the longest gap in the kernel's main loop (a vCPU
//! that is paused or stuck behind a fault shows up there). `INFO latency`
//! reports both; `PROBE RESET` and `CONFIG RESETSTAT` clear them.

use core::cell::Cell;
use core::fmt::Write;

use super::hist::Histogram;

/// A monotonic tick source (the kernel uses the TSC).
pub trait Clock {
    fn now_ticks(&self) -> u64;
    /// Ticks per microsecond; at least 1.
    fn ticks_per_us(&self) -> u64;
}

/// A clock that only moves when told to: for tests and host tools.
pub struct ManualClock {
    now: Cell<u64>,
    tpus: u64,
}

impl ManualClock {
    pub fn new(ticks_per_us: u64) -> ManualClock {
        ManualClock {
            now: Cell::new(0),
            tpus: ticks_per_us.max(1),
        }
    }

    pub fn advance(&self, ticks: u64) {
        self.now.set(self.now.get().wrapping_add(ticks));
    }
}

impl Clock for ManualClock {
    fn now_ticks(&self) -> u64 {
        self.now.get()
    }

    fn ticks_per_us(&self) -> u64 {
        self.tpus
    }
}

/// Converts ticks to microseconds as a float.
pub fn ticks_to_us(ticks: u64, ticks_per_us: u64) -> f64 {
    ticks as f64 / ticks_per_us.max(1) as f64
}

/// Command service times and main-loop gaps, in ticks.
#[derive(Default)]
pub struct Probe {
    cmd: Histogram,
    max_loop_gap: u64,
}

impl Probe {
    pub fn new() -> Probe {
        Probe::default()
    }

    /// One command took `ticks` from parse to reply.
    pub fn record_cmd(&mut self, ticks: u64) {
        self.cmd.record(ticks);
    }

    /// The kernel saw `ticks` between two iterations of its main loop.
    pub fn record_loop_gap(&mut self, ticks: u64) {
        self.max_loop_gap = self.max_loop_gap.max(ticks);
    }

    pub fn max_loop_gap(&self) -> u64 {
        self.max_loop_gap
    }

    pub fn commands(&self) -> &Histogram {
        &self.cmd
    }

    pub fn reset(&mut self) {
        self.cmd.reset();
        self.max_loop_gap = 0;
    }

    /// Appends the `# Latency` INFO section body (fields only).
    pub fn write_info(&self, out: &mut impl Write, tpus: u64) -> core::fmt::Result {
        let us = |t: u64| ticks_to_us(t, tpus);
        write!(
            out,
            "probe_max_loop_gap_us:{:.3}\r\nprobe_cmd_p50_us:{:.3}\r\nprobe_cmd_p99_us:{:.3}\r\n\
             probe_cmd_p999_us:{:.3}\r\nprobe_cmd_max_us:{:.3}\r\nprobe_cmd_count:{}\r\n",
            us(self.max_loop_gap),
            us(self.cmd.quantile(0.5)),
            us(self.cmd.quantile(0.99)),
            us(self.cmd.quantile(0.999)),
            us(self.cmd.max()),
            self.cmd.count()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn info_and_reset() {
        let mut p = Probe::new();
        // Values below 128 ticks are recorded exactly.
        for t in 1..=100u64 {
            p.record_cmd(t);
        }
        p.record_loop_gap(5000);
        p.record_loop_gap(300);
        let mut s = String::new();
        p.write_info(&mut s, 2).unwrap();
        assert_eq!(
            s,
            "probe_max_loop_gap_us:2500.000\r\nprobe_cmd_p50_us:25.000\r\nprobe_cmd_p99_us:49.500\r\n\
             probe_cmd_p999_us:50.000\r\nprobe_cmd_max_us:50.000\r\nprobe_cmd_count:100\r\n"
        );
        p.reset();
        let mut s = String::new();
        p.write_info(&mut s, 10).unwrap();
        assert!(s.contains("probe_cmd_count:0\r\n"));
        assert!(s.contains("probe_max_loop_gap_us:0.000\r\n"));
    }

    #[test]
    fn manual_clock() {
        let c = ManualClock::new(0);
        assert_eq!(c.ticks_per_us(), 1);
        c.advance(5);
        assert_eq!(c.now_ticks(), 5);
    }
}
