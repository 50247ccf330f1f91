//! Opening /dev/kvm with errors a user can act on.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

/// Environment variable that overrides the KVM device path (for tests of the
/// "no KVM" error paths).
pub const KVM_DEVICE_ENV: &str = "SNAPVM_KVM_DEVICE";
const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum KvmDeviceError {
    #[error("{0} does not exist: KVM is not available on this host; load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization")]
    Missing(String),
    #[error("permission denied opening {0}: run as root or add your user to the 'kvm' group")]
    PermissionDenied(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a usable KVM device: {source}")]
    NotKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
}

/// The KVM device path: `$SNAPVM_KVM_DEVICE` or /dev/kvm.
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE))
}

/// Opens the KVM device and checks the API version.
pub fn open_kvm() -> Result<Kvm, KvmDeviceError> {
    open_kvm_at(&kvm_device_path())
}

/// Opens the KVM device at `path`.
pub fn open_kvm_at(path: &Path) -> Result<Kvm, KvmDeviceError> {
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => KvmDeviceError::Missing(name.clone()),
            std::io::ErrorKind::PermissionDenied => KvmDeviceError::PermissionDenied(name.clone()),
            _ => KvmDeviceError::Open {
                path: name.clone(),
                source,
            },
        })?;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` is an open file we own (just released from `file`); Kvm
    // takes ownership and closes it.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(KvmDeviceError::NotKvm {
            path: name,
            source: kvm_ioctls::Error::last(),
        });
    }
    if version != 12 {
        return Err(KvmDeviceError::ApiVersion(version));
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_explained() {
        let err = open_kvm_at(Path::new("/nonexistent/kvm")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/nonexistent/kvm does not exist: KVM is not available"));
    }

    #[test]
    fn non_kvm_file_is_rejected() {
        // /dev/null opens fine but answers no KVM ioctl.
        let err = open_kvm_at(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, KvmDeviceError::NotKvm { .. }), "{err}");
    }
}
