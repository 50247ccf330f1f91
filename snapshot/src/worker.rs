//! Worker threads: the child's background copiers of async-fork. Each takes
//! the next chunk in address order, claims its units that nobody claimed
//! yet, saves them straight from guest RAM into the image and lifts their
//! protection, until none is left or the snapshot is aborted. Between
//! chunks they write out the fault path's staged units first (each frees a
//! slot for the next fault).

use std::sync::Arc;

use crate::chunk_table::Copier;
use crate::metrics::Counters;
use crate::shared::Shared;

pub(crate) fn run(shared: Arc<Shared>) {
    if let Some(n) = shared.injection.hold_workers_until_fault_copies {
        let c = &shared.counters;
        while !shared.is_aborted()
            && Counters::get(&c.by_fault_path) + Counters::get(&c.by_hook) < n
        {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    let per = shared.units_per_chunk();
    let mut units = Vec::with_capacity(per);
    while !shared.is_aborted() {
        if shared.drain_one() {
            continue;
        }
        let Some(chunk) = shared.table.next_chunk(per) else {
            break;
        };
        units.clear();
        units.extend((chunk * per..(chunk + 1) * per).filter(|&u| shared.table.try_claim(u)));
        // Claimed units are always settled by save_units, even after an
        // abort, so nobody waits on them forever.
        if !shared.save_units(&units, Copier::Worker) {
            break;
        }
    }
}
