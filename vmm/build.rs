//! Builds the guest kernel and hands its path to the `snapvm` binary, which
//! embeds it (`include_bytes!`) as the default kernel.
//!
//! The guest is a freestanding binary for the host target with its own link
//! arguments, so it is built by a nested `cargo build` into a separate target
//! directory: artifact dependencies would do this natively but are unstable.
//! It is always built with the release profile because guest speed matters
//! even in debug builds of the VMM.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("vmm/ lives inside the workspace")
        .to_path_buf();
    let target_root = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace.join("target"),
    };
    let guest_target = target_root.join("guest-build");

    for path in [
        "guest/src",
        "guest/build.rs",
        "guest/Cargo.toml",
        "guest/linker.ld",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    // Escape hatch for working on the VMM while the guest does not build:
    // embed a prebuilt guest ELF instead.
    println!("cargo:rerun-if-env-changed=SNAPVM_GUEST_ELF_OVERRIDE");
    if let Some(elf) = env::var_os("SNAPVM_GUEST_ELF_OVERRIDE") {
        println!(
            "cargo:rustc-env=SNAPVM_GUEST_ELF={}",
            PathBuf::from(elf).display()
        );
        return;
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "-p",
            "snapvm-guest",
            "--bin",
            "snapvm-guest",
            "--features",
            "kernel",
            // The workspace profiles unwind (host code catches engine
            // panics); the freestanding kernel cannot.
            "--config",
            "profile.release.panic=\"abort\"",
        ])
        .arg("--target-dir")
        .arg(&guest_target);
    // The outer build's flags and wrappers (clippy, coverage, sanitizers) are
    // for host code; the guest gets none of them.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("could not run cargo to build the guest kernel");
    assert!(
        status.success(),
        "building the guest kernel (snapvm-guest) failed"
    );

    let elf = guest_target.join("release").join("snapvm-guest");
    println!("cargo:rustc-env=SNAPVM_GUEST_ELF={}", elf.display());
}
