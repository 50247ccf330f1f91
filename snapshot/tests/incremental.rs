//! Incremental snapshots (issue #20): writes are tracked between
//! snapshots, a diff writes only what changed since its parent, a chain
//! reads back bit-exact (and merges into the same bytes), and a broken
//! chain is refused naming the layer.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use snapvm_snapshot::lazy::{ChunkBuf, ChunkData, ImageSource};
use snapvm_snapshot::persist::chain::relative_to_child;
use snapvm_snapshot::persist::merge::merge;
use snapvm_snapshot::persist::{ChunkEntry, ParentRef, SnapshotChain, MEMORY_FILE, STATE_FILE};
use snapvm_snapshot::tracking::TrackerSlot;
use snapvm_snapshot::{Config, Engine, Snapshot, SnapshotDir, SnapshotWriter, WriteOptions};

fn engine(slot: &Arc<TrackerSlot>, base: Option<Vec<ChunkEntry>>) -> Engine {
    Engine::new(Config {
        workers: 2,
        track: Some(slot.clone()),
        diff_base: base.map(Arc::new),
        ..Config::default()
    })
    .expect("engine")
}

/// Takes a snapshot of `mem` into `target` (a diff of `parent` when given),
/// running `during` after the instant and before the copy ends. Returns
/// the snapshot and the memory as it was at the instant.
fn take(
    eng: &Engine,
    mem: &Mem,
    target: &Path,
    parent: Option<&Path>,
    during: impl FnOnce(),
) -> (Snapshot, Vec<u8>) {
    let opts = WriteOptions {
        parent: parent.map(|p| {
            let (state_crc, state_len) = SnapshotDir::open(p).expect("parent").content_id();
            ParentRef {
                path: relative_to_child(target, p),
                state_crc,
                state_len,
            }
        }),
        ..WriteOptions::default()
    };
    let w = SnapshotWriter::create(target, &[mem.region()], &opts).expect("writer");
    let regions = [mem.region()];
    // SAFETY: `mem` outlives the snapshot (wait below).
    unsafe { eng.arm(&regions, w.image()) }.expect("arm");
    let reference = mem.reference();
    // SAFETY: as above.
    unsafe { eng.begin(&regions, w.image()) }.expect("begin");
    eng.start_copy().expect("start");
    during();
    let snap = eng.wait().expect("snapshot");
    w.commit(&snap, VM_STATE).expect("commit");
    (snap, reference)
}

/// The memory a chain stands for, read chunk by chunk (each checked).
fn chain_bytes(dir: &Path) -> Vec<u8> {
    let chain = SnapshotChain::open(dir).expect("open chain");
    let src = ImageSource::new(&chain).expect("source");
    let mut buf = ChunkBuf::new(false).expect("buf");
    let mut out = vec![0u8; src.chunk_count() * CHUNK];
    for i in 0..src.chunk_count() {
        if let ChunkData::Data(_) = src.data(i) {
            // SAFETY: `buf` is ours.
            unsafe { src.read_chunk(i, buf.as_mut_ptr()) }.expect("read chunk");
            // SAFETY: the chunk was just read into `buf`.
            let b = unsafe { std::slice::from_raw_parts(buf.as_mut_ptr(), CHUNK) };
            out[i * CHUNK..(i + 1) * CHUNK].copy_from_slice(b);
        }
    }
    out
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}");
    if let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs at {first:#x} (chunk {})", first / CHUNK);
    }
}

#[test]
fn a_chain_of_ten_diffs_reads_back_bit_exact_and_each_writes_only_what_changed() {
    let mem = Mem::new(6, 2, 24, 5);
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let slot = Arc::new(TrackerSlot::new());
    let full = tmp.path().join("snap-00");
    let (snap, reference) = take(&engine(&slot, None), &mem, &full, None, || {
        // Written after the instant: not in this snapshot, dirty for the next.
        mem.write(CHUNK + 64, 0xaaaa);
    });
    assert!(slot.is_tracking(), "tracking after a snapshot with track");
    assert_eq!(
        slot.dirty_chunks(),
        Some(1),
        "chunk 1 written after the instant"
    );
    assert_same("full", &chain_bytes(&full), &reference);
    let mut parent = full;
    let mut base = snap.chunks().to_vec();
    let mut rng = 99u64;
    for round in 1..=10 {
        // A few chunks written, one of them a hole never touched before.
        let mut written: Vec<usize> = if round == 1 { vec![1] } else { Vec::new() };
        for _ in 0..3 {
            let c = (xorshift(&mut rng) % 8) as usize;
            mem.write(c * CHUNK + 8 * (round as usize), round);
            written.push(c);
        }
        let hole = 8 + round as usize;
        mem.write(hole * CHUNK, 0x1000 + round);
        written.push(hole);
        written.sort_unstable();
        written.dedup();
        let child = tmp.path().join(format!("snap-{round:02}"));
        let eng = engine(&slot, Some(base.clone()));
        let (snap, reference) = take(&eng, &mem, &child, Some(&parent), || {});
        let m = snap.metrics();
        let changed = written.len() as u64;
        assert_eq!(
            m.chunks_inherited,
            32 - changed,
            "round {round}: only the {changed} written chunks are saved: {m:?}"
        );
        assert!(
            m.bytes_written <= changed * CHUNK as u64,
            "round {round}: {} bytes for {changed} chunks",
            m.bytes_written
        );
        assert_same(&format!("round {round}"), &chain_bytes(&child), &reference);
        let opened = SnapshotDir::open(&child).expect("open");
        assert_eq!(
            opened.header().parent.as_ref().map(|p| p.path.as_str()),
            Some(parent.file_name().unwrap().to_str().unwrap())
        );
        base = snap.chunks().to_vec();
        parent = child;
    }
    // The merge of the chain is the same memory, as one full snapshot.
    let merged = tmp.path().join("merged");
    let sum = merge(&SnapshotChain::open(&parent).unwrap(), &merged, false).expect("merge");
    assert!(sum.data_bytes > 0);
    let m = SnapshotDir::open(&merged).expect("open merged");
    assert!(m.header().parent.is_none());
    m.verify_chunks().expect("merged checksums");
    assert_eq!(m.vm_state(), VM_STATE);
    assert_same("merged", &chain_bytes(&merged), &chain_bytes(&parent));
    // Ending tracking lifts every protection.
    slot.clear();
    assert_eq!(mem.wp_pages(), 0);
}

#[test]
fn a_diff_without_tracking_since_its_parent_is_refused() {
    let mem = Mem::new(2, 0, 2, 7);
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let slot = Arc::new(TrackerSlot::new());
    let base = vec![ChunkEntry::zero(); 4];
    let eng = engine(&slot, Some(base));
    let w = SnapshotWriter::create(
        &tmp.path().join("d"),
        &[mem.region()],
        &WriteOptions::default(),
    )
    .expect("writer");
    let regions = [mem.region()];
    // SAFETY: `mem` outlives the engine.
    unsafe { eng.arm(&regions, w.image()) }.expect("arm");
    // SAFETY: as above.
    let err = unsafe { eng.begin(&regions, w.image()) }.expect_err("no tracker");
    assert_eq!(
        err.to_string(),
        "invalid configuration: an incremental snapshot needs the writes since its parent tracked: take a full snapshot first"
    );
    assert_eq!(
        mem.wp_pages(),
        0,
        "the refused snapshot left nothing protected"
    );
}

/// Full + 2 diffs, then each way of breaking the middle layer.
fn chain_of_three(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mem = Mem::new(4, 0, 4, 11);
    let slot = Arc::new(TrackerSlot::new());
    let a = tmp.join("a");
    let (s, _) = take(&engine(&slot, None), &mem, &a, None, || {});
    mem.write(0, 1);
    let b = tmp.join("b");
    let (s, _) = take(
        &engine(&slot, Some(s.chunks().to_vec())),
        &mem,
        &b,
        Some(&a),
        || {},
    );
    mem.write(CHUNK, 2);
    let c = tmp.join("c");
    take(
        &engine(&slot, Some(s.chunks().to_vec())),
        &mem,
        &c,
        Some(&b),
        || {},
    );
    slot.clear();
    (a, b, c)
}

fn chain_err(dir: &Path) -> String {
    SnapshotChain::open(dir).expect_err("refused").to_string()
}

#[test]
fn a_broken_chain_is_refused_naming_the_layer() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (a, b, c) = chain_of_three(tmp.path());
    assert_eq!(SnapshotChain::open(&c).unwrap().layers().len(), 3);

    // The middle layer missing.
    let moved = tmp.path().join("b-moved");
    std::fs::rename(&b, &moved).unwrap();
    let e = chain_err(&c);
    assert!(
        e.starts_with(&format!(
            "snapshot {}: its parent {} cannot be used: read {}/state.bin: No such file",
            c.display(),
            b.display(),
            b.display()
        )),
        "{e}"
    );
    std::fs::rename(&moved, &b).unwrap();

    // The middle layer's state file damaged.
    let state = b.join(STATE_FILE);
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    bad[40] ^= 1;
    std::fs::write(&state, &bad).unwrap();
    let e = chain_err(&c);
    assert!(
        e.starts_with(&format!(
            "snapshot {}: its parent {} cannot be used: ",
            c.display(),
            b.display()
        )) && e.contains("checksum mismatch"),
        "{e}"
    );
    std::fs::write(&state, &good).unwrap();

    // Another snapshot in the middle layer's place (the full one).
    std::fs::rename(&b, tmp.path().join("b-real")).unwrap();
    copy_dir(&a, &b);
    let e = chain_err(&c);
    assert!(
        e.starts_with(&format!(
            "snapshot {}: its parent {} is not the snapshot it was taken from (content id 0x",
            c.display(),
            b.display()
        )),
        "{e}"
    );
    std::fs::remove_dir_all(&b).unwrap();
    std::fs::rename(tmp.path().join("b-real"), &b).unwrap();

    // A chunk of the middle layer's image flipped: found when read.
    let img = b.join(MEMORY_FILE);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[8] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let chain = SnapshotChain::open(&c).expect("headers are fine");
    let e = chain
        .verify_chunks()
        .expect_err("corrupt layer")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "snapshot {}: its parent {} cannot be used: memory image chunk 0",
            c.display(),
            b.display()
        )),
        "{e}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
