//! The command line's parsing and validation, flag by flag.

use super::*;

#[test]
fn sizes() {
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("4G"), Ok(4 << 30));
    assert_eq!(parse_size("4g"), Ok(4 << 30));
    assert_eq!(parse_size("1024K"), Ok(1 << 20));
    assert_eq!(parse_size("1048576"), Ok(1 << 20));
    assert_eq!(parse_size("2MiB"), Ok(2 << 20));
    assert_eq!(parse_size("2MB"), Ok(2 << 20));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
}

#[test]
fn bad_sizes() {
    for s in [
        "abc",
        "",
        "M",
        "12X",
        "-1G",
        "1.5G",
        "99999999999999999999",
        "20000000000T",
    ] {
        let e = parse_size(s).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("invalid memory size '{s}': ")),
            "{e}"
        );
    }
}

#[test]
fn memory_is_rounded_and_checked() {
    assert_eq!(guest_memory_size("1", None), Ok(2 << 20));
    assert_eq!(guest_memory_size("3M", None), Ok(4 << 20));
    assert_eq!(
        guest_memory_size("8G", Some(4 << 30)),
        Err(ConfigError::TooMuchMemory {
            given: "8G".to_string(),
            requested: 8 << 30,
            host: 4 << 30
        })
    );
    assert!(guest_memory_size("0", None).is_err());
}

#[test]
fn vcpus() {
    assert_eq!(validate_vcpus(0), Err(ConfigError::NoVcpus));
    assert_eq!(validate_vcpus(1), Ok(1));
    assert!(validate_vcpus(max_vcpus() + 1).is_err());
    assert!(validate_vcpus(256).is_err());
}

#[test]
fn meminfo() {
    let t = "MemTotal:       24590000 kB\nMemFree: 1 kB\n";
    assert_eq!(parse_meminfo_total(t), Some(24590000 * 1024));
    assert_eq!(parse_meminfo_total("nothing"), None);
}

#[test]
fn hugepages_flag() {
    assert_eq!(parse_hugepages("on"), Ok(PageBacking::Huge));
    assert_eq!(parse_hugepages("OFF"), Ok(PageBacking::Small));
    assert!(parse_hugepages("maybe").is_err());
    let cli = Cli::try_parse_from(["snapvm", "run"]).unwrap();
    let Command::Run(a) = cli.command else {
        panic!("not run")
    };
    assert_eq!(a.hugepages(), PageBacking::Huge);
    let cli = Cli::try_parse_from(["snapvm", "run", "--hugepages", "off"]).unwrap();
    let Command::Run(a) = cli.command else {
        panic!("not run")
    };
    assert_eq!(a.hugepages(), PageBacking::Small);
    assert!(Cli::try_parse_from(["snapvm", "run", "--hugepages", "x"]).is_err());
}

fn run_args(args: &[&str]) -> RunArgs {
    let mut argv = vec!["snapvm", "run"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => a,
        other => panic!("not run: {other:?}"),
    }
}

#[test]
fn snapshot_pool_flag() {
    assert_eq!(run_args(&[]).snapshot_pool, PoolTiming::AtStart);
    assert_eq!(
        run_args(&["--snapshot-pool", "first-snapshot"]).snapshot_pool,
        PoolTiming::FirstSnapshot
    );
    assert_eq!(
        parse_pool_timing("later"),
        Err("'later' is not a pool timing (expected at-start or first-snapshot)".into())
    );
}

#[test]
fn schedule_and_tracking_flags() {
    let a = run_args(&["--snapshot-dir", "/d", "--snapshot-every", "1m30s"]);
    assert_eq!(a.snapshot_every, Some(std::time::Duration::from_secs(90)));
    assert_eq!((a.snapshot_keep, a.snapshot_full_every), (3, 8));
    assert!(a.snapshot_track_dirty);
    assert!(a.validate_snapshot_flags().is_ok());
    assert!(!run_args(&["--snapshot-track-dirty", "off"]).snapshot_track_dirty);
    assert_eq!(
        run_args(&["--snapshot-every", "30s"]).validate_snapshot_flags(),
        Err("--snapshot-every needs --snapshot-dir (where the snapshots go)".into())
    );
    assert_eq!(
        run_args(&[
            "--snapshot-dir",
            "/d",
            "--snapshot-every",
            "30s",
            "--snapshot-at",
            "1"
        ])
        .validate_snapshot_flags(),
        Err("--snapshot-every and --snapshot-at exclude each other".into())
    );
    let e = Cli::try_parse_from(["snapvm", "run", "--snapshot-every", "soon"]).unwrap_err();
    assert!(e.to_string().contains("invalid duration 'soon'"), "{e}");
    assert!(Cli::try_parse_from(["snapvm", "run", "--snapshot-keep", "0"]).is_err());
}

#[test]
fn only_no_boot_waits_for_load() {
    assert!(run_args(&["--no-boot", "--api-sock", "/s"]).waits_for_load());
    // The API socket changes nothing about what boots.
    assert!(!run_args(&["--api-sock", "/s"]).waits_for_load());
    assert!(run_args(&["--api-sock", "/s", "--memory", "1G"])
        .validate_snapshot_flags()
        .is_ok());
    assert!(!run_args(&["--api-sock", "/s", "--restore", "/d"]).waits_for_load());
    assert!(!run_args(&[]).waits_for_load());
    let e = run_args(&["--no-boot", "--api-sock", "/s", "--memory", "1G"])
        .validate_snapshot_flags()
        .unwrap_err();
    assert_eq!(e, "--memory has no effect with --no-boot: snapvm boots nothing and waits for PUT /snapshot/load, whose snapshot brings its own machine");
    let e = run_args(&["--no-boot"])
        .validate_snapshot_flags()
        .unwrap_err();
    assert_eq!(
        e,
        "--no-boot needs --api-sock: a VM comes only through PUT /snapshot/load"
    );
    assert!(run_args(&[
        "--no-boot",
        "--api-sock",
        "/s",
        "--kv-listen",
        "127.0.0.1:1"
    ])
    .validate_snapshot_flags()
    .is_ok());
    for other in [
        ["--cmdline", "mode=kv"],
        ["--restore", "/d"],
        ["--kernel", "/k"],
    ] {
        let mut argv = vec!["snapvm", "run", "--no-boot", "--api-sock", "/s"];
        argv.extend(other);
        assert!(Cli::try_parse_from(argv).is_err(), "{other:?}");
    }
}

#[test]
fn client_commands() {
    let cli = Cli::try_parse_from([
        "snapvm",
        "snapshot",
        "create",
        "--api-sock",
        "/s",
        "--dir",
        "/d",
        "--mode",
        "fork",
        "--wait",
    ])
    .unwrap();
    let Command::Snapshot(SnapshotCommand::Create(a)) = cli.command else {
        panic!("not snapshot create")
    };
    assert_eq!(a.mode, Some(snapvm_snapshot::Strategy::Fork));
    assert!(a.wait && !a.overwrite);
    assert!(Cli::try_parse_from(["snapvm", "snapshot", "status", "--api-sock", "/s"]).is_err());
    assert!(Cli::try_parse_from(["snapvm", "vm", "pause"]).is_err());
    assert!(Cli::try_parse_from(["snapvm", "restore", "--api-sock", "/s", "--dir", "/d"]).is_ok());
}

#[test]
fn log_levels() {
    assert!(validate_log_level("debug").is_ok());
    assert!(validate_log_level("loud").is_err());
}
