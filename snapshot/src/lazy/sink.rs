//! Fault events handed from the restore's fault reader to a snapshot's
//! fault handler: while a snapshot of a VM that is still loading runs, both
//! need the one userfaultfd that guest RAM is registered with (a range
//! takes only one), so the loader keeps reading it and passes on the
//! faults that are the snapshot's business.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use crate::eventfd::EventFd;
use crate::sync::lock;
use crate::uffd::Event;

#[derive(Debug)]
pub struct EventSink {
    queue: Mutex<VecDeque<Event>>,
    ready: EventFd,
}

impl EventSink {
    pub fn new() -> std::io::Result<EventSink> {
        Ok(EventSink {
            queue: Mutex::new(VecDeque::new()),
            ready: EventFd::new()?,
        })
    }

    pub fn push(&self, ev: Event) {
        lock(&self.queue).push_back(ev);
        self.ready.signal();
    }

    /// Moves every queued event to `out` (after clearing it).
    pub fn take(&self, out: &mut Vec<Event>) {
        self.ready.drain();
        out.clear();
        out.extend(lock(&self.queue).drain(..));
    }
}

impl AsRawFd for EventSink {
    /// Readable when events are queued.
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}
