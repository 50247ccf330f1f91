//! A snapshot and the parents it depends on: an incremental snapshot
//! stores only the chunks written since its parent, so reading it means
//! finding, for each chunk, the nearest layer that holds it.
//!
//! `SnapshotChain::open` opens every layer (each checked as `SnapshotDir`
//! checks one), and refuses a chain whose parent is missing or damaged,
//! is a different snapshot than the one recorded (content id: the parent
//! state file's checksum and length), has another memory layout, or whose
//! inherited checksums disagree with what the parent holds — with one
//! error naming the layer. Nothing of memory.img is read.

use std::path::{Path, PathBuf};

use super::error::PersistError;
use super::format::ChunkEntry;
use super::reader::SnapshotDir;

/// Longest chain followed (a loop of renamed directories ends here too).
pub const MAX_CHAIN: usize = 256;

#[derive(Debug)]
pub struct SnapshotChain {
    /// Top (the snapshot asked for) first, then its parent, and so on.
    layers: Vec<SnapshotDir>,
    /// Per chunk: the layer holding its bytes and their crc32c, or None
    /// for a hole.
    holders: Vec<Option<(usize, u32)>>,
}

impl SnapshotChain {
    pub fn open(dir: &Path) -> Result<SnapshotChain, PersistError> {
        let top = SnapshotDir::open(dir)?;
        let mut layers = vec![top];
        loop {
            let child = &layers[layers.len() - 1];
            let Some(p) = child.header().parent.clone() else {
                break;
            };
            if layers.len() >= MAX_CHAIN {
                return Err(PersistError::ChainTooLong {
                    dir: dir.into(),
                    max: MAX_CHAIN,
                });
            }
            let path = resolve(child.path(), &p.path);
            let parent = SnapshotDir::open(&path).map_err(|e| PersistError::Parent {
                child: child.path().into(),
                parent: path.clone(),
                source: Box::new(e),
            })?;
            let (found_crc, found_len) = parent.content_id();
            if (found_crc, found_len) != (p.state_crc, p.state_len) {
                return Err(PersistError::ParentMismatch {
                    child: child.path().into(),
                    parent: path,
                    found_crc,
                    found_len,
                    expected_crc: p.state_crc,
                    expected_len: p.state_len,
                });
            }
            let inconsistent = |what: String| PersistError::ParentInconsistent {
                child: child.path().into(),
                parent: path.clone(),
                what,
            };
            if parent.header().regions != child.header().regions
                || parent.header().chunk_size != child.header().chunk_size
            {
                return Err(inconsistent("their memory layouts differ".into()));
            }
            layers.push(parent);
        }
        // Resolve every chunk down the chain; an inherited chunk must have
        // the checksum its holder has.
        let n = layers[0].header().chunks.len();
        let mut holders = Vec::with_capacity(n);
        for i in 0..n {
            let want = layers[0].header().chunks[i];
            let mut found = None;
            for (k, layer) in layers.iter().enumerate() {
                let e: ChunkEntry = layer.header().chunks[i];
                if e.zero && k > 0 {
                    // A child inherits only data chunks.
                    return Err(PersistError::ParentInconsistent {
                        child: layers[k - 1].path().into(),
                        parent: layer.path().into(),
                        what: format!("chunk {i} is inherited but the parent holds a hole"),
                    });
                }
                if e.zero {
                    break;
                }
                if e.crc != want.crc {
                    return Err(PersistError::ParentInconsistent {
                        child: layers[k.saturating_sub(1)].path().into(),
                        parent: layer.path().into(),
                        what: format!(
                            "chunk {i} has checksum {:#010x} there, {:#010x} in the child",
                            e.crc, want.crc
                        ),
                    });
                }
                if !e.inherited {
                    found = Some((k, e.crc));
                    break;
                }
                if k + 1 == layers.len() {
                    return Err(PersistError::ParentInconsistent {
                        child: layer.path().into(),
                        parent: layer.path().into(),
                        what: format!("chunk {i} is inherited but nothing holds it"),
                    });
                }
            }
            holders.push(found);
        }
        Ok(SnapshotChain { layers, holders })
    }

    /// The snapshot asked for.
    pub fn top(&self) -> &SnapshotDir {
        &self.layers[0]
    }

    pub fn layers(&self) -> &[SnapshotDir] {
        &self.layers
    }

    /// Layer `k`'s directory.
    pub fn layer_path(&self, k: usize) -> Option<&Path> {
        self.layers.get(k).map(|l| l.path())
    }

    /// Where chunk `i`'s bytes are: (layer, crc32c), or None for a hole.
    pub fn holder(&self, i: usize) -> Option<(usize, u32)> {
        self.holders.get(i).copied().flatten()
    }

    pub fn chunk_count(&self) -> usize {
        self.holders.len()
    }

    /// Checks every chunk of every layer against its checksum (reads them
    /// all: for `--verify` and tests).
    pub fn verify_chunks(&self) -> Result<(), PersistError> {
        for layer in &self.layers {
            layer.verify_chunks().map_err(|e| match &e {
                _ if layer.path() == self.top().path() => e,
                _ => PersistError::Parent {
                    child: self.top().path().into(),
                    parent: layer.path().into(),
                    source: Box::new(e),
                },
            })?;
        }
        Ok(())
    }
}

/// A parent path as recorded: relative to the child directory's parent
/// directory, or absolute.
pub fn resolve(child: &Path, parent: &str) -> PathBuf {
    let p = Path::new(parent);
    if p.is_absolute() {
        return p.into();
    }
    child.parent().unwrap_or(Path::new(".")).join(p)
}

/// How a child records `parent`: relative when both live in the same
/// directory (so the pair can move together), else absolute.
pub fn relative_to_child(child: &Path, parent: &Path) -> String {
    if child.parent().is_some() && child.parent() == parent.parent() {
        if let Some(name) = parent.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    std::path::absolute(parent)
        .unwrap_or_else(|_| parent.to_path_buf())
        .to_string_lossy()
        .into_owned()
}
