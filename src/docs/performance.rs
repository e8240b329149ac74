//! Performance: what each operation guarantees, what it costs, and which
//! benchmark says so.
//!
//! # Progress guarantees
//!
//! | operation | progress | what it does |
//! |---|---|---|
//! | [`VcpuHandle::read`]/[`write`](crate::VcpuHandle::write) | lock-free with no retry loop, apart from the device's own code | pin the handle's own crossbeam-epoch participant (a store to its cache line and a full fence), load the table, try the last-hit slot, else search, call the device, unpin (a `Release` store); every 128th pin, crossbeam's collection step (see below) |
//! | [`IoBus::read`]/[`write`](crate::IoBus::write) (`std`) | as above after a thread's first call | through a participant cached in thread-local storage; the first call on a thread registers one (an allocation) |
//! | [`IoBus::lookup`], [`range`](crate::IoBus::range), [`devices`](crate::IoBus::devices), [`len`](crate::IoBus::len), [`generation`](crate::IoBus::generation) | as above (`devices` allocates its result; without `std` each call registers a fresh participant) | read the current table the same way |
//! | [`IoBus::device`] | blocking | reads the registry under the writer lock |
//! | [`register`](crate::IoBus::register), [`unregister`](crate::IoBus::unregister), [`remap`](crate::IoBus::remap), [`transaction`](crate::IoBus::transaction) | blocking (one writer lock, never held while device code runs) | copy the table, edit, validate, publish once, defer the old table to the collector, flush and collect, then drop the devices whose grace period is over; never waits for readers |
//! | [`Unplug::wait`] | blocking | until every dispatch that was in progress at the unplug has returned; backs off (spin, yield, sleep up to 1 ms) |
//! | [`Unplug::poll`], [`is_complete`](crate::Unplug::is_complete) | lock-free | `poll` flushes and collects once |
//! | [`IoBus::handle`](crate::IoBus::handle), dropping a handle | lock-free (crossbeam's participant list) | register or retire the participant |
//!
//! The dispatch path runs a bounded number of steps — at most `log2(n) + 1`
//! probes of a table of `n` ranges — and never runs a device destructor.
//! Every 128th pin of a participant, crossbeam tries to advance the epoch
//! (reading every participant of the bus's collector) and runs up to eight
//! batches of retired closures; vmio's closures only free a table or push a
//! pre-allocated node onto a lock-free list, and the bus's last references
//! to unplugged devices are dropped by writers and unplug polls and waits.
//!
//! # Why the fence stays
//!
//! A reader must announce itself before it loads the table pointer, or a
//! reclaimer could miss it and free the table under it. Announcing is a
//! store and the table load is a load: without a full fence between them the
//! CPU may run the load first (the store-buffer reordering every
//! architecture allows). crossbeam's pin pays that fence on every dispatch.
//! An earlier version of vmio moved it to the reclaimer with
//! `membarrier(2)`: a few nanoseconds faster per dispatch, but a vCPU parked
//! in a device made every edit slow and let garbage grow without bound,
//! unplug waits flooded the other CPUs with barrier interrupts, a sandbox
//! that denied the system call broke publishing, and a panicking destructor
//! stranded unplugs. A few nanoseconds against a KVM exit that costs
//! microseconds does not pay for that. `tests/bus_store_buffer.rs` races
//! readers against a writer that reclaims at once (run in release by CI).
//!
//! # Ballpark costs
//!
//! Measured on the project's 2-core development machine (AMD EPYC, shared
//! and often loaded): single thread, `cargo bench --bench dispatch`. The README's "Performance" section has the full comparison,
//! regenerated from one run by `scripts/perf-table`.
//!
//! | operation | cost | backed by |
//! |---|---|---|
//! | dispatch through a `VcpuHandle`, uniform addresses, n = 8 … 4096 | see the README's table (the floor: same search, no synchronization) | `dispatch/uniform-1t/vmio` |
//! | the same through `IoBus::read` | a thread-local lookup more, no hint | `dispatch/uniform-1t/vmio_std` |
//! | instructions per dispatch, n = 8 / 64 / 4096 | ≈ 112 / 145 / 199 (floor at 64: 100; naive crossbeam-epoch + `binary_search`: 123 / 156 / 222) | `dispatch_instructions` (`vcpu_handle.*`, `naive_epoch.*`) |
//! | register + unregister, n = 64 | ≈ 11,600 instructions | `dispatch_instructions` (`register_unregister.n64`) |
//!
//! Where the time goes, from the cheapest table up:
//!
//! * **The search.** Up to 16 ranges the starts are counted with no branch;
//!   above, a binary search whose step is a conditional move. Both cost the
//!   same whatever the guest's address pattern, unlike a branchy search,
//!   which is fast only while the branch predictor can learn the stream.
//!   The floor in the benchmark uses this same code.
//! * **The hint.** Above 16 ranges, each handle remembers the slot of its
//!   last hit and, once the vCPU has come back to it twice in a row, checks
//!   it first (against the current table, so it can never misroute). A vCPU
//!   that keeps hitting one device pays two compares instead of a search; a
//!   vCPU that scatters rarely pays for a wrong guess. Small tables skip it:
//!   counting 16 starts costs about what keeping the hint does.
//! * **The rest of a dispatch** over the floor's: crossbeam's pin and unpin
//!   (counters, the epoch store and the fence), the hint check above 16
//!   ranges, and the richer `Result` (the error names the address and the
//!   device). The access's end is checked once against the candidate
//!   slot; only a miss looks again to tell an unmapped address from one
//!   that straddles a range's end.
//! * **Writers** copy the whole table (8 bytes of start and a 32-byte slot
//!   per range) and allocate the new one: linear in `n`, never waiting for
//!   vCPUs. Each edit defers one closure and flushes it to the collector
//!   (so any thread's unplug wait can complete it), then collects. While
//!   more than 16 retirements are in flight (a vCPU parked in a device),
//!   writers hold new ones back and defer them 64 at a time, so a stuck
//!   vCPU pins a table and about 100 bytes per edit, not also one of
//!   crossbeam's 2 KiB batches; edits stay at full speed
//!   (`tests/bus_reclaim.rs`).
//!
//! # Regression checks
//!
//! Wall-clock numbers on a shared machine drift by tens of percent from run
//! to run. `scripts/instructions check` (part of `.ci/run`) counts the
//! instructions of the dispatch hot path under valgrind's callgrind and
//! fails when any benchmark of `benches/dispatch_instructions.rs` grows more
//! than 5 % over `benches/dispatch_instructions.baseline`.
//!
//! [`VcpuHandle::read`]: crate::VcpuHandle::read
//! [`IoBus::read`]: crate::IoBus::read
//! [`IoBus::lookup`]: crate::IoBus::lookup
//! [`IoBus::device`]: crate::IoBus::device
//! [`Unplug::wait`]: crate::Unplug::wait
//! [`Unplug::poll`]: crate::Unplug::poll
