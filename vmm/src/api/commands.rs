//! The client commands of the `snapvm` binary: `snapvm snapshot
//! create|list|status|cancel`, `snapvm vm pause|resume|status` and
//! `snapvm restore`. Each talks to a running snapvm over its API socket
//! and prints the JSON it gets back (pretty) on stdout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde_json::json;

use super::client::{ApiClient, ClientError};
use super::model::{InstanceInfo, SnapshotList, SnapshotStatus};
use crate::cli::{RestoreArgs, SnapshotCommand, SnapshotCreateArgs, VmCommand};

/// How often `snapshot create --wait` asks for progress.
const POLL: Duration = Duration::from_millis(100);

/// Why a client command failed (one line).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot resolve {}: {source}", .path.display())]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {id} failed: {reason}")]
    SnapshotFailed { id: String, reason: String },
    #[error("{0}")]
    LoadFailed(String),
    #[error("cannot merge {}: {source}", .dir.display())]
    Merge {
        dir: PathBuf,
        source: snapvm_snapshot::PersistError,
    },
}

/// `snapvm snapshot merge DIR --out OUT`: reads the chain, writes the full
/// snapshot.
fn merge(args: &crate::cli::SnapshotMergeArgs) -> Result<(), CommandError> {
    let err = |source| CommandError::Merge {
        dir: args.dir.clone(),
        source,
    };
    let chain = snapvm_snapshot::persist::SnapshotChain::open(&args.dir).map_err(err)?;
    let layers = chain.layers().len();
    let sum =
        snapvm_snapshot::persist::merge::merge(&chain, &args.out, args.overwrite).map_err(err)?;
    print_json(&serde_json::json!({
        "snapshot_path": sum.path.display().to_string(),
        "layers_merged": layers,
        "image_len": sum.image_len,
        "data_bytes": sum.data_bytes,
        "zero_chunks": sum.zero_chunks,
    }));
    Ok(())
}

/// `snapvm snapshot schedule`: PUT, DELETE or GET /snapshot/schedule.
fn schedule(args: &crate::cli::SnapshotScheduleArgs) -> Result<(), CommandError> {
    let client = ApiClient::new(&args.sock.api_sock)?;
    if args.stop {
        client
            .call(Method::DELETE, "/snapshot/schedule", None)?
            .check()?;
        return Ok(());
    }
    let status: crate::schedule::ScheduleStatus = match (&args.dir, args.every) {
        (Some(dir), Some(every)) => {
            let body = json!({
                "snapshot_dir": absolute(dir)?.display().to_string(),
                "every": humantime::format_duration(every).to_string(),
                "keep": args.keep,
                "full_every": args.full_every,
            });
            client
                .call(Method::PUT, "/snapshot/schedule", Some(&body))?
                .ok_json()?
        }
        _ => client
            .call(Method::GET, "/snapshot/schedule", None)?
            .ok_json()?,
    };
    print_json(&status);
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => tracing::error!("cannot print the reply: {e}"),
    }
}

/// The server resolves paths itself: send absolute ones.
fn absolute(path: &Path) -> Result<PathBuf, CommandError> {
    std::path::absolute(path).map_err(|source| CommandError::Path {
        path: path.to_path_buf(),
        source,
    })
}

pub fn snapshot(cmd: SnapshotCommand) -> Result<(), CommandError> {
    match cmd {
        SnapshotCommand::Create(args) => create(&args),
        SnapshotCommand::List(a) => {
            let list: SnapshotList = ApiClient::new(&a.api_sock)?
                .call(Method::GET, "/snapshots", None)?
                .ok_json()?;
            print_json(&list);
            Ok(())
        }
        SnapshotCommand::Status(a) => {
            let s = status(&ApiClient::new(&a.sock.api_sock)?, &a.id)?;
            print_json(&s);
            Ok(())
        }
        SnapshotCommand::Merge(a) => merge(&a),
        SnapshotCommand::Schedule(a) => schedule(&a),
        SnapshotCommand::Cancel(a) => {
            let s: SnapshotStatus = ApiClient::new(&a.sock.api_sock)?
                .call(
                    Method::DELETE,
                    &format!("/snapshot/{}", encode_id(&a.id)),
                    None,
                )?
                .ok_json()?;
            print_json(&s);
            Ok(())
        }
    }
}

/// Ids are small integers; anything else is sent escaped so it cannot
/// change the route.
fn encode_id(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn status(client: &ApiClient, id: &str) -> Result<SnapshotStatus, CommandError> {
    Ok(client
        .call(Method::GET, &format!("/snapshot/{}", encode_id(id)), None)?
        .ok_json()?)
}

fn create(args: &SnapshotCreateArgs) -> Result<(), CommandError> {
    let client = ApiClient::new(&args.sock.api_sock)?;
    let mut body = json!({
        "snapshot_path": absolute(&args.dir)?.display().to_string(),
        "overwrite": args.overwrite,
    });
    if let Some(m) = args.mode {
        body["mode"] = m.to_string().into();
    }
    if let Some(w) = args.workers {
        body["workers"] = w.into();
    }
    if let Some(b) = args.memory_budget {
        body["memory_budget"] = b.into();
    }
    if args.incremental {
        body["snapshot_type"] = "Diff".into();
    }
    let created: SnapshotStatus = client
        .call(Method::PUT, "/snapshot/create", Some(&body))?
        .ok_json()?;
    if !args.wait {
        print_json(&created);
        return Ok(());
    }
    let done = wait(&client, &created.id)?;
    print_json(&done);
    match done.state.as_str() {
        "failed" => Err(CommandError::SnapshotFailed {
            id: done.id,
            reason: done.reason.unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

/// Polls until the snapshot ends, with a progress bar when stderr is a
/// terminal.
fn wait(client: &ApiClient, id: &str) -> Result<SnapshotStatus, CommandError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    loop {
        let s = status(client, id)?;
        if let Some(bar) = &bar {
            let p = &s.progress;
            match s.state.as_str() {
                // Chunks saved when the engine counts them; the fork
                // baseline's child does not: bytes on disk of the image.
                "copying" if p.chunks_total > 0 => {
                    bar.set_message("copying");
                    bar.set_length(p.chunks_total);
                    bar.set_position(p.chunks_done);
                }
                "copying" => {
                    bar.set_message("copying");
                    bar.set_length(p.image_len);
                    bar.set_position(p.bytes_written);
                }
                "persisting" => {
                    bar.set_message("persisting");
                    bar.set_position(bar.length().unwrap_or(0));
                }
                _ => {}
            }
        }
        if matches!(s.state.as_str(), "done" | "failed") {
            if let Some(bar) = bar {
                bar.finish_with_message(s.state.clone());
            }
            return Ok(s);
        }
        std::thread::sleep(POLL);
    }
}

pub fn vm(cmd: VmCommand) -> Result<(), CommandError> {
    let (sock, state) = match &cmd {
        VmCommand::Pause(a) => (&a.api_sock, Some("Paused")),
        VmCommand::Resume(a) => (&a.api_sock, Some("Resumed")),
        VmCommand::Status(a) => (&a.api_sock, None),
    };
    let client = ApiClient::new(sock)?;
    match state {
        Some(state) => client
            .call(Method::PATCH, "/vm", Some(&json!({ "state": state })))?
            .check()
            .map_err(Into::into),
        None => {
            let info: InstanceInfo = client.call(Method::GET, "/", None)?.ok_json()?;
            print_json(&info);
            Ok(())
        }
    }
}

pub fn restore(args: &RestoreArgs) -> Result<(), CommandError> {
    let body = json!({
        "snapshot_path": absolute(&args.dir)?.display().to_string(),
        "resume_vm": !args.no_resume,
        "verify": args.verify,
    });
    let client = ApiClient::new(&args.sock.api_sock)?;
    client
        .call(Method::PUT, "/snapshot/load", Some(&body))?
        .check()?;
    if args.wait {
        follow_load(&client)?;
    }
    Ok(())
}

/// Polls `GET /` until the loaded VM's memory is all in (or the load
/// failed), with a progress bar when stderr is a terminal.
fn follow_load(client: &ApiClient) -> Result<(), CommandError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading [{bar:40}] {pos}/{len} chunks ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    loop {
        let info: InstanceInfo = client.call(Method::GET, "/", None)?.ok_json()?;
        let Some(load) = info.memory_load else {
            return Ok(());
        };
        if let Some(bar) = &bar {
            bar.set_length(load.chunks_total);
            bar.set_position(load.chunks_loaded);
        }
        match load.state.as_str() {
            "done" => {
                if let Some(bar) = bar {
                    bar.finish();
                }
                print_json(&load);
                return Ok(());
            }
            "failed" => {
                if let Some(bar) = bar {
                    bar.abandon();
                }
                return Err(CommandError::LoadFailed(
                    load.error
                        .unwrap_or_else(|| "the memory load failed".into()),
                ));
            }
            _ => std::thread::sleep(POLL),
        }
    }
}
