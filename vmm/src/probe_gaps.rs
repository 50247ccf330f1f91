//! The guest's gap log (`abi::ProbeBlock::gap_log`) read from the host:
//! when the guest stalled, so a stall can be matched to what the VMM did
//! at that moment (e.g. the gap that spans a snapshot's pause).

use snapvm_guest::abi::ProbeBlock;

/// Stalls the guest logged in its probe block
/// ([`crate::vm::Vm::probe_gaps`]).
#[derive(Debug, Clone, Default)]
pub struct ProbeGaps {
    pub records: Vec<snapvm_guest::abi::GapRecord>,
    /// Records overwritten before they were read.
    pub lost: u64,
    pub tsc_khz: u64,
}

impl ProbeGaps {
    /// The longest logged gap that contains guest-TSC instant `tsc`, as
    /// microseconds (whole gap, part before `tsc`, part after); None if no
    /// logged gap does.
    pub fn spanning_us(&self, tsc: u64) -> Option<(f64, f64, f64)> {
        if self.tsc_khz == 0 {
            return None;
        }
        let us = |t: u64| t as f64 * 1000.0 / self.tsc_khz as f64;
        self.records
            .iter()
            .filter(|r| r.start_tsc <= tsc && tsc <= r.end_tsc)
            .max_by_key(|r| r.end_tsc - r.start_tsc)
            .map(|r| {
                (
                    us(r.end_tsc - r.start_tsc),
                    us(tsc - r.start_tsc),
                    us(r.end_tsc - tsc),
                )
            })
    }

    /// The longest logged gap and where it started relative to guest-TSC
    /// instant `tsc` (µs; negative: before it).
    pub fn longest_us(&self, tsc: u64) -> Option<(f64, f64)> {
        if self.tsc_khz == 0 {
            return None;
        }
        let us = |t: i128| t as f64 * 1000.0 / self.tsc_khz as f64;
        self.records
            .iter()
            .max_by_key(|r| r.end_tsc.saturating_sub(r.start_tsc))
            .map(|r| {
                (
                    us(i128::from(r.end_tsc.saturating_sub(r.start_tsc))),
                    us(i128::from(r.start_tsc) - i128::from(tsc)),
                )
            })
    }

    /// The records of a copy of the block from `cursors` on (see
    /// [`crate::vm::Vm::probe_gaps`]).
    pub fn read(block: &ProbeBlock, cursors: &mut Vec<u64>) -> ProbeGaps {
        use snapvm_guest::abi::GAP_LOG_LEN;
        let n = (block.cpus as usize).min(block.slots.len());
        if cursors.len() < n {
            cursors.resize(n, 0);
        }
        let mut out = ProbeGaps {
            tsc_khz: block.tsc_khz,
            ..ProbeGaps::default()
        };
        // Records within this margin of being overwritten are skipped: the
        // guest may be rewriting them while the copy of the block is taken
        // (it cannot log 8 gaps of >= 50 us during one read).
        let safe = (GAP_LOG_LEN - 8) as u64;
        for (cpu, cursor) in cursors.iter_mut().enumerate().take(n) {
            let count = block.slots[cpu].gap_count;
            let first = (*cursor).max(count.saturating_sub(safe));
            out.lost += first - (*cursor).min(first);
            for i in first..count {
                out.records
                    .push(block.gap_log[cpu][(i % GAP_LOG_LEN as u64) as usize]);
            }
            *cursor = count.max(*cursor);
        }
        out
    }

    pub fn extend(&mut self, more: ProbeGaps) {
        self.records.extend(more.records);
        self.lost += more.lost;
        if more.tsc_khz != 0 {
            self.tsc_khz = more.tsc_khz;
        }
    }
}

#[cfg(test)]
mod tests {
    use snapvm_guest::abi::{GapRecord, ProbeBlock, GAP_LOG_LEN};

    use super::ProbeGaps;

    /// A block whose vCPU `cpu` logged gaps `[(start, end)]` in order.
    fn block_with(cpu: usize, gaps: &[(u64, u64)]) -> ProbeBlock {
        let mut b = ProbeBlock::EMPTY;
        b.cpus = 2;
        b.tsc_khz = 1_000; // 1 tick = 1 µs
        for (n, &(start_tsc, end_tsc)) in gaps.iter().enumerate() {
            b.gap_log[cpu][n % GAP_LOG_LEN] = GapRecord { start_tsc, end_tsc };
        }
        b.slots[cpu].gap_count = gaps.len() as u64;
        b
    }

    #[test]
    fn the_gap_containing_the_instant_is_found_with_its_split() {
        let b = block_with(1, &[(100, 200), (1_000, 3_500), (4_000, 4_100)]);
        let mut cursors = Vec::new();
        let gaps = ProbeGaps::read(&b, &mut cursors);
        assert_eq!(gaps.records.len(), 3);
        assert_eq!(gaps.lost, 0);
        assert_eq!(cursors, vec![0, 3]);
        assert_eq!(gaps.spanning_us(1_500), Some((2_500.0, 500.0, 2_000.0)));
        assert_eq!(gaps.spanning_us(3_700), None, "between two gaps");
        assert_eq!(gaps.longest_us(3_700), Some((2_500.0, -2_700.0)));
        // Read again: nothing new.
        assert!(ProbeGaps::read(&b, &mut cursors).records.is_empty());
    }

    #[test]
    fn a_lapped_reader_counts_what_it_lost_and_skips_records_being_rewritten() {
        let gaps: Vec<(u64, u64)> = (0..200u64).map(|i| (i * 10, i * 10 + 5)).collect();
        let b = block_with(0, &gaps);
        let mut cursors = vec![0, 0];
        let read = ProbeGaps::read(&b, &mut cursors);
        let kept = (GAP_LOG_LEN - 8) as u64;
        assert_eq!(read.records.len() as u64, kept);
        assert_eq!(read.lost, 200 - kept);
        assert_eq!(
            read.records.last(),
            Some(&GapRecord {
                start_tsc: 1_990,
                end_tsc: 1_995
            })
        );
        assert_eq!(cursors[0], 200);
    }

    #[test]
    fn no_tsc_frequency_means_no_answer() {
        let mut b = block_with(0, &[(0, 10)]);
        b.tsc_khz = 0;
        assert_eq!(ProbeGaps::read(&b, &mut Vec::new()).spanning_us(5), None);
    }
}
