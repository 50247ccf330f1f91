//! `GET /metrics`: the Prometheus text exposition format (0.0.4), rendered
//! with the `prometheus` crate from the owner's counters at scrape time.

use prometheus::{Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::owner::Counters;

/// VM states reported as `snapvm_vm_state{state=...}` (1 for the current).
const STATES: [&str; 4] = ["Not started", "Running", "Paused", "Stopped"];

pub fn render(vm_state: &str, in_flight: usize, c: &Counters) -> Result<String, prometheus::Error> {
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
        };
        let text = render("Running", 1, &c).unwrap();
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
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
