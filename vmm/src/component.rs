//! The contract every part of a VM with state keeps, so that a snapshot
//! can treat them alike (as Cloud Hypervisor's `Pausable` /
//! `Snapshottable` and Firecracker's `Persist` do):
//!
//! - [`Pausable`]: stop touching guest memory and one's own state until
//!   resumed. The sync phase pauses the VM's components in order (vCPUs
//!   first, then the devices that run threads of their own) and resumes
//!   them in reverse (`Vm::pausable`).
//! - [`Persist`]: the component's state as a plain serde struct beside it,
//!   saved while it is paused, and a new component built from such a state
//!   (the builder's restore path). `VmState` is the set of these states.
//!
//! Invariants: `save` is only called while the component (and every
//! component that can write what it reads) is paused; `restore` builds a
//! component that behaves as the saved one did at that instant.

use std::fmt;

/// Why a component could not be paused.
#[derive(Debug, thiserror::Error)]
#[error("{component}: {message}")]
pub struct PauseFailed {
    pub component: &'static str,
    pub message: String,
}

impl PauseFailed {
    pub fn new(component: &'static str, e: impl fmt::Display) -> PauseFailed {
        PauseFailed {
            component,
            message: e.to_string(),
        }
    }
}

/// A component that can be held still.
pub trait Pausable {
    /// What it is, for errors and logs.
    fn name(&self) -> &'static str;
    /// Returns once the component touches neither guest memory nor its own
    /// state; fails (never hangs) if it cannot.
    fn pause(&self) -> Result<(), PauseFailed>;
    /// Lets it go again; a no-op if it was not paused.
    fn resume(&self);
    /// Whether it is paused now (a component paused by someone else before
    /// a snapshot stays paused after it).
    fn is_paused(&self) -> bool;
}

impl<T: Pausable + ?Sized> Pausable for &T {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn pause(&self) -> Result<(), PauseFailed> {
        (**self).pause()
    }
    fn resume(&self) {
        (**self).resume()
    }
    fn is_paused(&self) -> bool {
        (**self).is_paused()
    }
}

/// A component whose state a snapshot saves and a restore rebuilds.
pub trait Persist: Sized {
    /// The plain-data state (serde).
    type State;
    /// What building the component needs besides its state (fds, sinks,
    /// guest memory).
    type ConstructorArgs;
    type Error;

    /// The state now (the component is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// A component in `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Pauses `components` in order, skipping those already paused; returns
/// the ones it paused (to resume with [`resume_all`]). On a failure it
/// resumes what it paused and returns the error.
pub fn pause_all<'a>(
    components: &'a [Box<dyn Pausable + 'a>],
) -> Result<Vec<&'a dyn Pausable>, PauseFailed> {
    let mut paused: Vec<&'a dyn Pausable> = Vec::with_capacity(components.len());
    for c in components {
        if c.is_paused() {
            continue;
        }
        if let Err(e) = c.pause() {
            resume_all(&paused);
            return Err(e);
        }
        paused.push(c.as_ref());
    }
    Ok(paused)
}

/// Resumes `paused` in reverse order.
pub fn resume_all(paused: &[&dyn Pausable]) {
    for c in paused.iter().rev() {
        c.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Fake<'a> {
        name: &'static str,
        fail: bool,
        paused: RefCell<bool>,
        log: &'a RefCell<Vec<String>>,
    }

    impl Pausable for Fake<'_> {
        fn name(&self) -> &'static str {
            self.name
        }
        fn pause(&self) -> Result<(), PauseFailed> {
            self.log.borrow_mut().push(format!("pause {}", self.name));
            if self.fail {
                return Err(PauseFailed::new(self.name, "stuck"));
            }
            *self.paused.borrow_mut() = true;
            Ok(())
        }
        fn resume(&self) {
            self.log.borrow_mut().push(format!("resume {}", self.name));
            *self.paused.borrow_mut() = false;
        }
        fn is_paused(&self) -> bool {
            *self.paused.borrow()
        }
    }

    #[test]
    fn pauses_in_order_resumes_in_reverse_and_leaves_paused_ones_paused() {
        let log = RefCell::new(Vec::new());
        let fake = |name, paused| Fake {
            name,
            fail: false,
            paused: RefCell::new(paused),
            log: &log,
        };
        let (a, b, c) = (fake("a", false), fake("b", true), fake("c", false));
        let all: Vec<Box<dyn Pausable + '_>> = vec![Box::new(&a), Box::new(&b), Box::new(&c)];
        let paused = pause_all(&all).unwrap();
        resume_all(&paused);
        assert_eq!(
            *log.borrow(),
            ["pause a", "pause c", "resume c", "resume a"]
        );
        assert!(b.is_paused(), "paused by someone else: stays paused");
    }

    #[test]
    fn a_failed_pause_resumes_what_was_paused() {
        let log = RefCell::new(Vec::new());
        let a = Fake {
            name: "a",
            fail: false,
            paused: RefCell::new(false),
            log: &log,
        };
        let b = Fake {
            name: "b",
            fail: true,
            paused: RefCell::new(false),
            log: &log,
        };
        let all: Vec<Box<dyn Pausable + '_>> = vec![Box::new(&a), Box::new(&b)];
        let e = pause_all(&all).map(|_| ()).unwrap_err();
        assert_eq!(e.to_string(), "b: stuck");
        assert_eq!(*log.borrow(), ["pause a", "pause b", "resume a"]);
        assert!(!a.is_paused());
    }
}
