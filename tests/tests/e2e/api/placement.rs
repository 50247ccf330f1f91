//! `GET /vm/config` reports the machine as it runs: the `--cpus`
//! placement of the guest and of the snapshots' copiers.

use std::process::Command;

use serde_json::json;
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, Proc};

use super::harness::*;

/// `--cpus` shows in `GET /vm/config`: the guest's CPUs and what is left
/// for snapshots' copiers.
#[test]
fn vm_config_reports_the_cpu_placement() {
    let allowed = snapvm_snapshot::CpuSet::allowed().expect("this process's CPUs");
    let allowed_list = allowed.to_string();
    let last: snapvm_snapshot::CpuSet = allowed_list
        .rsplit([',', '-'])
        .next()
        .expect("a CPU")
        .parse()
        .expect("a CPU number");
    let background = allowed.without(&last).map(|c| c.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let port = free_port();
    let mut vm = Proc::spawn_cmd(
        Command::new(snapvm_bin())
            .args(["run", "--api-sock"])
            .arg(&sock)
            .args(["--cmdline", "mode=kv", "--memory", "256M", "--cpus"])
            .arg(last.to_string())
            .arg("--kv-listen")
            .arg(format!("127.0.0.1:{port}")),
    );
    vm.wait_for_stdout(LISTENING, T);
    wait_for_api(&vm, &sock);
    let r = get(&sock, "/vm/config");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["machine_config"],
        json!({"huge_pages": true, "mem_size_mib": 256, "vcpu_count": 1, "page_backing": "thp",
               "cpus": {"guest": last.to_string(), "background": background}})
    );
    shutdown(vm, &sock);
}
