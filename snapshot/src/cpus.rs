//! Host CPU sets: parsed from taskset-style lists (`1`, `0-3`, `0,2-3`)
//! and applied to threads as their scheduler affinity.
//!
//! Why the engine cares: on a small host a copier that shares a core with
//! a vCPU makes the vCPU, woken at the end of the pause, queue behind it
//! for a time slice, which is the guest's stall
//! (docs/journal/2026-12-02-snapshot-cpus.md). With the guest kept on some CPUs (`snapvm run
//! --cpus`), [`crate::Config::background_cpus`] keeps the supervisor and
//! the copiers on the others.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::str::FromStr;

/// A non-empty set of host CPU numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet {
    cpus: BTreeSet<usize>,
}

/// A CPU list that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("empty CPU list (expected e.g. 1, 0-3 or 0,2-3)")]
    Empty,
    #[error("'{0}' is not a CPU number or range (expected e.g. 1, 0-3 or 0,2-3)")]
    NotANumber(String),
    #[error("CPU range '{0}' runs backwards")]
    Backwards(String),
    #[error("CPU {0} is beyond the {max} CPUs an affinity mask can name", max = CpuSet::LIMIT)]
    TooLarge(usize),
}

impl CpuSet {
    /// CPUs a `cpu_set_t` can hold.
    pub const LIMIT: usize = libc::CPU_SETSIZE as usize;

    /// The CPUs the calling thread may run on (at start-up: the
    /// process's, as narrowed by an outer taskset or cpuset cgroup).
    pub fn allowed() -> io::Result<CpuSet> {
        // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable cpu_set_t of the size passed;
        // pid 0 is the calling thread.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let cpus = (0..Self::LIMIT)
            // SAFETY: i < CPU_SETSIZE, inside the set.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect();
        Ok(CpuSet { cpus })
    }

    /// The CPUs of `self` not in `other`; None if that leaves none.
    pub fn without(&self, other: &CpuSet) -> Option<CpuSet> {
        let cpus: BTreeSet<usize> = self.cpus.difference(&other.cpus).copied().collect();
        (!cpus.is_empty()).then_some(CpuSet { cpus })
    }

    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    /// Always false: a set is built non-empty (kept for clippy's
    /// len-without-is-empty rule).
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.cpus.contains(&cpu)
    }

    fn to_libc(&self) -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in &self.cpus {
            // SAFETY: every member is < CPU_SETSIZE (checked when parsed
            // or read), inside the set.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        set
    }

    /// Restricts the calling thread to these CPUs. Threads it creates
    /// afterwards inherit the restriction.
    pub fn pin_current_thread(&self) -> io::Result<()> {
        let set = self.to_libc();
        // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is
        // the calling thread.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Restricts a running thread (by its handle) to these CPUs.
    pub fn pin_thread<T>(&self, thread: &std::thread::JoinHandle<T>) -> io::Result<()> {
        use std::os::unix::thread::JoinHandleExt;
        let set = self.to_libc();
        // SAFETY: the handle keeps the pthread_t valid (not yet joined or
        // detached); `set` is a valid cpu_set_t of the size passed.
        let rc = unsafe {
            libc::pthread_setaffinity_np(
                thread.as_pthread_t(),
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}

/// The affinity (`Cpus_allowed_list`, e.g. `0-1`) of each thread of
/// process `pid` named `name`, from /proc: for checking where threads ended
/// up, from outside them.
pub fn thread_cpu_lists(pid: u32, name: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some(list.trim().to_string())
        })
        .collect()
}

impl FromStr for CpuSet {
    type Err = CpuListError;

    fn from_str(s: &str) -> Result<CpuSet, CpuListError> {
        let number = |t: &str| {
            let t = t.trim();
            let cpu: usize = t
                .parse()
                .map_err(|_| CpuListError::NotANumber(t.to_string()))?;
            if cpu >= Self::LIMIT {
                return Err(CpuListError::TooLarge(cpu));
            }
            Ok(cpu)
        };
        let mut cpus = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (number(lo)?, number(hi)?);
                    if lo > hi {
                        return Err(CpuListError::Backwards(part.to_string()));
                    }
                    cpus.extend(lo..=hi);
                }
                None => {
                    cpus.insert(number(part)?);
                }
            }
        }
        if cpus.is_empty() {
            return Err(CpuListError::Empty);
        }
        Ok(CpuSet { cpus })
    }
}

/// The compact list form (`0-3,5`), as taskset and /proc print it.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.cpus.iter().copied().peekable();
        while let Some(lo) = iter.next() {
            let mut hi = lo;
            while iter.peek() == Some(&(hi + 1)) {
                hi += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if hi == lo {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    #[test]
    fn lists_parse_and_print_compactly() {
        assert_eq!(set("1").to_string(), "1");
        assert_eq!(set("0-3").to_string(), "0-3");
        assert_eq!(set(" 3, 0-1 ,2,7").to_string(), "0-3,7");
        assert_eq!(set("5,5,5").len(), 1);
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        assert_eq!("".parse::<CpuSet>(), Err(CpuListError::Empty));
        assert_eq!(" , ".parse::<CpuSet>(), Err(CpuListError::Empty));
        assert_eq!(
            "a".parse::<CpuSet>(),
            Err(CpuListError::NotANumber("a".into()))
        );
        assert_eq!(
            "1-".parse::<CpuSet>(),
            Err(CpuListError::NotANumber("".into()))
        );
        assert_eq!(
            "3-1".parse::<CpuSet>(),
            Err(CpuListError::Backwards("3-1".into()))
        );
        assert_eq!("1024".parse::<CpuSet>(), Err(CpuListError::TooLarge(1024)));
        assert_eq!(
            "3-1".parse::<CpuSet>().unwrap_err().to_string(),
            "CPU range '3-1' runs backwards"
        );
    }

    #[test]
    fn without_leaves_the_rest_or_none() {
        assert_eq!(set("0-3").without(&set("1")), Some(set("0,2-3")));
        assert_eq!(set("1").without(&set("0-1")), None);
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpus_and_its_children_inherit() {
        let allowed = CpuSet::allowed().unwrap();
        let first = *allowed.cpus.iter().next().unwrap();
        let one = set(&first.to_string());
        let (mine, child) = std::thread::spawn(move || {
            one.pin_current_thread().unwrap();
            let child = std::thread::spawn(|| CpuSet::allowed().unwrap())
                .join()
                .unwrap();
            (CpuSet::allowed().unwrap(), child)
        })
        .join()
        .unwrap();
        assert_eq!(mine, set(&first.to_string()));
        assert_eq!(child, mine);
        // The spawning thread kept its own set.
        assert_eq!(CpuSet::allowed().unwrap(), allowed);
    }

    #[test]
    fn a_thread_is_pinned_through_its_handle() {
        let allowed = CpuSet::allowed().unwrap();
        let first = *allowed.cpus.iter().next().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name("cpus-by-handle".into())
            .spawn(move || {
                // The thread names itself as it starts: only then can it
                // be found by name.
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                CpuSet::allowed().unwrap()
            })
            .unwrap();
        ready_rx.recv().unwrap();
        set(&first.to_string()).pin_thread(&h).unwrap();
        // Seen from outside the thread as well. /proc may show the new
        // name a moment after the thread runs (seen once in CI): poll.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = thread_cpu_lists(std::process::id(), "cpus-by-handle");
        while seen.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
            seen = thread_cpu_lists(std::process::id(), "cpus-by-handle");
        }
        assert_eq!(seen, vec![first.to_string()]);
        go_tx.send(()).unwrap();
        assert_eq!(h.join().unwrap(), set(&first.to_string()));
    }
}
