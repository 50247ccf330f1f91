//! The API socket itself: private (mode 0600), never replacing a file or
//! a live socket, replacing a stale one, removed on SIGTERM; and flags that
//! need a booted VM refused when nothing boots.

use std::os::unix::fs::PermissionsExt;

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{run, Finished, Proc};

use super::harness::*;

#[test]
fn socket_is_private_refuses_live_and_non_sockets_and_replaces_stale_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let one_line = |out: &Finished, part: &str| {
        assert_eq!(out.code(), Some(1), "{out:?}");
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert!(
            lines[0].starts_with("snapvm: error: --api-sock "),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(part), "{:?} lacks {part:?}", lines[0]);
    };
    let file = tmp.path().join("file.sock");
    std::fs::write(&file, b"precious").unwrap();
    let out = run(
        &snapvm_bin(),
        &["run", "--api-sock", file.to_str().unwrap()],
        T,
    );
    one_line(&out, "exists and is not a socket; refusing to replace it");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let live = tmp.path().join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let out = run(
        &snapvm_bin(),
        &["run", "--api-sock", live.to_str().unwrap()],
        T,
    );
    one_line(&out, "another process is serving this socket");
    assert!(live.exists());
    drop(listener);

    // `live.sock` is stale now (nobody accepts): replaced.
    let (vm, sock, _) = {
        let vm = Proc::spawn(
            &snapvm_bin(),
            &[
                "run",
                "--no-boot",
                "--api-sock",
                live.to_str().unwrap(),
                "--log-level",
                "info",
            ],
        );
        wait_for_api(&vm, &live);
        (vm, live.clone(), 0)
    };
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    assert_eq!(get(&sock, "/").json()["state"], "Not started");
    // SIGTERM stops it cleanly too: exit 0, socket removed.
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let out = vm.wait(T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(!sock.exists());

    // Flags that shape a booted VM make no sense when nothing boots.
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--no-boot",
            "--api-sock",
            sock.to_str().unwrap(),
            "--memory",
            "1G",
        ],
        T,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("snapvm: error: --memory has no effect with --no-boot"),
        "{out:?}"
    );
    assert!(!sock.exists(), "a refused start left its socket");
}
