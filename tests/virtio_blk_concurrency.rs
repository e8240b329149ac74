//! virtio-blk queues run in parallel, and many queues under many vCPU
//! threads keep the disk consistent.
//!
//! - `queues_are_processed_in_parallel`: two vCPU threads notify two
//!   different queues through the bus; the backend completes a request only
//!   while the other queue's request is in flight too. Serialized queues
//!   cannot meet that: the backend gives up after a timeout and the request
//!   fails, so a regression fails the test instead of hanging it (the
//!   `..._detects_serialization` control proves it does).
//! - `random_multi_queue_workload_matches_shadow`: several threads on
//!   several queues issue random reads, writes, write-zeroes, discards and
//!   flushes over overlapping ranges; every read returns the last
//!   acknowledged write.

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

#[path = "common/virtio_drivers_glue.rs"]
mod glue;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use glue::{bring_up, dwz_segment};
use vmio::testing::{BackendOp, FaultyDisk, Intercept, ServeHook};
use vmio::virtio::blk::{BackendError, BlkConfig, BlockBackend, RamDisk, VirtioBlk};
use vmio::virtio::spec::blk::{S_IOERR, S_OK, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES};
use vmio::virtio::{QueueStop, Trigger, VirtioDevice};
use vmio::{IoBus, Mmio};

const BASE: u64 = 0x1000_0000;
const ALL: u64 = u64::MAX;

fn plug(device: impl VirtioDevice + 'static) -> IoBus<Mmio> {
    glue::plug(device, BASE, Trigger::Edge)
}

/// Makes a disk's reads complete only when `parties` reads are inside it
/// at the same moment.
struct Rendezvous {
    parties: usize,
    timeout: Duration,
    /// (generation, arrived in this generation)
    state: Mutex<(u64, usize)>,
    cv: Condvar,
    inside: AtomicUsize,
    most_inside: AtomicUsize,
}

impl Rendezvous {
    fn new(parties: usize, timeout: Duration) -> Self {
        Rendezvous {
            parties,
            timeout,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            inside: AtomicUsize::new(0),
            most_inside: AtomicUsize::new(0),
        }
    }

    /// Waits for the other parties; false on timeout.
    fn meet(&self) -> bool {
        // Relaxed: statistics only, read after the threads are joined.
        let now = self.inside.fetch_add(1, Ordering::Relaxed) + 1;
        self.most_inside.fetch_max(now, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        let generation = st.0;
        st.1 += 1;
        let met = if st.1 == self.parties {
            st.0 += 1;
            st.1 = 0;
            self.cv.notify_all();
            true
        } else {
            let (mut st, res) =
                self.cv.wait_timeout_while(st, self.timeout, |s| s.0 == generation).unwrap();
            if res.timed_out() {
                st.1 -= 1;
                false
            } else {
                true
            }
        };
        self.inside.fetch_sub(1, Ordering::Relaxed);
        met
    }
}

impl Rendezvous {
    /// A 1 MiB disk whose reads first meet at `rendezvous`.
    fn disk(rendezvous: &Arc<Rendezvous>) -> Arc<FaultyDisk> {
        let r = rendezvous.clone();
        Arc::new(FaultyDisk::ram(1 << 20).on(move |op| match op {
            BackendOp::Read { .. } if !r.meet() => {
                Err(BackendError::Io { op: "rendezvous timed out", os_error: None })
            }
            _ => Ok(()),
        }))
    }
}

/// Two threads, two queues, `rounds` reads each; returns the statuses seen.
fn two_queue_rounds(bus: &IoBus<Mmio>, rounds: usize) -> Vec<u8> {
    let (_, queues) = bring_up(bus, BASE, 2, ALL);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                let mut q = q.attach();
                let mut buf = vec![0u8; 4096];
                (0..rounds)
                    .map(|r| q.request(T_IN, (r * 8) as u64, &[], &mut buf).0)
                    .collect::<Vec<u8>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
}

#[test]
fn queues_are_processed_in_parallel() {
    let rounds = if cfg!(miri) { 2 } else { 50 };
    let rendezvous = Arc::new(Rendezvous::new(2, Duration::from_secs(10)));
    let backend = Rendezvous::disk(&rendezvous);
    let config = BlkConfig { num_queues: 2, ..BlkConfig::default() };
    let bus = plug(VirtioBlk::new(backend.clone(), config).unwrap());
    let statuses = two_queue_rounds(&bus, rounds);
    assert_eq!(statuses.len(), 2 * rounds);
    assert!(
        statuses.iter().all(|&s| s == S_OK),
        "a request timed out waiting for the other queue: queues were serialized"
    );
    assert_eq!(rendezvous.most_inside.load(Ordering::Relaxed), 2);
}

/// Serves every queue behind one lock: what a device-wide lock would look
/// like.
#[derive(Default)]
struct Serialized(Mutex<()>);

impl ServeHook for Serialized {
    fn serve<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16, stop: &QueueStop) {
        let _all = self.0.lock().unwrap();
        device.serve(queue, stop)
    }
}

#[test]
fn queues_are_processed_in_parallel_detects_serialization() {
    // The same test against a device-wide lock must fail (quickly, with a
    // short rendezvous timeout): every round one request times out.
    let rendezvous = Arc::new(Rendezvous::new(2, Duration::from_millis(50)));
    let backend = Rendezvous::disk(&rendezvous);
    let config = BlkConfig { num_queues: 2, ..BlkConfig::default() };
    let device = Intercept {
        device: VirtioBlk::new(backend.clone(), config).unwrap(),
        hook: Serialized::default(),
    };
    let statuses = two_queue_rounds(&plug(device), 3);
    assert!(statuses.contains(&S_IOERR), "serialized queues went unnoticed: {statuses:?}");
    assert_eq!(rendezvous.most_inside.load(Ordering::Relaxed), 1);
}

/// Sectors per extent lock of the workload.
const EXTENT: usize = 8;
const SECTOR: usize = 512;

/// The shadow of one extent: its bytes, and which sectors were discarded
/// (their contents are unspecified until written again).
struct Shadow {
    data: Vec<u8>,
    unknown: [bool; EXTENT],
}

#[test]
fn random_multi_queue_workload_matches_shadow() {
    const QUEUES: u16 = 4;
    let ops = if cfg!(miri) { 10 } else { 400 };
    let disk = Arc::new(RamDisk::new(2 << 20));
    let sectors = (disk.size() as usize) / SECTOR;
    let config = BlkConfig { num_queues: QUEUES, ..BlkConfig::default() };
    let bus = plug(VirtioBlk::new(disk.clone(), config).unwrap());
    let (features, queues) = bring_up(&bus, BASE, QUEUES, ALL);
    assert_ne!(features & (1 << 13), 0, "DISCARD negotiated");
    assert_ne!(features & (1 << 14), 0, "WRITE_ZEROES negotiated");

    // Extent locks serialize overlapping requests (the test's own model);
    // disjoint ones run on all queues at once.
    let shadow: Arc<Vec<Mutex<Shadow>>> = Arc::new(
        (0..sectors / EXTENT)
            .map(|_| {
                Mutex::new(Shadow { data: vec![0; EXTENT * SECTOR], unknown: [false; EXTENT] })
            })
            .collect(),
    );
    let threads: Vec<_> = queues
        .into_iter()
        .map(|q| {
            let shadow = shadow.clone();
            std::thread::spawn(move || {
                let mut q = q.attach();
                let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(q.index() + 1));
                let mut counts = [0usize; 5];
                for op in 0..ops {
                    let n = 1 + rng.below(24) as usize;
                    let start = rng.below((sectors - n) as u64) as usize;
                    let (first, last) = (start / EXTENT, (start + n - 1) / EXTENT);
                    // Ascending order: no deadlock between threads.
                    let mut held: Vec<_> =
                        (first..=last).map(|e| shadow[e].lock().unwrap()).collect();
                    let at = |s: usize| ((s / EXTENT) - first, (s % EXTENT) * SECTOR);
                    let kind = rng.below(20);
                    let what = format!("queue {} op {op}: {kind} at {start}+{n}", q.index());
                    match kind {
                        0..=7 => {
                            let data: Vec<u8> = (0..n * SECTOR).map(|_| rng.next() as u8).collect();
                            assert_eq!(
                                q.request(T_OUT, start as u64, &data, &mut []).0,
                                S_OK,
                                "{what}"
                            );
                            for i in 0..n {
                                let (e, off) = at(start + i);
                                held[e].data[off..off + SECTOR]
                                    .copy_from_slice(&data[i * SECTOR..(i + 1) * SECTOR]);
                                held[e].unknown[(start + i) % EXTENT] = false;
                            }
                            counts[0] += 1;
                        }
                        8..=14 => {
                            let mut back = vec![0u8; n * SECTOR];
                            let (status, len) = q.request(T_IN, start as u64, &[], &mut back);
                            assert_eq!((status, len as usize), (S_OK, n * SECTOR + 1), "{what}");
                            for i in 0..n {
                                let (e, off) = at(start + i);
                                if !held[e].unknown[(start + i) % EXTENT] {
                                    assert!(
                                        back[i * SECTOR..(i + 1) * SECTOR]
                                            == held[e].data[off..off + SECTOR],
                                        "{what}: sector {} is not the last acknowledged write",
                                        start + i
                                    );
                                }
                            }
                            counts[1] += 1;
                        }
                        15..=16 => {
                            let seg = dwz_segment(start as u64, n as u32, rng.below(2) == 0);
                            assert_eq!(
                                q.request(T_WRITE_ZEROES, 0, &seg, &mut []).0,
                                S_OK,
                                "{what}"
                            );
                            for i in 0..n {
                                let (e, off) = at(start + i);
                                held[e].data[off..off + SECTOR].fill(0);
                                held[e].unknown[(start + i) % EXTENT] = false;
                            }
                            counts[2] += 1;
                        }
                        17..=18 => {
                            let seg = dwz_segment(start as u64, n as u32, false);
                            assert_eq!(q.request(T_DISCARD, 0, &seg, &mut []).0, S_OK, "{what}");
                            for i in 0..n {
                                let (e, _) = at(start + i);
                                held[e].unknown[(start + i) % EXTENT] = true;
                            }
                            counts[3] += 1;
                        }
                        _ => {
                            assert_eq!(q.request(T_FLUSH, 0, &[], &mut []).0, S_OK, "{what}");
                            counts[4] += 1;
                        }
                    }
                    held.clear();
                }
                counts
            })
        })
        .collect();
    let mut totals = [0usize; 5];
    for t in threads {
        for (total, c) in totals.iter_mut().zip(t.join().unwrap()) {
            *total += c;
        }
    }
    assert!(totals.iter().all(|&c| c > 0), "every kind of request ran: {totals:?}");

    // The backend holds exactly the shadow (discarded sectors aside).
    let mut bytes = vec![0u8; EXTENT * SECTOR];
    for (e, ext) in shadow.iter().enumerate() {
        let ext = ext.lock().unwrap();
        disk.read_at((e * EXTENT * SECTOR) as u64, &mut bytes).unwrap();
        for s in 0..EXTENT {
            if !ext.unknown[s] {
                let r = s * SECTOR..(s + 1) * SECTOR;
                assert!(
                    bytes[r.clone()] == ext.data[r],
                    "sector {} differs on the backend",
                    e * EXTENT + s
                );
            }
        }
    }
}
