use super::*;

#[test]
fn sizes_and_modes() {
    assert_eq!(parse_size("256M").unwrap(), 256);
    assert_eq!(parse_size("4G").unwrap(), 4096);
    assert!(parse_size("0G").is_err());
    assert!(parse_size("abc").is_err());
    assert_eq!(
        parse_modes("async-fork:4,fork").unwrap(),
        vec![("async-fork".to_string(), 4), ("fork".to_string(), 1)]
    );
    assert!(parse_modes("async-fork:0").is_err());
    assert!(parse_modes("nope").is_err());
    assert!(parse_modes("").is_err());
}

#[test]
fn command_line_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn no_command_is_the_comparative_benchmark() {
    let cli = Cli::try_parse_from(["snapvm-bench", "--sizes", "256M", "--no-plots"]).unwrap();
    assert!(cli.command.is_none());
    assert_eq!(cli.compare.sizes, "256M");
    assert!(cli.compare.no_plots);
    let cli = Cli::try_parse_from(["snapvm-bench"]).unwrap();
    assert!(cli.command.is_none());
    assert_eq!(cli.compare.sizes, "1G,2G,4G");
    // The comparative benchmark's flags do not mix with a command.
    assert!(Cli::try_parse_from(["snapvm-bench", "--sizes", "1G", "pause"]).is_err());
    assert!(Cli::try_parse_from(["snapvm-bench", "pause", "--sizes", "1G"]).is_err());
}

#[test]
fn pause_flags() {
    let cli =
        Cli::try_parse_from(["snapvm-bench", "pause", "--vcpus", "2", "--cycles", "20"]).unwrap();
    let Some(Command::Pause(a)) = cli.command else {
        panic!("not pause")
    };
    assert_eq!((a.vcpus, a.cycles), (2, 20));
    assert_eq!(a.memory, "512M");
    assert_eq!(a.log_level, "warn");
    let cli = Cli::try_parse_from(["snapvm-bench", "pause"]).unwrap();
    let Some(Command::Pause(a)) = cli.command else {
        panic!("not pause")
    };
    assert_eq!((a.vcpus, a.cycles), (1, 1000));
}

#[test]
fn snapshot_flags() {
    let cli = Cli::try_parse_from([
        "snapvm-bench",
        "snapshot",
        "--memory",
        "2G",
        "--modes",
        "async-fork,fork",
        "--workers",
        "1,2,4",
        "--hugepages",
        "off",
        "--populate-fraction",
        "0.5",
    ])
    .unwrap();
    let Some(Command::Snapshot(a)) = cli.command else {
        panic!("not snapshot")
    };
    assert_eq!(a.modes, vec![Strategy::AsyncFork, Strategy::Fork]);
    assert_eq!(a.workers, vec![1, 2, 4]);
    assert_eq!(a.hugepages, PageBacking::Small);
    assert_eq!(a.populate_fraction, 0.5);
    let cli = Cli::try_parse_from(["snapvm-bench", "snapshot"]).unwrap();
    let Some(Command::Snapshot(a)) = cli.command else {
        panic!("not snapshot")
    };
    assert_eq!(a.modes.len(), 4);
    assert_eq!(a.workers, vec![2]);
    assert_eq!(a.hugepages, PageBacking::Huge);
    assert_eq!(a.priorities, vec![BackgroundPriority::Normal]);
    assert!(parse_strategies("async-fork,nope").is_err());
    assert!(parse_worker_list("0").is_err());
    assert!(parse_fraction("1.5").is_err());
}

#[test]
fn machine_size_checks_like_snapvm_run() {
    assert_eq!(machine_size("3M", 2).unwrap(), (4 << 20, 2));
    assert!(matches!(
        machine_size("lots", 1),
        Err(BenchError::Config(_))
    ));
    assert!(matches!(machine_size("64M", 0), Err(BenchError::Config(_))));
    assert!(matches!(
        init_vmm_logging("loud"),
        Err(BenchError::Config(_))
    ));
}
