//! Open-loop load over real TCP connections (RESP).
//!
//! Every request has a scheduled send time fixed in advance from the target
//! rate; its latency is reply time minus *scheduled* time. When the server
//! stalls, the sender keeps to the schedule (it sends late requests in a
//! burst as soon as it can), so the queueing delay a stalled server causes
//! is counted rather than hidden (no coordinated omission).
//!
//! Each connection has a sender thread and a receiver thread; replies come
//! back in request order, so the receiver pairs them with scheduled times
//! through a FIFO channel.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::resp;

/// How long the receivers wait for outstanding replies after the load stops.
const DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    /// Requests per second over all connections.
    pub rate: f64,
    pub conns: usize,
    /// Fraction of requests that are SETs (the rest GETs).
    pub write_ratio: f64,
    /// Keys `key:0` .. `key:{keys-1}` (as DEBUG POPULATE names them).
    pub keys: u64,
    pub value_size: usize,
}

/// One answered request, times in ns since the run's epoch.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub sched_ns: u64,
    pub latency_ns: u64,
}

/// What one run of the load produced.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub samples: Vec<Sample>,
    pub sent: u64,
    pub errors: u64,
    /// Requests without a reply by the end of the drain.
    pub unanswered: u64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<ConnResult>>>,
}

#[derive(Default)]
struct ConnResult {
    samples: Vec<Sample>,
    sent: u64,
    errors: u64,
}

fn ns_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

impl Load {
    /// Opens the connections and starts sending; times are relative to `epoch`.
    pub fn start(cfg: &LoadConfig, epoch: Instant) -> Result<Load> {
        if cfg.rate.is_nan() || cfg.rate <= 0.0 || cfg.conns == 0 {
            return Err(BenchError::Invalid(format!(
                "load needs a rate > 0 and at least one connection (rate {}, conns {})",
                cfg.rate, cfg.conns
            )));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let interval_ns = (1e9 * cfg.conns as f64 / cfg.rate) as u64;
        let start_ns = ns_since(epoch);
        let mut threads = Vec::new();
        for i in 0..cfg.conns {
            let stream = TcpStream::connect(cfg.addr)
                .map_err(|e| BenchError::net(format!("load connection to {}", cfg.addr), e))?;
            let _ = stream.set_nodelay(true);
            let reader = stream
                .try_clone()
                .map_err(|e| BenchError::net("clone load socket", e))?;
            let (tx, rx) = mpsc::channel::<u64>();
            let sent = Arc::new(AtomicU64::new(0));
            let sender_done = Arc::new(AtomicBool::new(false));
            // Connections are phase-shifted so the aggregate is evenly spaced.
            let first = start_ns + interval_ns * i as u64 / cfg.conns as u64;
            let sender = {
                let (cfg, stop, sent, done) =
                    (cfg.clone(), stop.clone(), sent.clone(), sender_done.clone());
                let seed = 0x5eed_0000 + i as u64;
                std::thread::Builder::new()
                    .name(format!("load-tx{i}"))
                    .spawn(move || {
                        let r = send_loop(
                            stream,
                            &cfg,
                            epoch,
                            first,
                            interval_ns,
                            seed,
                            &stop,
                            &tx,
                            &sent,
                        );
                        done.store(true, Ordering::SeqCst);
                        r
                    })
                    .map_err(|e| BenchError::net("spawn load sender", e))?
            };
            let receiver = std::thread::Builder::new()
                .name(format!("load-rx{i}"))
                .spawn(move || {
                    let r = recv_loop(reader, epoch, &rx, &sent, &sender_done);
                    let sent_ok = sender.join().unwrap_or_else(|_| {
                        Err(BenchError::Invalid("load sender panicked".into()))
                    });
                    sent_ok?;
                    r
                })
                .map_err(|e| BenchError::net("spawn load receiver", e))?;
            threads.push(receiver);
        }
        Ok(Load { stop, threads })
    }

    /// Stops sending, waits for outstanding replies and returns every sample.
    pub fn finish(self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = LoadResult::default();
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(BenchError::Invalid("load receiver panicked".into())))?;
            out.sent += r.sent;
            out.errors += r.errors;
            out.unanswered += r.sent - r.samples.len() as u64;
            out.samples.extend(r.samples);
        }
        out.samples.sort_by_key(|s| s.sched_ns);
        Ok(out)
    }
}

#[allow(clippy::too_many_arguments)]
fn send_loop(
    mut stream: TcpStream,
    cfg: &LoadConfig,
    epoch: Instant,
    first_ns: u64,
    interval_ns: u64,
    seed: u64,
    stop: &AtomicBool,
    tx: &mpsc::Sender<u64>,
    sent: &AtomicU64,
) -> Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let value = vec![b'v'; cfg.value_size];
    let mut next = first_ns;
    let mut buf = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::SeqCst) {
        let now = ns_since(epoch);
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
            continue;
        }
        // Everything that is due now goes out in one write.
        buf.clear();
        let mut n = 0;
        while next <= now && n < 4096 {
            let key = format!("key:{}", rng.u64(0..cfg.keys.max(1)));
            if rng.f64() < cfg.write_ratio {
                resp::encode(&mut buf, &[b"SET", key.as_bytes(), &value]);
            } else {
                resp::encode(&mut buf, &[b"GET", key.as_bytes()]);
            }
            // Queued before the bytes leave, so the receiver always finds it.
            let _ = tx.send(next);
            next += interval_ns;
            n += 1;
        }
        sent.fetch_add(n, Ordering::SeqCst);
        stream
            .write_all(&buf)
            .map_err(|e| BenchError::net(format!("send load to {}", cfg.addr), e))?;
    }
    Ok(())
}

fn recv_loop(
    mut stream: TcpStream,
    epoch: Instant,
    rx: &mpsc::Receiver<u64>,
    sent: &AtomicU64,
    sender_done: &AtomicBool,
) -> Result<ConnResult> {
    let mut r = ConnResult::default();
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut chunk = vec![0u8; 128 * 1024];
    let mut drain_deadline: Option<Instant> = None;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| BenchError::net("load socket timeout", e))?;
    loop {
        let received = r.samples.len() as u64;
        if sender_done.load(Ordering::SeqCst) {
            if received >= sent.load(Ordering::SeqCst) {
                break;
            }
            let d = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN);
            if Instant::now() >= d {
                break;
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(BenchError::net("receive load replies", e)),
        };
        let now = ns_since(epoch);
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        while let Some(p) = resp::parse(&buf, pos).map_err(|reply| BenchError::Reply {
            what: "load reply".into(),
            reply,
        })? {
            pos += p.len;
            let Ok(sched) = rx.try_recv() else {
                return Err(BenchError::Invalid(
                    "a reply arrived for a request that was never sent".into(),
                ));
            };
            r.errors += u64::from(p.error);
            r.samples.push(Sample {
                sched_ns: sched,
                latency_ns: now.saturating_sub(sched),
            });
        }
        buf.drain(..pos);
    }
    r.sent = sent.load(Ordering::SeqCst);
    Ok(r)
}
