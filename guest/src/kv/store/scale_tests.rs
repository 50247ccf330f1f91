//! Scale checks on the host (release mode recommended), ignored by default:
//! `cargo test --release -p snapvm-guest --lib -- --ignored --nocapture scale`

extern crate std;
use super::*;
use std::time::Instant;

#[test]
#[ignore]
fn scale_insert_latency_and_flush() {
    let n: usize = std::env::var("KV_SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let mut s = Store::new(StoreConfig::default());
    let mut worst = 0u128;
    let mut worst_work = 0u64;
    let mut ins = crate::kv::hist::Histogram::new();
    let t = Instant::now();
    let mut key = Vec::new();
    for i in 0..n {
        key.clear();
        key.extend_from_slice(b"key:");
        key.extend_from_slice(alloc::format!("{i}").as_bytes());
        let w0 = s.dict().work_counter();
        let t0 = Instant::now();
        s.set(&key, b"0123456789abcdef").unwrap();
        let ns = t0.elapsed().as_nanos();
        ins.record(ns as u64);
        worst = worst.max(ns);
        worst_work = worst_work.max(s.dict().work_counter() - w0);
    }
    let fill = t.elapsed();
    std::println!(
        "insert ns p50 {} p99.9 {} p99.99 {} max {}",
        ins.quantile(0.5),
        ins.quantile(0.999),
        ins.quantile(0.9999),
        ins.max()
    );
    std::println!(
        "{n} inserts in {fill:?}; worst single insert {} us, worst rehash work {worst_work} buckets; used_memory {} MiB",
        worst / 1000,
        s.used_memory() >> 20
    );
    let t0 = Instant::now();
    s.flush();
    std::println!("flush returned in {:?}", t0.elapsed());
    let t0 = Instant::now();
    let mut steps = 0;
    let mut worst_step = 0u128;
    let mut sh = crate::kv::hist::Histogram::new();
    loop {
        let ts = Instant::now();
        let more = s.background_step(1000);
        let ns = ts.elapsed().as_nanos();
        sh.record(ns as u64);
        if ns > 5_000_000 {
            std::println!("slow step {steps}: {} us", ns / 1000);
        }
        worst_step = worst_step.max(ns);
        steps += 1;
        if !more {
            break;
        }
    }
    std::println!(
        "lazy free: {steps} steps in {:?}, worst step {} us",
        t0.elapsed(),
        worst_step / 1000
    );
    std::println!(
        "step ns p50 {} p99 {} max {}",
        sh.quantile(0.5),
        sh.quantile(0.99),
        sh.max()
    );
    assert_eq!(s.used_memory(), BASE_MEMORY);

    let t0 = Instant::now();
    let n_str = alloc::format!("{n}");
    let out = crate::kv::commands::test_util::run(
        &mut s,
        &[b"DEBUG", b"POPULATE", n_str.as_bytes(), b"key", b"100"],
    );
    assert_eq!(out, b"+OK\r\n");
    std::println!(
        "DEBUG POPULATE {n} key 100: {:?}, used_memory {} MiB",
        t0.elapsed(),
        s.used_memory() >> 20
    );
}
