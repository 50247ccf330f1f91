//! The persisted format: round trip through the engine, sparseness,
//! atomicity, and every refusal with its exact message.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use snapvm_snapshot::persist::{format, WriteSummary, MEMORY_FILE, STATE_FILE};
use snapvm_snapshot::{
    Error, FaultInjection, PersistError, SnapshotDir, SnapshotWriter, Strategy, WriteOptions,
    CHUNK_SIZE, PAGE_SIZE,
};

/// Why a snapshot into a directory failed.
#[derive(Debug)]
enum Failed {
    Persist(PersistError),
    Engine(Error),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Persist(e) => e.fmt(f),
            Failed::Engine(e) => e.fmt(f),
        }
    }
}

/// Snapshots 6 full + 2 partial + 24 untouched chunks (64 MiB), idle, into
/// `target` with `strategy`; returns what was written and the memory.
fn take_with(
    strategy: Strategy,
    target: &Path,
    opts: &WriteOptions,
) -> Result<(WriteSummary, Vec<u8>), Failed> {
    let mem = Mem::new(6, 2, 24, 1234);
    let reference = mem.reference();
    let eng = engine_with(strategy, 2, FaultInjection::default());
    let regions = [mem.region()];
    let w = SnapshotWriter::create(target, &regions, opts).map_err(Failed::Persist)?;
    // SAFETY: `mem` outlives the snapshot (wait() below).
    unsafe { eng.arm(&regions, w.image()) }.map_err(Failed::Engine)?;
    // SAFETY: as above.
    unsafe { eng.begin(&regions, w.image()) }.map_err(Failed::Engine)?;
    let snap = eng.wait().map_err(Failed::Engine)?;
    let sum = w.commit(&snap, VM_STATE).map_err(Failed::Persist)?;
    Ok((sum, reference))
}

fn write(target: &Path, opts: &WriteOptions) -> Result<WriteSummary, Failed> {
    take_with(Strategy::AsyncFork, target, opts).map(|(s, _)| s)
}

/// A written snapshot directory in a fresh temp dir.
fn written() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let target = tmp.path().join("snap");
    let (_, reference) =
        take_with(Strategy::AsyncFork, &target, &WriteOptions::default()).expect("write");
    (tmp, target, reference)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn open_err(dir: &Path) -> String {
    SnapshotDir::open(dir)
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn round_trip_bit_exact_through_lazy_mapping() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = tmp.path().join("snap");
    let (sum, reference) =
        take_with(Strategy::AsyncFork, &target, &WriteOptions::default()).expect("write");
    assert_eq!(entries(tmp.path()), vec!["snap"], "no temp dir left");
    assert_eq!(entries(&target), vec![MEMORY_FILE, STATE_FILE]);
    for f in [MEMORY_FILE, STATE_FILE] {
        let mode = fs::metadata(target.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert_eq!(sum.image_len, 32 * CHUNK_SIZE);
    assert_eq!(sum.data_bytes, 8 * CHUNK_SIZE);
    assert_eq!(sum.zero_chunks, 24);
    // Only populated pages are written: 6 full chunks, and of the 2
    // partial ones every third page or (THP backs it) all of them.
    let partial = (CHUNK_SIZE / PAGE_SIZE).div_ceil(3) * PAGE_SIZE;
    assert!(
        sum.bytes_written >= 6 * CHUNK_SIZE + 2 * partial && sum.bytes_written <= 8 * CHUNK_SIZE,
        "{sum:?}"
    );

    let dir = SnapshotDir::open(&target).expect("open");
    assert_eq!(dir.vm_state(), VM_STATE);
    let h = dir.header();
    assert_eq!(h.chunk_size, CHUNK_SIZE);
    assert_eq!(h.regions.len(), 1);
    assert_eq!(h.regions[0].guest_addr, 0x1_0000_0000);
    assert_eq!(h.chunks.iter().filter(|c| c.zero).count(), 24);
    dir.verify_chunks().expect("verify");
    let maps = dir.map_all().expect("map");
    assert_eq!(maps[0].guest_addr, h.regions[0].guest_addr);
    assert!(maps[0].as_slice() == reference.as_slice(), "image differs");
    // The mapping is private: writes do not reach the file.
    // SAFETY: in bounds of the mapping, which nobody else uses.
    unsafe { maps[0].as_ptr().write(0xFF) };
    drop(maps);
    let again = SnapshotDir::open(&target).unwrap();
    again
        .verify_chunks()
        .expect("file untouched by private writes");
}

#[test]
fn zero_chunks_are_holes() {
    let (_tmp, target, _) = written();
    let md = fs::metadata(target.join(MEMORY_FILE)).unwrap();
    assert_eq!(md.len(), 32 * CHUNK_SIZE);
    let allocated = md.blocks() * 512;
    // 8 of 32 chunks hold data; allow some fs slack but nowhere near full.
    assert!(
        allocated <= 10 * CHUNK_SIZE,
        "memory.img allocates {allocated} of {} bytes",
        md.len()
    );
}

#[test]
fn existing_target_refused_without_overwrite_and_replaced_with_it() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = tmp.path().join("snap");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), b"old").unwrap();
    let err = write(&target, &WriteOptions::default()).expect_err("refused");
    assert!(matches!(
        err,
        Failed::Persist(PersistError::TargetExists(_))
    ));
    assert_eq!(
        err.to_string(),
        format!(
            "{} already exists (pass overwrite to replace it)",
            target.display()
        )
    );
    assert_eq!(entries(&target), vec!["keep"], "existing target untouched");
    assert_eq!(entries(tmp.path()), vec!["snap"]);

    let opts = WriteOptions {
        overwrite: true,
        ..WriteOptions::default()
    };
    write(&target, &opts).expect("overwrite");
    assert_eq!(entries(&target), vec![MEMORY_FILE, STATE_FILE]);
    assert_eq!(entries(tmp.path()), vec!["snap"], "old dir removed");
    SnapshotDir::open(&target).unwrap().verify_chunks().unwrap();

    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = write(&file, &opts).expect_err("not a dir");
    assert_eq!(
        err.to_string(),
        format!(
            "{} exists and is not a directory; refusing to replace it",
            file.display()
        )
    );
}

/// The disk fails in the middle of the image (ENOSPC, then EIO over an
/// existing snapshot): a typed error naming the file and operation,
/// nothing left behind, and with overwrite the old snapshot survives.
#[test]
fn failing_writer_leaves_nothing_behind() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = tmp.path().join("snap");
    let opts = WriteOptions {
        fail_after_bytes: Some((3 * CHUNK_SIZE + 100, libc::ENOSPC)),
        ..WriteOptions::default()
    };
    let err = write(&target, &opts).expect_err("injected ENOSPC");
    assert!(
        matches!(
            err,
            Failed::Engine(Error::Write {
                source: PersistError::NoSpace { .. },
                ..
            })
        ),
        "{err:?}"
    );
    let tmp_dir = entries(tmp.path());
    assert!(tmp_dir.is_empty(), "left behind: {tmp_dir:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("worker: write ") && msg.ends_with("/memory.img: no space left on device"),
        "{msg}"
    );
    assert!(msg.contains("snap.incomplete-"), "{msg}");

    // EIO over an existing snapshot, which must survive.
    write(&target, &WriteOptions::default()).unwrap();
    let opts = WriteOptions {
        overwrite: true,
        fail_after_bytes: Some((5 * CHUNK_SIZE, libc::EIO)),
        ..WriteOptions::default()
    };
    let err = write(&target, &opts).expect_err("injected EIO");
    let Failed::Engine(Error::Write {
        source: PersistError::Io { path, op, source },
        ..
    }) = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(*op, "write");
    assert!(path.ends_with(MEMORY_FILE));
    assert_eq!(source.raw_os_error(), Some(libc::EIO));
    assert_eq!(
        err.to_string(),
        format!("worker: write {}: {source}", path.display())
    );
    assert_eq!(entries(tmp.path()), vec!["snap"]);
    SnapshotDir::open(&target).unwrap().verify_chunks().unwrap();
}

fn state_bytes(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(STATE_FILE)).unwrap()
}

#[test]
fn truncated_state_file_refused() {
    let (_tmp, target, _) = written();
    let s = state_bytes(&target);
    fs::write(target.join(STATE_FILE), &s[..s.len() - 7]).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: state file is truncated ({} bytes, expected {})",
            target.join(STATE_FILE).display(),
            s.len() - 7,
            s.len()
        )
    );
    fs::write(target.join(STATE_FILE), &s[..10]).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: state file is truncated (10 bytes, expected 24)",
            target.join(STATE_FILE).display()
        )
    );
    fs::write(target.join(STATE_FILE), b"").unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: not a snapvm snapshot state file (bad magic)",
            target.join(STATE_FILE).display()
        )
    );
    // Without state.bin (written last) beside an image: an interrupted write.
    fs::remove_file(target.join(STATE_FILE)).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: incomplete snapshot (memory.img without state.bin: its write was interrupted); it cannot be restored",
            target.display()
        )
    );
    // Neither file: not a snapshot directory at all.
    fs::remove_file(target.join(MEMORY_FILE)).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "read {}: No such file or directory (os error 2)",
            target.join(STATE_FILE).display()
        )
    );
}

#[test]
fn truncated_or_grown_memory_image_refused() {
    let (_tmp, target, _) = written();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(target.join(MEMORY_FILE))
        .unwrap();
    let full = 32 * CHUNK_SIZE;
    f.set_len(full - 4096).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "memory image is {} bytes, the state file expects {full}",
            full - 4096
        )
    );
    f.set_len(full + 1).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "memory image is {} bytes, the state file expects {full}",
            full + 1
        )
    );
}

#[test]
fn flipped_bit_in_state_file_refused() {
    let (_tmp, target, _) = written();
    let mut s = state_bytes(&target);
    // Flip a bit in the first region's guest address (offset 48).
    s[50] ^= 0x10;
    fs::write(target.join(STATE_FILE), &s).unwrap();
    let err = SnapshotDir::open(&target).expect_err("refused");
    let PersistError::StateChecksum {
        stored, computed, ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        err.to_string(),
        format!(
            "{}: state file checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
            target.join(STATE_FILE).display()
        )
    );
    assert_eq!(computed, format::checksum(&s[..s.len() - 4]));
}

#[test]
fn flipped_bit_in_memory_chunk_caught_by_verify() {
    let (_tmp, target, _) = written();
    let dir = SnapshotDir::open(&target).unwrap();
    let c = dir.header().chunks[3];
    let guest = dir.header().regions[0].guest_addr + 3 * CHUNK_SIZE;
    drop(dir);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target.join(MEMORY_FILE))
        .unwrap();
    let off = 3 * CHUNK_SIZE + 12345;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 4], off).unwrap();
    // open() stays fast and does not read memory: it still succeeds.
    let dir = SnapshotDir::open(&target).expect("open does not read memory");
    let err = dir.verify_chunks().expect_err("corruption caught");
    let PersistError::ChunkChecksum {
        index,
        guest_addr,
        expected,
        computed,
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!((index, guest_addr, expected), (3, guest, c.crc));
    assert_eq!(
        err.to_string(),
        format!(
            "memory image chunk 3 (guest {guest:#x}) is corrupt: checksum {computed:#010x}, expected {:#010x}",
            c.crc
        )
    );

    // Data written into a hole is caught too.
    f.write_all_at(&[1], 20 * CHUNK_SIZE).unwrap();
    f.write_all_at(&[b[0]], off).unwrap();
    let guest20 = guest + 17 * CHUNK_SIZE;
    assert_eq!(
        dir.verify_chunks().expect_err("hole").to_string(),
        format!("memory image chunk 20 (guest {guest20:#x}) should be a zero hole but holds data")
    );
}

/// Rewrites the preamble and fixes up the checksum, as a newer (or broken)
/// writer would have produced.
fn with_fixed_crc(mut s: Vec<u8>) -> Vec<u8> {
    let n = s.len() - 4;
    let crc = format::checksum(&s[..n]);
    s[n..].copy_from_slice(&crc.to_le_bytes());
    s
}

#[test]
fn wrong_version_refused() {
    let (_tmp, target, _) = written();
    let mut s = state_bytes(&target);
    s[8..12].copy_from_slice(&3u32.to_le_bytes());
    fs::write(target.join(STATE_FILE), with_fixed_crc(s)).unwrap();
    assert_eq!(
        open_err(&target),
        "unsupported snapshot format version 3 (this snapvm reads 1 to 2)"
    );
}

#[test]
fn wrong_magic_refused() {
    let (_tmp, target, _) = written();
    let mut s = state_bytes(&target);
    s[0] = b'X';
    fs::write(target.join(STATE_FILE), with_fixed_crc(s)).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: not a snapvm snapshot state file (bad magic)",
            target.join(STATE_FILE).display()
        )
    );
}

#[test]
fn malformed_fields_refused_even_with_valid_checksum() {
    let (_tmp, target, _) = written();
    let s = state_bytes(&target);
    let path = target.join(STATE_FILE);
    // Unknown chunk flag (flags start after 48 + 24 + 8 = 80).
    let mut m = s.clone();
    m[80 + 5] = 7;
    fs::write(&path, with_fixed_crc(m)).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: malformed state file: chunk 5 has unknown flags 0x07",
            path.display()
        )
    );
    // Chunk size not a power of two.
    let mut m = s.clone();
    m[24..32].copy_from_slice(&3000u64.to_le_bytes());
    fs::write(&path, with_fixed_crc(m)).unwrap();
    assert_eq!(
        open_err(&target),
        format!(
            "{}: malformed state file: chunk size 0xbb8 is not a power of two >= 4096",
            path.display()
        )
    );
    // A corrupted VM state blob (last byte before the trailer).
    let mut m = s.clone();
    let n = m.len();
    m[n - 5] ^= 1;
    fs::write(&path, with_fixed_crc(m)).unwrap();
    assert!(
        open_err(&target).starts_with(&format!("{}: VM state checksum mismatch", path.display())),
        "{}",
        open_err(&target)
    );
}

/// Every engine strategy persists the same memory to the same bytes.
#[test]
fn all_strategies_produce_identical_files() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut files: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for s in [
        Strategy::AsyncFork,
        Strategy::StopTheWorld,
        Strategy::SyncWp,
    ] {
        let target = tmp.path().join(s.name());
        take_with(s, &target, &WriteOptions::default()).expect("write");
        SnapshotDir::open(&target).unwrap().verify_chunks().unwrap();
        files.push((
            fs::read(target.join(STATE_FILE)).unwrap(),
            fs::read(target.join(MEMORY_FILE)).unwrap(),
        ));
    }
    assert!(
        files[0] == files[1],
        "stop-the-world differs from async-fork"
    );
    assert!(files[0] == files[2], "sync-wp differs from async-fork");
}

/// Snapshot directories are private whatever the umask: 0700, files 0600
/// (guest memory is as sensitive as the guest). umask is process-wide, so
/// it is restored at once and other tests only ever see a stricter one
/// never a looser one for longer than this write.
#[test]
fn snapshot_dir_is_0700_and_files_0600_even_with_umask_0() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = tmp.path().join("snap");
    // SAFETY: umask(2) only changes this process's file creation mask.
    let old = unsafe { libc::umask(0) };
    let res = write(&target, &WriteOptions::default());
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    res.expect("write");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&target), 0o700);
    for f in [MEMORY_FILE, STATE_FILE] {
        assert_eq!(mode(&target.join(f)), 0o600, "{f}");
    }
}

/// What a kill during persist leaves (the temp dir with memory.img and no
/// state.bin) is refused as incomplete, by name, and the next write to the
/// same target removes it once its writer is gone.
#[test]
fn interrupted_write_is_refused_and_cleaned_up_by_the_next_write() {
    let (tmp, target, _) = written();
    // A leftover as a killed writer (a pid that cannot exist) leaves it.
    let dead = tmp.path().join(format!(
        "snap2{}4194305-0",
        snapvm_snapshot::persist::TMP_INFIX
    ));
    fs::create_dir(&dead).unwrap();
    fs::copy(target.join(MEMORY_FILE), dead.join(MEMORY_FILE)).unwrap();
    assert_eq!(
        open_err(&dead),
        format!(
            "{}: incomplete snapshot (memory.img without state.bin: its write was interrupted); it cannot be restored",
            dead.display()
        )
    );
    // A leftover of a live process (ours) is never touched.
    let live = tmp.path().join(format!(
        "snap2{}{}-99",
        snapvm_snapshot::persist::TMP_INFIX,
        std::process::id()
    ));
    fs::create_dir(&live).unwrap();
    // Another target's leftover is not ours to remove either.
    let other = tmp.path().join(format!(
        "other{}4194305-0",
        snapvm_snapshot::persist::TMP_INFIX
    ));
    fs::create_dir(&other).unwrap();

    write(&tmp.path().join("snap2"), &WriteOptions::default()).expect("write");
    let left = entries(tmp.path());
    assert_eq!(
        left,
        vec![
            other.file_name().unwrap().to_str().unwrap().to_string(),
            "snap".to_string(),
            "snap2".to_string(),
            live.file_name().unwrap().to_str().unwrap().to_string(),
        ]
    );
    SnapshotDir::open(&tmp.path().join("snap2"))
        .unwrap()
        .verify_chunks()
        .unwrap();
}

/// Neither a symlink nor a file at the target is followed or replaced
/// without `overwrite`, and a symlink is never replaced even with it.
#[test]
fn target_symlink_is_never_followed() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let err = write(&link, &WriteOptions::default()).expect_err("exists");
    assert!(
        matches!(err, Failed::Persist(PersistError::TargetExists(_))),
        "{err}"
    );
    let opts = WriteOptions {
        overwrite: true,
        ..WriteOptions::default()
    };
    let err = write(&link, &opts).expect_err("a symlink");
    assert!(
        matches!(err, Failed::Persist(PersistError::TargetNotDirectory(_))),
        "{err}"
    );
    assert!(entries(&elsewhere).is_empty());
    assert_eq!(entries(tmp.path()), vec!["elsewhere", "link"]);
}
