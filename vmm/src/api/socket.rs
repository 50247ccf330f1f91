//! The API socket file: created 0600, a live socket at the path refuses
//! the start, a stale one is replaced, anything else is refused; removed
//! when the server stops.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the API socket could not be set up; one line each, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--api-sock {}: another process is serving this socket (is another snapvm running?)", .0.display())]
    Live(PathBuf),
    #[error("--api-sock {}: exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("--api-sock {}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Binds the API socket at `path` with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |what, source| SocketError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::Live(path.to_path_buf())),
            // Nobody accepts on it: a leftover of a process that died.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!("replacing stale API socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| io("cannot remove the stale socket", e))?;
            }
            Err(e) => return Err(io("cannot probe the existing socket", e)),
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot inspect the path", e)),
    }
    // The socket file takes its mode from the umask at bind time: narrow it
    // so the file is never reachable by others, not even briefly. This runs
    // before the VM starts any thread that creates files.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| io("cannot bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("cannot set mode 0600", e))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("api.sock");
        let live = bind(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(bind(&p), Err(SocketError::Live(_))));
        drop(live);
        // The file is left behind: stale now, so it is replaced.
        let again = bind(&p).unwrap();
        drop(again);
        let f = tmp.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = bind(&f).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }
}
