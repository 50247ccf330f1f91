//! Worker threads: the child's background copiers of async-fork. Each claims
//! the next unclaimed chunk in address order, copies it and lifts its
//! protection, until none is left or the snapshot is aborted. Between
//! chunks they move the fault path's staged chunks to the destination
//! (staging.rs).

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
    while !shared.is_aborted() {
        // Staged chunks first: each frees a warm slot for the next fault.
        if shared.drain_one() {
            continue;
        }
        let Some(i) = shared.table.claim_next() else {
            break;
        };
        // A claimed chunk is always settled by copy_claimed, even after an
        // abort, so nobody waits on it forever.
        if !shared.copy_claimed(i, Copier::Worker) {
            break;
        }
    }
}
