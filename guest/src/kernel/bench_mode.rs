//! Mode `bench`: the guest drives its own KV store, no host transport, and
//! prints one JSON line per time window on the serial port (see
//! `kv::bench`). Runs the same under snapvm and QEMU microvm, so
//! hypervisors can be compared on identical work.
//!
//! Each operation goes through the real command path: a RESP request is
//! built and fed to a [`Connection`], and the reply is consumed from its
//! output buffer. The timed part (feed + consume) is what a client would
//! see minus the transport: parsing, command dispatch, the store, reply
//! encoding. Building the request is not timed.

use alloc::vec;
use alloc::vec::Vec;

use snapvm_guest::kv::bench::{
    scramble, write_window_json, BenchOptions, Dist, Histogram, Window, WyRand, Zipfian,
};
use snapvm_guest::kv::probe::ticks_to_us;
use snapvm_guest::kv::{Clock, Connection, Store, StoreConfig};

use super::cmdline::Cmdline;
use super::probe::Heartbeat;
use super::pv;
use super::tsc::{self, rdtsc};

/// Exit status for a bad option (as for any bad command line).
const EXIT_STATUS_USAGE: u8 = 2;
/// Exit status when the run itself fails (store full while populating).
const EXIT_STATUS_FAILED: u8 = 1;
/// Command-line words that are the kernel's, not the benchmark's.
const KERNEL_KEYS: &[&str] = &["mode", "virtio_mmio.device", "console"];
/// Heap kept out of the store for buffers and allocator slack.
const MIN_RESERVE: u64 = 64 << 20;
const KEY_PREFIX: &[u8] = b"key:";

struct TscClock {
    tpus: u64,
}

impl Clock for TscClock {
    fn now_ticks(&self) -> u64 {
        rdtsc()
    }

    fn ticks_per_us(&self) -> u64 {
        self.tpus
    }
}

/// Serial output collected into one buffer, printed with one `print!`.
struct Line(alloc::string::String);

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.push_str(s);
        Ok(())
    }
}

pub fn run(cmdline: &Cmdline, heap_bytes: u64) -> ! {
    let opts = match BenchOptions::parse(cmdline.raw(), KERNEL_KEYS) {
        Ok(o) => o,
        Err(e) => {
            println!("bench: error: {e}");
            pv::poweroff(EXIT_STATUS_USAGE)
        }
    };
    let tpus = (tsc::khz() / 1000).max(1);
    if tsc::khz() == 0 {
        println!("bench: warning: TSC frequency unknown, assuming 1 GHz");
    }
    let reserve = MIN_RESERVE.max(heap_bytes / 20);
    let maxmemory = heap_bytes.saturating_sub(reserve).max(1 << 20) as usize;
    let mut store = Store::new(StoreConfig {
        maxmemory,
        heap_used: Some(super::heap::used_bytes),
        hash_seed: rdtsc(),
        ..StoreConfig::default()
    });
    let (dist, theta) = match opts.dist {
        Dist::Uniform => ("uniform", 0.0),
        Dist::Zipfian(theta) => ("zipfian", theta),
    };
    println!(
        "bench: keys={} value_size={} write_ratio={} dist={dist} theta={theta} duration_s={} window_ms={} tsc_khz={}",
        opts.keys,
        opts.value_size,
        opts.write_ratio,
        opts.duration_s,
        opts.window_ms,
        tsc::khz(),
    );

    // Populate straight through the store API: setup, not measured work.
    let value = vec![b'x'; opts.value_size];
    let mut key = Vec::with_capacity(32);
    let t0 = rdtsc();
    for i in 0..opts.keys {
        make_key(&mut key, i);
        if store.set(&key, &value).is_err() {
            println!(
                "bench: error: store full after {i} of {} keys (maxmemory {} MiB)",
                opts.keys,
                maxmemory >> 20
            );
            pv::poweroff(EXIT_STATUS_FAILED)
        }
    }
    println!(
        "bench: populated {} keys in {} ms",
        opts.keys,
        rdtsc().wrapping_sub(t0) / tpus / 1000
    );

    run_loop(&opts, &mut store, tpus, &value)
}

/// `key:<decimal i>` into `out`, without going through `core::fmt`.
fn make_key(out: &mut Vec<u8>, mut i: u64) {
    out.clear();
    out.extend_from_slice(KEY_PREFIX);
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (i % 10) as u8;
        n += 1;
        i /= 10;
        if i == 0 {
            break;
        }
    }
    out.extend(digits[..n].iter().rev());
}

fn push_usize(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[..len].iter().rev());
}

fn push_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    push_usize(out, arg.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// A RESP array request `args` into `out`.
fn build_request(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.clear();
    out.push(b'*');
    push_usize(out, args.len());
    out.extend_from_slice(b"\r\n");
    for a in args {
        push_bulk(out, a);
    }
}

fn run_loop(opts: &BenchOptions, store: &mut Store, tpus: u64, value: &[u8]) -> ! {
    let clock = TscClock { tpus };
    let ticks_per_ms = tpus * 1000;
    let window_ticks = opts.window_ms.saturating_mul(ticks_per_ms);
    let duration_ticks = opts
        .duration_s
        .saturating_mul(1000)
        .saturating_mul(ticks_per_ms);

    let mut rng = WyRand::new(rdtsc() | 1);
    let mut zipf = match opts.dist {
        Dist::Zipfian(theta) => Some(Zipfian::new(opts.keys, theta)),
        Dist::Uniform => None,
    };
    let mut conn = Connection::new(store);
    let mut key = Vec::with_capacity(32);
    let mut req = Vec::with_capacity(value.len() + 64);
    let mut window = Histogram::new();
    let mut total = Histogram::new();
    let mut line = Line(alloc::string::String::with_capacity(256));
    let mut heartbeat = Heartbeat::new(0);

    let (mut window_ops, mut total_ops, mut errors, mut misses) = (0u64, 0u64, 0u64, 0u64);
    let (mut window_stall, mut total_stall) = (0u64, 0u64);
    let start = rdtsc();
    let mut window_end = start + window_ticks;
    let end = (duration_ticks > 0).then(|| start + duration_ticks);
    let mut last = start;
    loop {
        // The stall probe: time between iteration starts, here and in the
        // probe block's BSP slot for the VMM.
        heartbeat.beat();
        let now = rdtsc();
        let gap = now.wrapping_sub(last);
        last = now;
        window_stall = window_stall.max(gap);

        let reached_end = end.is_some_and(|e| now >= e);
        if now >= window_end || reached_end {
            let t_end = if reached_end {
                end.unwrap_or(now)
            } else {
                window_end
            };
            line.0.clear();
            let _ = write_window_json(
                &mut line,
                &Window {
                    t_ms: t_end.wrapping_sub(start) / ticks_per_ms,
                    ops: window_ops,
                    latencies: &window,
                    max_stall_ticks: window_stall,
                },
                tpus,
            );
            print!("{}", line.0);
            total.merge(&window);
            total_ops += window_ops;
            total_stall = total_stall.max(window_stall);
            window.reset();
            window_ops = 0;
            window_stall = 0;
            if reached_end {
                break;
            }
            while window_end <= now {
                window_end += window_ticks;
            }
            // Printing took a while on purpose: not a stall.
            heartbeat.skip_gap();
            last = rdtsc();
            continue;
        }

        let index = match zipf.as_mut() {
            Some(z) => scramble(z.next(&mut rng), opts.keys),
            None => rng.below(opts.keys),
        };
        make_key(&mut key, index);
        let write = rng.next_f64() < opts.write_ratio;
        if write {
            build_request(&mut req, &[b"SET", &key, value]);
        } else {
            build_request(&mut req, &[b"GET", &key]);
        }

        let t0 = rdtsc();
        conn.feed(store, &req, &clock);
        let out = conn.output();
        let first = out.first().copied();
        let nil = out.starts_with(b"$-1");
        let n = out.len();
        conn.consume_output(n);
        let t1 = rdtsc();

        window.record(t1.wrapping_sub(t0));
        window_ops += 1;
        match first {
            Some(b'-') | None => errors += 1,
            Some(b'$') if nil => misses += 1,
            _ => {}
        }
    }

    let elapsed = rdtsc().wrapping_sub(start);
    let us = |t: u64| ticks_to_us(t, tpus);
    let secs = us(elapsed) / 1e6;
    println!(
        "bench: done ops={} secs={:.3} ops_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} max_stall_us={:.1} errors={} misses={}",
        total_ops,
        secs,
        total_ops as f64 / secs.max(1e-9),
        us(total.quantile(0.5)),
        us(total.quantile(0.99)),
        us(total.quantile(0.999)),
        us(total.max()),
        us(total_stall),
        errors,
        misses,
    );
    conn.release(store);
    pv::poweroff(0)
}
