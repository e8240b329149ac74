//! Performance: what each operation guarantees, what it costs, and which
//! benchmark says so.
//!
//! # Progress guarantees
//!
//! | operation | progress | what it does |
//! |---|---|---|
//! | [`VcpuHandle::read`]/[`write`](crate::VcpuHandle::write) | wait-free, apart from the device's own code | mark the handle active (a plain store to its own cache line), load the table, try the last-hit slot, else search, call the device, mark it idle (a `Release` store) |
//! | [`IoBus::read`]/[`write`](crate::IoBus::write) (`std`) | wait-free after a thread's first call | as above, through a reader cached in thread-local storage; the first call on a thread registers one (an allocation and the domain's registry lock) |
//! | [`IoBus::lookup`], [`range`](crate::IoBus::range), [`devices`](crate::IoBus::devices), [`len`](crate::IoBus::len), [`generation`](crate::IoBus::generation) | wait-free after a thread's first call (`devices` allocates its result) | read the current table the same way |
//! | [`IoBus::device`] | blocking | reads the registry under the writer lock |
//! | [`register`](crate::IoBus::register), [`unregister`](crate::IoBus::unregister), [`remap`](crate::IoBus::remap), [`transaction`](crate::IoBus::transaction) | blocking (one writer lock, never held while device code runs) | copy the table, edit, validate, publish once, retire the old table, reclaim what is due; never waits for readers |
//! | [`Unplug::wait`] | blocking | until every dispatch that was in progress at the unplug has returned |
//! | [`Unplug::poll`], [`is_complete`](crate::Unplug::is_complete) | non-blocking (`poll` takes the domain's short internal locks) | |
//! | [`IoBus::handle`](crate::IoBus::handle), dropping a handle | blocking (the domain's registry lock, briefly) | register or deregister the reader slot |
//!
//! The dispatch path runs a bounded number of steps — at most `log2(n) + 1`
//! probes of a table of `n` ranges — and never reclaims: retired tables and
//! the bus's last references to unplugged devices are freed by unplug polls
//! and waits, and by writers once eight retired tables have piled up, so no
//! device's `Drop` runs on a vCPU thread in the middle of a dispatch.
//!
//! # Why readers need no fence
//!
//! A reader must announce itself before it loads the table pointer, or a
//! reclaimer could miss it and free the table under it. Announcing is a
//! store and the table load is a load: without a full fence between them the
//! CPU may run the load first (the store-buffer reordering every
//! architecture allows). A full fence per dispatch (`lock cmpxchg` on x86,
//! as an epoch-based collector's pin does) costs a few nanoseconds and stops
//! the CPU from overlapping one dispatch with the next: in this project's
//! benchmark it was most of the gap to the unsynchronized floor (with
//! crossbeam-epoch pinning: 3.1 × the floor at n = 8, 1.6 × at n = 64).
//!
//! vmio moves that fence to the rare side. Before it reads the readers'
//! counters, a reclaimer calls `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`,
//! which runs a full barrier on every CPU currently running a thread of the
//! process; a CPU not running one has passed a context switch, which is a
//! barrier too. Either a reader's announcement is visible after that, or its
//! table load comes after the barrier and sees the new table. Readers keep a
//! compiler fence only. Without `membarrier` (no `std`, another OS, an old
//! kernel) both sides use a `SeqCst` fence instead; the choice is made once
//! per process, before the first bus exists.
//!
//! # Ballpark costs
//!
//! Measured on the project's 2-core development machine (AMD EPYC, shared
//! and often loaded): single thread, `cargo bench --bench dispatch`. The README's "Performance" section has the full comparison,
//! regenerated from one run by `scripts/perf-table`.
//!
//! | operation | cost | backed by |
//! |---|---|---|
//! | dispatch through a `VcpuHandle`, uniform addresses, n = 1 … 4096 | ≈ 4–18 ns (floor: 3–15 ns) | `dispatch/uniform-1t/vmio` |
//! | the same through `IoBus::read` | ≈ 3–7 ns more (thread-local lookup, no hint) | `dispatch/uniform-1t/vmio_std` |
//! | dispatch to a device the vCPU keeps hitting (hot pattern) | ≈ 5–7 ns at any n: the search is skipped | `dispatch/hot-1t/vmio` |
//! | register or unregister, n = 64 | ≈ 1 µs | `dispatch/writer/vmio/register/64` |
//! | register or unregister, n = 4096 | ≈ 4 µs | `dispatch/writer/vmio/register/4096` |
//! | transaction of 100 registers, n = 4096 | ≈ 11 µs, one publish | `dispatch/writer/vmio/batch100/4096` |
//! | instructions per dispatch, n = 64 (floor: 100) | ≈ 160 | `dispatch_instructions` (`vcpu_handle.n64`) |
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
//! * **The rest of a dispatch** over the floor's: the section counter, the
//!   hint check, the dispatch-depth marker that lets an unplug wait detect a
//!   call from device code, and the richer `Result` (the error names the
//!   address and the device) — about 65 instructions at n = 64.
//! * **Writers** copy the whole table (8 bytes of start and a 32-byte slot
//!   per range) and allocate the new one: linear in `n`, never waiting for
//!   vCPUs. Every eighth publish also reclaims, with one `membarrier` call:
//!   it interrupts each CPU running a vCPU for a moment, which is why it is
//!   batched (readers beside a 10,000 edits/s writer kept 87 % of their rate
//!   at n = 64 reclaiming on every publish, 95 % batched).
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
