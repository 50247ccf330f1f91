//! A KV guest served over virtio-vsock, saved and restored: connections
//! that existed at the save are reset (the guest gets a transport reset),
//! the data survives, new connections work. Needs /dev/kvm: where it is
//! unusable the tests fail saying so (they never skip).

mod common;

use common::{require_kvm, Console};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapvm_vmm::builder::{self, RestoreConfig};
use snapvm_vmm::devices::virtio::cmdline_word;
use snapvm_vmm::devices::virtio::vsock::{HostListener, ListenAddr};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::vmstate::{ram_from_copies, VmStateError};
use snapvm_vmm::{Vm, VmConfig, VmExit};

const MEMORY: u64 = 256 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

impl Console {
    fn wait_for(&self, what: &str, vm: &Vm) {
        let start = Instant::now();
        while !self.text().contains(what) {
            assert!(
                vm.exit_reason().is_none(),
                "guest stopped ({:?}) before printing {what:?}:\n{}",
                vm.exit_reason(),
                self.text()
            );
            assert!(
                start.elapsed() < TIMEOUT,
                "no {what:?} on the console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A listener on a free local port, and its address.
fn listener() -> (HostListener, String) {
    let l = HostListener::bind(&ListenAddr::Tcp("127.0.0.1:0".into())).expect("bind");
    let addr = l.local_addr();
    (l, addr)
}

/// One RESP client connection.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        Client { s, buf: Vec::new() }
    }

    /// Sends a command, returns its reply (one RESP value, raw).
    fn cmd(&mut self, args: &[&str]) -> String {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.s.write_all(out.as_bytes()).expect("send");
        loop {
            if let Some(n) = complete(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..n).collect();
                return String::from_utf8_lossy(&reply).into_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("read reply");
            assert!(n > 0, "connection closed waiting for a reply to {args:?}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn info_clients(&mut self) -> u64 {
        let info = self.cmd(&["INFO", "clients"]);
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no connected_clients in {info:?}"))
    }
}

/// Length of the first complete simple or bulk reply in `b`.
fn complete(b: &[u8]) -> Option<usize> {
    let line = b.windows(2).position(|w| w == b"\r\n")? + 2;
    match b.first()? {
        b'$' => {
            let len: i64 = std::str::from_utf8(&b[1..line - 2]).ok()?.parse().ok()?;
            if len < 0 {
                return Some(line);
            }
            let end = line + len as usize + 2;
            (b.len() >= end).then_some(end)
        }
        _ => Some(line),
    }
}

fn boot(listener: HostListener, console: &Console) -> Vm {
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(format!("mode=kv {}", cmdline_word())),
        },
        memory_size: MEMORY,
        vcpus: 1,
        serial_out: Box::new(console.clone()),
        serial_in: false,
        backing: snapvm_vmm::PageBacking::default(),
    };
    let mut vm = builder::boot(config).expect("create VM");
    vm.attach_vsock(listener).expect("attach vsock");
    vm.start().expect("start VM");
    console.wait_for("kv: listening on vsock port 6379", &vm);
    vm
}

fn assert_quiet(console: &Console) {
    let text = console.text().to_lowercase();
    for bad in ["panic", "unusable", "error", "exception", "fault"] {
        assert!(!text.contains(bad), "guest printed {bad:?}:\n{text}");
    }
}

/// Median and maximum of `samples`.
fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

#[test]
fn kv_guest_restores_resets_old_connections_and_serves_new_ones() {
    require_kvm();
    let (l, addr) = listener();
    let console = Console::default();
    let vm = boot(l, &console);

    let mut c1 = Client::connect(&addr);
    assert_eq!(c1.cmd(&["SET", "greeting", "hello"]), "+OK\r\n");
    let mut c2 = Client::connect(&addr);
    assert_eq!(c2.cmd(&["PING"]), "+PONG\r\n");
    assert_eq!(c1.info_clients(), 2);

    // Device pause round trips while a client keeps the device busy.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&addr);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(c.cmd(&["INCR", "busy"]), format!(":{}\r\n", n + 1));
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let mut pause = Vec::new();
    let mut round = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        vm.pause_devices().expect("pause devices");
        pause.push(t0.elapsed());
        vm.pause_devices().expect("pause is idempotent");
        vm.resume_devices();
        round.push(t0.elapsed());
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let served = load.join().expect("load thread");
    assert!(served > 0);
    let (pm, px) = summary(pause);
    let (rm, rx) = summary(round);
    eprintln!(
        "vsock pause_devices: median {pm:?}, max {px:?}; pause+resume: median {rm:?}, max {rx:?} \
         (200 rounds, {served} requests served meanwhile)"
    );

    // The load client has gone: wait until the guest has let it go, so
    // exactly c1 and c2 are open at the save.
    let start = Instant::now();
    while c1.info_clients() != 2 {
        assert!(start.elapsed() < TIMEOUT, "load client never released");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The snapshot's sync phase: vCPUs, then devices.
    vm.pause().expect("pause");
    let mut vm = vm;
    assert!(
        matches!(vm.save_state(), Err(VmStateError::Vsock(_))),
        "state must be refused while the device thread runs"
    );
    vm.pause_devices().expect("pause devices");
    let state = vm.save_state().expect("save state");
    let vs = state.vsock.as_ref().expect("vsock state");
    assert!(vs.transport.status & 4 != 0, "driver OK");
    assert!(vs.next_host_port > 1024, "three host connections were made");
    let blob = state.encode().expect("encode");
    let state = snapvm_vmm::vmstate::VmState::decode(&blob).expect("decode");
    let copies: Vec<Vec<u8>> = vm
        .memory()
        .regions()
        .iter()
        .map(|r| {
            // SAFETY: the region is mapped for `len` bytes and nothing
            // writes guest memory while vCPUs and devices are paused.
            unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.len) }.to_vec()
        })
        .collect();
    vm.resume_devices();
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    drop(vm);
    // The old process's connections went with its device.
    let mut b = [0u8; 16];
    assert!(matches!(c2.s.read(&mut b), Ok(0) | Err(_)));
    assert_quiet(&console);

    let (l, addr) = listener();
    let console = Console::default();
    let ram = ram_from_copies(&state.memory_layout, &copies).expect("copy RAM");
    let config = RestoreConfig {
        serial_out: Box::new(console.clone()),
        serial_in: false,
        kv_listener: Some(l),
    };
    let mut vm = builder::restore(config, ram, &state).expect("restore");
    vm.start().expect("start restored VM");
    console.wait_for("kv: vsock transport reset: dropped 2 connections", &vm);

    let mut c = Client::connect(&addr);
    assert_eq!(c.cmd(&["GET", "greeting"]), "$5\r\nhello\r\n");
    // Only this connection: the two from before the save were released.
    assert_eq!(c.info_clients(), 1);
    assert_eq!(c.cmd(&["SET", "after", "restore"]), "+OK\r\n");
    let mut d = Client::connect(&addr);
    assert_eq!(d.cmd(&["GET", "after"]), "$7\r\nrestore\r\n");
    assert_eq!(d.cmd(&["INCR", "busy"]), format!(":{}\r\n", served + 1));
    assert_eq!(d.info_clients(), 2);
    drop(c);
    let start = Instant::now();
    while d.info_clients() != 1 {
        assert!(start.elapsed() < TIMEOUT, "closed client never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_quiet(&console);
    // Stopping must not wait for a parked device thread.
    vm.pause_devices().expect("pause devices");
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    vm.pause_devices()
        .expect("pausing a stopped device is a no-op");
    vm.resume_devices();
}
