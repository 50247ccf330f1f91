//! `GET /metrics`: the Prometheus text exposition format (0.0.4), rendered
//! with the `prometheus` crate from the owner's counters at scrape time.

use prometheus::{Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::owner::MetricsReport;

/// VM states reported as `snapvm_vm_state{state=...}` (1 for the current).
const STATES: [&str; 4] = ["Not started", "Running", "Paused", "Stopped"];

pub fn render(m: &MetricsReport) -> Result<String, prometheus::Error> {
    let (vm_state, in_flight, c) = (m.vm_state, m.in_flight, &m.counters);
    let reg = Registry::new();
    let state = IntGaugeVec::new(
        Opts::new(
            "snapvm_vm_state",
            "1 for the VM's current state, 0 for the others",
        ),
        &["state"],
    )?;
    reg.register(Box::new(state.clone()))?;
    for s in STATES {
        state
            .with_label_values(&[&label(s)])
            .set(i64::from(s == vm_state));
    }
    let outcomes = IntCounterVec::new(
        Opts::new("snapvm_snapshots_total", "Snapshots that ended, by outcome"),
        &["outcome"],
    )?;
    reg.register(Box::new(outcomes.clone()))?;
    outcomes.with_label_values(&["done"]).inc_by(c.done);
    outcomes.with_label_values(&["failed"]).inc_by(c.failed);
    outcomes
        .with_label_values(&["cancelled"])
        .inc_by(c.cancelled);
    let inflight = IntGauge::new(
        "snapvm_snapshots_in_flight",
        "Snapshots copying or persisting",
    )?;
    reg.register(Box::new(inflight.clone()))?;
    inflight.set(in_flight as i64);
    let pause = Gauge::new(
        "snapvm_last_snapshot_pause_seconds",
        "The guest's stall in the sync phase of the latest snapshot (0: none yet)",
    )?;
    reg.register(Box::new(pause.clone()))?;
    pause.set(c.last_pause.map_or(0.0, |d| d.as_secs_f64()));
    let faults = IntCounterVec::new(
        Opts::new(
            "snapvm_snapshot_faults_total",
            "userfaultfd faults handled by ended snapshots, by kind",
        ),
        &["kind"],
    )?;
    reg.register(Box::new(faults.clone()))?;
    faults
        .with_label_values(&["write_protect"])
        .inc_by(c.wp_faults);
    faults
        .with_label_values(&["missing"])
        .inc_by(c.missing_faults);
    let bytes = IntCounterVec::new(
        Opts::new(
            "snapvm_snapshot_bytes_written_total",
            "Guest memory bytes written to memory images by ended snapshots",
        ),
        &[],
    )?;
    reg.register(Box::new(bytes.clone()))?;
    bytes.with_label_values(&[]).inc_by(c.bytes_written);
    let staging = IntGauge::new(
        "snapvm_snapshot_staging_bytes",
        "Staging memory held for snapshots' write faults (--snapshot-memory-budget)",
    )?;
    reg.register(Box::new(staging.clone()))?;
    staging.set(c.staging_bytes as i64);
    // Sizing the budget: a snapshot whose faults found the pool full made
    // the guest wait for the disk; the peak says how much it needed.
    let disk = IntCounterVec::new(
        Opts::new(
            "snapvm_snapshot_fault_disk_writes_total",
            "Guest write faults of ended snapshots that found the staging pool full and waited for their chunk's disk write (a larger --snapshot-memory-budget avoids them)",
        ),
        &[],
    )?;
    reg.register(Box::new(disk.clone()))?;
    disk.with_label_values(&[]).inc_by(c.fault_disk_writes);
    let peak = IntGauge::new(
        "snapvm_last_snapshot_staging_peak_bytes",
        "The most staging memory the latest ended snapshot held at once",
    )?;
    reg.register(Box::new(peak.clone()))?;
    peak.set(c.last_staging_peak as i64);
    if let Some(l) = &m.memory_load {
        // A restored VM: its memory coming in from the snapshot.
        let loaded = IntGauge::new(
            "snapvm_restore_chunks_loaded",
            "Data chunks (2 MiB) of a restored VM's memory loaded from its snapshot",
        )?;
        reg.register(Box::new(loaded.clone()))?;
        loaded.set(l.chunks_loaded as i64);
        let total = IntGauge::new(
            "snapvm_restore_chunks_total",
            "Data chunks a restored VM's memory loads from its snapshot",
        )?;
        reg.register(Box::new(total.clone()))?;
        total.set(l.chunks_total as i64);
        let read = IntCounterVec::new(
            Opts::new(
                "snapvm_restore_bytes_read_total",
                "Bytes read from the snapshot's memory image by the restore",
            ),
            &[],
        )?;
        reg.register(Box::new(read.clone()))?;
        read.with_label_values(&[]).inc_by(l.bytes_read);
        let done = IntGauge::new(
            "snapvm_restore_done",
            "1 once a restored VM's memory is all loaded (it no longer needs the snapshot)",
        )?;
        reg.register(Box::new(done.clone()))?;
        done.set(i64::from(l.state == "done"));
    }
    if let Some(t) = &m.tracking {
        let dirty = IntGauge::new(
            "snapvm_dirty_chunks",
            "Chunks (2 MiB) the guest wrote since the last snapshot: what an incremental one writes",
        )?;
        reg.register(Box::new(dirty.clone()))?;
        dirty.set(t.dirty_chunks as i64);
    }
    if let Some(s) = &m.schedule {
        let total = IntCounterVec::new(
            Opts::new(
                "snapvm_schedule_snapshots_total",
                "Scheduled snapshots (--snapshot-every), by outcome",
            ),
            &["outcome"],
        )?;
        reg.register(Box::new(total.clone()))?;
        total.with_label_values(&["done"]).inc_by(s.done);
        total.with_label_values(&["failed"]).inc_by(s.failed);
        let chain = IntGauge::new(
            "snapvm_schedule_chain_length",
            "Layers behind the newest scheduled snapshot (1: a full one)",
        )?;
        reg.register(Box::new(chain.clone()))?;
        chain.set(s.chain_length as i64);
        let last = IntGauge::new(
            "snapvm_schedule_last_success_timestamp_seconds",
            "When the newest scheduled snapshot was done (Unix time; 0: none yet)",
        )?;
        reg.register(Box::new(last.clone()))?;
        last.set(s.last_success.as_ref().map_or(0, |l| l.done_unix_s as i64));
        let bytes = IntGauge::new(
            "snapvm_schedule_last_bytes_written",
            "Guest memory bytes the newest scheduled snapshot wrote",
        )?;
        reg.register(Box::new(bytes.clone()))?;
        bytes.set(
            s.last_success
                .as_ref()
                .map_or(0, |l| l.bytes_written as i64),
        );
    }
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&reg.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// `Not started` → `not_started`.
fn label(state: &str) -> String {
    state.to_ascii_lowercase().replace(' ', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::Counters;
    use std::time::Duration;

    #[test]
    fn text_format() {
        let c = Counters {
            done: 2,
            failed: 1,
            cancelled: 1,
            last_pause: Some(Duration::from_micros(1500)),
            wp_faults: 7,
            missing_faults: 3,
            bytes_written: 4096,
            staging_bytes: 256 << 20,
            fault_disk_writes: 5,
            last_staging_peak: 40 << 20,
        };
        let m = MetricsReport {
            vm_state: "Running",
            in_flight: 1,
            counters: c,
            memory_load: Some(crate::owner::MemoryLoad {
                snapshot_path: "/var/tmp/snap".into(),
                state: "loading".into(),
                chunks_loaded: 3,
                chunks_total: 10,
                chunks_on_demand: 1,
                chunks_copied_in: 0,
                moves_retried: 0,
                bytes_read: 6 << 20,
                elapsed_ms: 500,
                error: None,
            }),
            schedule: Some(crate::schedule::ScheduleStatus {
                done: 4,
                failed: 1,
                chain_length: 3,
                ..Default::default()
            }),
            tracking: Some(crate::owner::Tracking {
                dirty_chunks: 17,
                parent: None,
            }),
        };
        let text = render(&m).unwrap();
        for line in [
            "# TYPE snapvm_vm_state gauge",
            "snapvm_vm_state{state=\"running\"} 1",
            "snapvm_vm_state{state=\"not_started\"} 0",
            "# TYPE snapvm_snapshots_total counter",
            "snapvm_snapshots_total{outcome=\"done\"} 2",
            "snapvm_snapshots_total{outcome=\"failed\"} 1",
            "snapvm_snapshots_total{outcome=\"cancelled\"} 1",
            "snapvm_snapshots_in_flight 1",
            "snapvm_last_snapshot_pause_seconds 0.0015",
            "snapvm_snapshot_faults_total{kind=\"write_protect\"} 7",
            "snapvm_snapshot_faults_total{kind=\"missing\"} 3",
            "snapvm_snapshot_bytes_written_total 4096",
            "snapvm_snapshot_staging_bytes 268435456",
            "snapvm_snapshot_fault_disk_writes_total 5",
            "snapvm_last_snapshot_staging_peak_bytes 41943040",
            "snapvm_restore_chunks_loaded 3",
            "snapvm_restore_chunks_total 10",
            "snapvm_restore_bytes_read_total 6291456",
            "snapvm_restore_done 0",
            "snapvm_dirty_chunks 17",
            "snapvm_schedule_snapshots_total{outcome=\"done\"} 4",
            "snapvm_schedule_snapshots_total{outcome=\"failed\"} 1",
            "snapvm_schedule_chain_length 3",
            "snapvm_schedule_last_success_timestamp_seconds 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
