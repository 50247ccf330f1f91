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
    counters(
        &reg,
        "snapvm_snapshots_total",
        "Snapshots that ended, by outcome",
        "outcome",
        &[
            ("done", c.done),
            ("failed", c.failed),
            ("cancelled", c.cancelled),
        ],
    )?;
    gauge(
        &reg,
        "snapvm_snapshots_in_flight",
        "Snapshots copying or persisting",
        in_flight as i64,
    )?;
    let pause = Gauge::new(
        "snapvm_last_snapshot_pause_seconds",
        "The guest's stall in the sync phase of the latest snapshot (0: none yet)",
    )?;
    reg.register(Box::new(pause.clone()))?;
    pause.set(c.last_pause.map_or(0.0, |d| d.as_secs_f64()));
    counters(
        &reg,
        "snapvm_snapshot_faults_total",
        "userfaultfd faults handled by ended snapshots, by kind",
        "kind",
        &[
            ("write_protect", c.wp_faults),
            ("missing", c.missing_faults),
        ],
    )?;
    counter(
        &reg,
        "snapvm_snapshot_bytes_written_total",
        "Guest memory bytes written to memory images by ended snapshots",
        c.bytes_written,
    )?;
    gauge(
        &reg,
        "snapvm_snapshot_staging_bytes",
        "Staging memory held for snapshots' write faults (--snapshot-memory-budget)",
        c.staging_bytes as i64,
    )?;
    // Sizing the budget: a snapshot whose faults found the pool full made
    // the guest wait for the disk; the peak says how much it needed.
    counter(
        &reg,
        "snapvm_snapshot_fault_disk_writes_total",
        "Guest write faults of ended snapshots that found the staging pool full and waited for their chunk's disk write (a larger --snapshot-memory-budget avoids them)",
        c.fault_disk_writes,
    )?;
    gauge(
        &reg,
        "snapvm_last_snapshot_staging_peak_bytes",
        "The most staging memory the latest ended snapshot held at once",
        c.last_staging_peak as i64,
    )?;
    if let Some(l) = &m.memory_load {
        // A restored VM: its memory coming in from the snapshot.
        gauge(
            &reg,
            "snapvm_restore_chunks_loaded",
            "Data chunks (2 MiB) of a restored VM's memory loaded from its snapshot",
            l.chunks_loaded as i64,
        )?;
        gauge(
            &reg,
            "snapvm_restore_chunks_total",
            "Data chunks a restored VM's memory loads from its snapshot",
            l.chunks_total as i64,
        )?;
        counter(
            &reg,
            "snapvm_restore_bytes_read_total",
            "Bytes read from the snapshot's memory image by the restore",
            l.bytes_read,
        )?;
        gauge(
            &reg,
            "snapvm_restore_done",
            "1 once a restored VM's memory is all loaded (it no longer needs the snapshot)",
            i64::from(l.state == "done"),
        )?;
    }
    if let Some(t) = &m.tracking {
        gauge(
            &reg,
            "snapvm_dirty_chunks",
            "Chunks (2 MiB) the guest wrote since the last snapshot: what an incremental one writes",
            t.dirty_chunks as i64,
        )?;
    }
    if let Some(s) = &m.schedule {
        counters(
            &reg,
            "snapvm_schedule_snapshots_total",
            "Scheduled snapshots (--snapshot-every), by outcome",
            "outcome",
            &[("done", s.done), ("failed", s.failed)],
        )?;
        gauge(
            &reg,
            "snapvm_schedule_chain_length",
            "Layers behind the newest scheduled snapshot (1: a full one)",
            s.chain_length as i64,
        )?;
        gauge(
            &reg,
            "snapvm_schedule_last_success_timestamp_seconds",
            "When the newest scheduled snapshot was done (Unix time; 0: none yet)",
            s.last_success.as_ref().map_or(0, |l| l.done_unix_s as i64),
        )?;
        gauge(
            &reg,
            "snapvm_schedule_last_bytes_written",
            "Guest memory bytes the newest scheduled snapshot wrote",
            s.last_success
                .as_ref()
                .map_or(0, |l| l.bytes_written as i64),
        )?;
    }
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&reg.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// Registers an integer gauge without labels, set to `v`.
fn gauge(reg: &Registry, name: &str, help: &str, v: i64) -> Result<(), prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    reg.register(Box::new(g.clone()))?;
    g.set(v);
    Ok(())
}

/// Registers a counter without labels, at `v`.
fn counter(reg: &Registry, name: &str, help: &str, v: u64) -> Result<(), prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &[])?;
    reg.register(Box::new(c.clone()))?;
    c.with_label_values(&[]).inc_by(v);
    Ok(())
}

/// Registers a counter with one label, one series per `(value, count)`.
fn counters(
    reg: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    reg.register(Box::new(c.clone()))?;
    for &(value, n) in values {
        c.with_label_values(&[value]).inc_by(n);
    }
    Ok(())
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
