//! The loader's work: loading one chunk (read, check, move in), deciding
//! when the load is over, the prefetch threads and the fault thread.

use super::*;

/// The EBUSY the `busy_moves` test hooks inject.
fn injected_busy(dst: u64) -> UffdError {
    UffdError::Range {
        op: "move (injected)",
        start: dst,
        len: CHUNK_SIZE,
        source: std::io::Error::from_raw_os_error(libc::EBUSY),
    }
}

impl Inner {
    pub(super) fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    pub(super) fn fail(&self, e: LoadError) {
        let msg = e.to_string();
        {
            let mut slot = lock(&self.error);
            if slot.is_some() {
                return;
            }
            *slot = Some(msg.clone());
        }
        // `on_error` reports it (the VMM stops the VM with it).
        tracing::debug!("{msg}");
        self.stop.store(true, Ordering::Release);
        (self.on_error)(msg);
    }

    /// UFFDIO_MOVE of `buf` to chunk `dst`. A move the kernel refuses for
    /// a moment (EBUSY/EAGAIN) is tried again after a short pause, from
    /// where a partial move stopped, up to [`MOVE_ATTEMPTS`] times: the
    /// usual EBUSY is the chunk's huge page still pinned by the O_DIRECT
    /// read that just filled it: the I/O completion wakes the reader first
    /// and unpins the pages after (`iomap_dio_bio_end_io`), so a move right
    /// after the read can find the page pinned. A retry keeps the chunk's
    /// huge page where a copy would lose it.
    fn move_chunk(&self, dst: u64, buf: &ChunkBuf) -> Result<bool, UffdError> {
        let take = |n: &AtomicUsize| {
            n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        };
        let refuse_all = take(&self.busy_moves);
        let refuse_once = !refuse_all && take(&self.busy_once_moves);
        let mut done = 0;
        let mut pause = MOVE_FIRST_PAUSE;
        let mut attempt = 1;
        loop {
            let (moved, res) = if refuse_all || (refuse_once && attempt == 1) {
                (0, Err(injected_busy(dst)))
            } else {
                self.uffd
                    .move_pages_counted(dst + done, buf.addr() + done, CHUNK_SIZE - done, true)
            };
            done += moved;
            match res {
                Err(e) if e.is_transient() && attempt < MOVE_ATTEMPTS => {
                    tracing::debug!("restore: {e}; trying again in {pause:?}");
                    self.moves_retried.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pause);
                    pause *= 2;
                    attempt += 1;
                }
                res => return res,
            }
        }
    }

    /// Copies `buf` into chunk `dst` page by page after a failed move,
    /// which may have moved some pages already (those answer EEXIST).
    fn copy_pages(&self, dst: u64, buf: &mut ChunkBuf) -> Result<bool, UffdError> {
        for p in 0..CHUNK_SIZE / PAGE_SIZE {
            let off = p * PAGE_SIZE;
            // SAFETY: `off` < CHUNK_SIZE: inside the buffer, one chunk of
            // our own memory that only this thread uses.
            let src = unsafe { buf.as_mut_ptr().add(off as usize) };
            self.uffd.copy(dst + off, src, PAGE_SIZE, true)?;
        }
        Ok(true)
    }

    /// Loads chunk `i` through `buf` unless someone else does.
    pub(super) fn load(&self, i: usize, buf: &mut ChunkBuf) -> Outcome {
        let Some(st) = self.state.get(i) else {
            return Outcome::Failed;
        };
        if let Err(now) =
            st.compare_exchange(NOT_LOADED, LOADING, Ordering::AcqRel, Ordering::Acquire)
        {
            return if now == LOADED {
                Outcome::AlreadyLoaded
            } else {
                Outcome::Busy
            };
        }
        let data = self.source.data(i);
        match data {
            ChunkData::Zero => buf.fill_zero(),
            ChunkData::Data(_) => {
                // SAFETY: `buf` is a chunk of our own memory that only this
                // thread uses.
                if let Err(e) = unsafe { self.source.read_chunk(i, buf.as_mut_ptr()) } {
                    // The chunk stays LOADING: its faulting threads are
                    // never woken onto memory we could not vouch for.
                    self.fail(e);
                    return Outcome::Failed;
                }
                self.bytes_read.fetch_add(CHUNK_SIZE, Ordering::Relaxed);
            }
        }
        let dst = self.layout.chunk(i).host_addr;
        {
            let tracking = self.tracking.read().unwrap_or_else(|p| p.into_inner());
            let handed = match self.hand {
                Hand::Move => match self.move_chunk(dst, buf) {
                    // The kernel still will not move this huge page after
                    // the retries (EBUSY or EAGAIN). The bytes are verified
                    // and still in `buf` (but for pages a partial move
                    // took): copy them in, this chunk then maps 4 KiB pages,
                    // instead of stopping the VM.
                    Err(e) if e.is_transient() => {
                        tracing::debug!("restore: {e}; copying chunk {i} in instead");
                        self.copied_in.fetch_add(1, Ordering::Relaxed);
                        self.copy_pages(dst, buf)
                    }
                    moved => moved,
                },
                Hand::Copy => self.uffd.copy(dst, buf.as_mut_ptr(), CHUNK_SIZE, true),
            };
            // Guest RAM is let go once every *data* chunk is in
            // (`check_done`): a hole still on its way then meets an
            // unregistered range. Nothing is lost: the range is ordinary
            // memory that reads as zero (or holds what the guest wrote
            // since). Before this, such a race failed a finished load and
            // stopped the VM (seen in CI).
            let late_hole = || matches!(data, ChunkData::Zero) && self.released();
            if !matches!(handed, Ok(true)) && late_hole() {
                st.store(LOADED, Ordering::Release);
                return Outcome::AlreadyLoaded;
            }
            match handed {
                Ok(true) => {}
                Ok(false) => {
                    self.fail(LoadError::Populated { index: i });
                    return Outcome::Failed;
                }
                Err(e) => {
                    self.fail(e.into());
                    return Outcome::Failed;
                }
            }
            if *tracking {
                // (The kernel takes no DONTWAKE when protecting.)
                if let Err(e) = self.uffd.write_protect(dst, CHUNK_SIZE, true, false) {
                    if late_hole() {
                        st.store(LOADED, Ordering::Release);
                        return Outcome::AlreadyLoaded;
                    }
                    self.fail(e.into());
                    return Outcome::Failed;
                }
            }
            st.store(LOADED, Ordering::Release);
        }
        let _ = self.uffd.wake(dst, CHUNK_SIZE);
        if matches!(data, ChunkData::Data(_)) {
            self.data_loaded.fetch_add(1, Ordering::AcqRel);
            self.check_done();
        }
        Outcome::Loaded
    }

    /// Whether guest RAM has been let go (every data chunk in).
    fn released(&self) -> bool {
        lock(&self.attach).released
    }

    /// Once every data chunk is in and no snapshot needs the registration,
    /// lets go of guest RAM: what was never touched (holes) is then
    /// ordinary memory that reads as zero.
    pub(super) fn check_done(&self) {
        if self.data_loaded.load(Ordering::Acquire) < self.data_total || self.failed() {
            return;
        }
        {
            let mut f = lock(&self.finished);
            if f.is_none() {
                let took = self.started.elapsed();
                *f = Some(took);
                tracing::info!(
                    "{}: memory loaded ({} MiB in {:.2} s, {} chunks on first touch, {} copied in 4 KiB pages, {} moves tried again)",
                    self.source.dir().display(),
                    self.bytes_read.load(Ordering::Relaxed) >> 20,
                    took.as_secs_f64(),
                    self.on_demand.load(Ordering::Relaxed),
                    self.copied_in.load(Ordering::Relaxed),
                    self.moves_retried.load(Ordering::Relaxed)
                );
            }
        }
        let mut a = lock(&self.attach);
        if a.released || a.sink.is_some() {
            return;
        }
        a.released = true;
        for r in self.layout.regions() {
            // Unregistering wakes anyone still blocked on a hole.
            if let Err(e) = self.uffd.unregister(r.host_addr, r.len) {
                tracing::warn!("restore: {e}");
            }
        }
        self.stop.store(true, Ordering::Release);
        self.stop_evt.signal();
    }

    pub(super) fn prefetch(&self, mut buf: ChunkBuf) {
        let mut yielded = Duration::ZERO;
        while !self.stop.load(Ordering::Acquire) {
            // A guest that just faulted is likely to fault again: its
            // reads go first, while they come in bursts (bounded, so a
            // guest faulting without pause cannot starve the prefetch).
            let since = (self.started.elapsed().as_nanos() as u64)
                .saturating_sub(self.last_demand_ns.load(Ordering::Acquire));
            let busy = self.demand.load(Ordering::Acquire) > 0
                || (self.on_demand.load(Ordering::Relaxed) > 0
                    && since < DEMAND_QUIET.as_nanos() as u64);
            if busy && yielded < MAX_YIELD {
                std::thread::sleep(Duration::from_micros(200));
                yielded += Duration::from_micros(200);
                continue;
            }
            yielded = Duration::ZERO;
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = self.order.get(k) else {
                return;
            };
            if k >= self.hot_len {
                let mut go = lock(&self.go);
                while !*go {
                    go = self.go_cv.wait(go).unwrap_or_else(|p| p.into_inner());
                }
            }
            if self.source.data(i) == ChunkData::Zero {
                continue;
            }
            if self.load(i, &mut buf) == Outcome::Failed {
                return;
            }
        }
    }

    pub(super) fn serve_faults(&self, mut buf: ChunkBuf) {
        let mut events = Vec::with_capacity(64);
        loop {
            let [readable, stopped] =
                crate::uffd::wait_readable([self.uffd.as_raw_fd(), self.stop_evt.as_raw_fd()]);
            if stopped && self.stop.load(Ordering::Acquire) {
                // Failed or released: a failed load leaves its waiters
                // blocked until shutdown unregisters guest RAM.
                return;
            }
            if !readable {
                continue;
            }
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut events) {
                tracing::warn!("restore: {e}");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for ev in &events {
                if let Event::PageFault { address, kind } = *ev {
                    self.fault(*ev, address, kind, &mut buf);
                }
            }
        }
    }

    pub(super) fn fault(&self, ev: Event, address: u64, kind: FaultKind, buf: &mut ChunkBuf) {
        let Some(i) = self.layout.chunk_of_host(address) else {
            let _ = self.uffd.wake(address & !(PAGE_SIZE - 1), PAGE_SIZE);
            return;
        };
        if kind != FaultKind::WriteProtect && self.state[i].load(Ordering::Acquire) == NOT_LOADED {
            self.demand.fetch_add(1, Ordering::AcqRel);
            let outcome = self.load(i, buf);
            self.last_demand_ns
                .store(self.started.elapsed().as_nanos() as u64, Ordering::Release);
            self.demand.fetch_sub(1, Ordering::AcqRel);
            match outcome {
                Outcome::Loaded => {
                    self.on_demand.fetch_add(1, Ordering::Relaxed);
                    // The faulting thread runs again; get the next fault's
                    // staging memory now rather than in its read.
                    buf.prefault();
                    return;
                }
                Outcome::Busy | Outcome::Failed => return,
                Outcome::AlreadyLoaded => {}
            }
        }
        if kind != FaultKind::WriteProtect && self.state[i].load(Ordering::Acquire) == LOADING {
            // The loading thread wakes it.
            return;
        }
        // A loaded chunk: a write-protect fault (a snapshot's), or a page
        // discarded since it loaded.
        if let Some(sink) = lock(&self.attach).sink.as_ref() {
            sink.push(ev);
            return;
        }
        self.settle_loaded(i, address, kind);
    }

    /// Answers a fault on loaded chunk `i` when no snapshot takes it.
    pub(super) fn settle_loaded(&self, i: usize, address: u64, kind: FaultKind) {
        let page = address & !(PAGE_SIZE - 1);
        let at = self.layout.chunk(i).host_addr;
        let done = match kind {
            // Left protected by a snapshot that is gone: lift it.
            FaultKind::WriteProtect => self
                .uffd
                .write_protect(at, CHUNK_SIZE, false, false)
                .is_ok(),
            // A page discarded since the chunk loaded.
            FaultKind::Missing { write } => {
                crate::zero_fill::fill_page(&self.uffd, address, at, write, self.hugetlb)
            }
        };
        if !done {
            let _ = self.uffd.wake(page, PAGE_SIZE);
        }
    }
}
