//! Between HTTP and the VM's owner (as Firecracker's `parsed_request.rs`
//! and `rpc_interface.rs` split it): a parsed API request becomes the
//! owner's domain [`Request`] — its fields checked here, so a bad value is
//! a 400 before the VM is asked anything — and the owner's domain answer
//! becomes the HTTP status and body.

use std::path::{Path, PathBuf};

use snapvm_snapshot::Strategy;

use super::metrics;
use super::model::{Action, ScheduleSet, SnapshotCreate, SnapshotLoad};
use super::server::{ApiRequest, Reply, ReplyBody};
use crate::owner::{LoadOrder, OwnerError, Request, Response, ScheduleOrder, SnapshotOrder};

/// File name of the memory image inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.img";

/// What kind of answer a request gets on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 with the owner's answer.
    Ok,
    /// 201: a snapshot begun.
    Created,
}

/// The owner's request for an API request, and how its success is
/// answered; or the 400 that says what is wrong with it.
pub fn to_request(api: ApiRequest) -> Result<(Request, Answer), Reply> {
    Ok(match api {
        ApiRequest::Info => (Request::Info, Answer::Ok),
        ApiRequest::VmConfig => (Request::VmConfig, Answer::Ok),
        ApiRequest::PatchVm(p) => (Request::SetVmState(p.state), Answer::Ok),
        ApiRequest::CreateSnapshot { body, wait } => (
            Request::CreateSnapshot(snapshot_order(&body, wait)?),
            if wait { Answer::Ok } else { Answer::Created },
        ),
        ApiRequest::GetSnapshot(id) => (Request::GetSnapshot(id), Answer::Ok),
        ApiRequest::ListSnapshots => (Request::ListSnapshots, Answer::Ok),
        ApiRequest::CancelSnapshot(id) => (Request::CancelSnapshot(id), Answer::Ok),
        ApiRequest::LoadSnapshot(body) => (Request::LoadSnapshot(load_order(&body)?), Answer::Ok),
        ApiRequest::SetSchedule(body) => {
            (Request::StartSchedule(schedule_order(&body)?), Answer::Ok)
        }
        ApiRequest::GetSchedule => (Request::GetSchedule, Answer::Ok),
        ApiRequest::StopSchedule => (Request::StopSchedule, Answer::Ok),
        ApiRequest::Action(a) => (action(&a)?, Answer::Ok),
        ApiRequest::Metrics => (Request::Metrics, Answer::Ok),
    })
}

/// The HTTP reply for the owner's answer.
pub fn to_reply(answer: Answer, result: Result<Response, OwnerError>) -> Reply {
    let status = match answer {
        Answer::Ok => 200,
        Answer::Created => 201,
    };
    match result {
        Ok(Response::Empty) => Reply::no_content(),
        Ok(Response::Info(i)) => Reply::json(200, &i),
        Ok(Response::VmConfig(v)) => Reply::json(200, &v),
        Ok(Response::Snapshot(s)) => Reply::json(status, &s),
        Ok(Response::Snapshots(l)) => Reply::json(200, &l),
        Ok(Response::Schedule(s)) => Reply::json(200, &s),
        Ok(Response::Metrics(m)) => match metrics::render(&m) {
            Ok(text) => Reply {
                status: 200,
                body: ReplyBody::Metrics(text),
            },
            Err(e) => Reply::fault(500, format!("cannot render metrics: {e}")),
        },
        Err(e) => {
            let status = match &e {
                OwnerError::Invalid(_) => 400,
                OwnerError::NotFound(_) => 404,
                OwnerError::Conflict(_) => 409,
                OwnerError::Failed(_) => 500,
            };
            Reply::fault(status, e.to_string())
        }
    }
}

fn bad(msg: String) -> Reply {
    Reply::fault(400, msg)
}

fn snapshot_order(body: &SnapshotCreate, wait: bool) -> Result<SnapshotOrder, Reply> {
    let incremental = match body.snapshot_type.as_deref() {
        None | Some("Full") => false,
        Some("Diff") => true,
        Some(t) => {
            return Err(bad(format!(
                "unknown snapshot_type '{t}': expected Full or Diff"
            )))
        }
    };
    let mode = match body.mode.as_deref() {
        None => Strategy::AsyncFork,
        Some(m) => Strategy::from_name(m).ok_or_else(|| {
            bad(format!(
                "unknown mode '{m}': expected async-fork, stop-the-world, fork or sync-wp"
            ))
        })?,
    };
    let workers = match body.workers {
        None => None,
        Some(n) if (1..=64).contains(&n) => Some(n as usize),
        Some(n) => return Err(bad(format!("workers {n}: expected 1..=64"))),
    };
    Ok(SnapshotOrder {
        dir: snapshot_dir(&body.snapshot_path, body.mem_file_path.as_deref())?,
        mode,
        workers,
        overwrite: body.overwrite,
        memory_budget: body.memory_budget,
        incremental,
        wait,
    })
}

fn load_order(body: &SnapshotLoad) -> Result<LoadOrder, Reply> {
    Ok(LoadOrder {
        dir: snapshot_dir(&body.snapshot_path, body.mem_file_path.as_deref())?,
        resume: body.resume_vm,
        verify: body.verify,
    })
}

fn schedule_order(body: &ScheduleSet) -> Result<ScheduleOrder, Reply> {
    let dir = Path::new(&body.snapshot_dir);
    if !dir.is_absolute() {
        return Err(bad(format!(
            "snapshot_dir '{}' must be an absolute path",
            body.snapshot_dir
        )));
    }
    let every = crate::cli::parse_duration(&body.every).map_err(|e| bad(format!("every: {e}")))?;
    if every.is_zero() {
        return Err(bad("every must be longer than 0".into()));
    }
    if !(1..=10_000).contains(&body.keep) {
        return Err(bad(format!("keep {}: expected 1..=10000", body.keep)));
    }
    if !(1..=256).contains(&body.full_every) {
        return Err(bad(format!(
            "full_every {}: expected 1..=256",
            body.full_every
        )));
    }
    Ok(ScheduleOrder {
        dir: dir.to_path_buf(),
        every,
        keep: body.keep as usize,
        full_every: body.full_every as usize,
    })
}

fn action(a: &Action) -> Result<Request, Reply> {
    match a.action_type.as_str() {
        "Shutdown" => Ok(Request::Shutdown),
        other => Err(bad(format!(
            "unsupported action_type '{other}': expected Shutdown"
        ))),
    }
}

/// The snapshot directory named by a request: absolute, and a
/// `mem_file_path`, if given, must be the image inside it (snapvm keeps
/// the memory image in the directory).
fn snapshot_dir(snapshot_path: &str, mem_file_path: Option<&str>) -> Result<PathBuf, Reply> {
    let dir = Path::new(snapshot_path);
    if snapshot_path.is_empty() || !dir.is_absolute() {
        return Err(bad(format!(
            "snapshot_path '{snapshot_path}' must be an absolute path"
        )));
    }
    if let Some(mem) = mem_file_path {
        if Path::new(mem) != dir.join(MEMORY_FILE) {
            return Err(bad(format!(
                "mem_file_path '{mem}' must be absent or {}: snapvm keeps the memory image inside the snapshot directory",
                dir.join(MEMORY_FILE).display()
            )));
        }
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::VmTargetState;

    #[test]
    fn snapshot_dirs() {
        assert_eq!(snapshot_dir("/a/b", None).unwrap(), PathBuf::from("/a/b"));
        assert!(snapshot_dir("/a/b", Some("/a/b/memory.img")).is_ok());
        assert!(snapshot_dir("/a/b/", Some("/a/b/memory.img")).is_ok());
        assert_eq!(
            snapshot_dir("/a/b", Some("/a/mem")).unwrap_err().status,
            400
        );
        assert_eq!(snapshot_dir("rel", None).unwrap_err().status, 400);
        assert_eq!(snapshot_dir("", None).unwrap_err().status, 400);
    }

    #[test]
    fn schedule_bodies_are_checked() {
        let set = |json: &str| {
            let body: ScheduleSet = serde_json::from_str(json).unwrap();
            schedule_order(&body)
        };
        let ok = set(r#"{"snapshot_dir":"/s","every":"1m30s"}"#).unwrap();
        assert_eq!(
            ok,
            ScheduleOrder {
                dir: "/s".into(),
                every: std::time::Duration::from_secs(90),
                keep: 3,
                full_every: 8,
            }
        );
        let msg = |json: &str| match set(json).unwrap_err().body {
            ReplyBody::Json(s) => s,
            other => panic!("{other:?}"),
        };
        assert!(
            msg(r#"{"snapshot_dir":"s","every":"1s"}"#).contains("'s' must be an absolute path")
        );
        assert!(msg(r#"{"snapshot_dir":"/s","every":"soon"}"#)
            .contains("every: invalid duration 'soon'"));
        assert!(
            msg(r#"{"snapshot_dir":"/s","every":"0s"}"#).contains("every must be longer than 0")
        );
        assert!(msg(r#"{"snapshot_dir":"/s","every":"1s","keep":0}"#)
            .contains("keep 0: expected 1..=10000"));
        assert!(
            msg(r#"{"snapshot_dir":"/s","every":"1s","full_every":300}"#)
                .contains("full_every 300: expected 1..=256")
        );
    }

    #[test]
    fn owner_answers_map_to_statuses() {
        let fault = |e| to_reply(Answer::Ok, Err(e)).status;
        assert_eq!(fault(OwnerError::Invalid("x".into())), 400);
        assert_eq!(fault(OwnerError::NotFound("x".into())), 404);
        assert_eq!(fault(OwnerError::Conflict("x".into())), 409);
        assert_eq!(fault(OwnerError::Failed("x".into())), 500);
        assert_eq!(to_reply(Answer::Ok, Ok(Response::Empty)).status, 204);
        let (req, answer) = to_request(ApiRequest::PatchVm(super::super::model::VmPatch {
            state: VmTargetState::Paused,
        }))
        .unwrap();
        assert_eq!(
            (req, answer),
            (Request::SetVmState(VmTargetState::Paused), Answer::Ok)
        );
    }
}
