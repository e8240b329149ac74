//! Split virtqueue properties: random well-formed chains round-trip through
//! pop and push exactly; random garbage in the rings never panics and never
//! yields a chain that breaks the queue's promises.

use proptest::prelude::*;
use vmio::testing::{Buf, ChainSpec, GuestAlloc, GuestQueue, chain, garbage, queue_size};
use vmio::virtio::spec::features::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX};

use vmio::virtio::{DEFAULT_SEGMENTS, PopError, QueueConfig, QueueError, SplitQueue};
use vmio::{GuestMemory, GuestRam};

const RAM_END: u64 = 0x20_0000;
const QBASE: u64 = 0x1000;
const BUFS: u64 = 0x10_0000;

fn cases() -> u32 {
    if cfg!(miri) { 8 } else { 256 }
}

/// Fills a buffer with bytes derived from its address, so copies can be
/// checked without keeping the data around.
fn pattern(addr: u64, len: u32) -> Vec<u8> {
    (0..u64::from(len)).map(|i| (addr + i).wrapping_mul(0x9e37_79b9) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn well_formed_chains_round_trip(
        size in queue_size(64),
        event_idx in any::<bool>(),
        batches in prop::collection::vec(prop::collection::vec(chain(8, 300), 1..=8), 1..=12),
    ) {
        let ram = GuestRam::new(0, RAM_END).unwrap();
        let mut gq = GuestQueue::new(size, QBASE);
        gq.init(&ram).unwrap();
        let features = VIRTIO_F_INDIRECT_DESC | if event_idx { VIRTIO_F_RING_EVENT_IDX } else { 0 };
        let mut q = SplitQueue::new(gq.config(), features, &ram).unwrap();
        let mut alloc = GuestAlloc::new(BUFS, RAM_END - BUFS);
        for batch in batches {
            alloc.reset_to(BUFS);
            // As many as fit: a direct chain needs one descriptor per buffer.
            let mut sent: Vec<(u16, ChainSpec, Vec<Buf>)> = Vec::new();
            for spec in batch {
                let bufs = spec.place(&mut alloc);
                for b in bufs.iter().filter(|b| !b.writable) {
                    ram.write(b.addr, &pattern(b.addr, b.len)).unwrap();
                }
                let head = if spec.indirect {
                    let table = alloc.alloc(16 * bufs.len() as u64, 16);
                    if gq.free_descriptors() == 0 { break; }
                    gq.add_indirect(&ram, table, &bufs).unwrap()
                } else {
                    if gq.free_descriptors() < bufs.len() { break; }
                    gq.add(&ram, &bufs).unwrap()
                };
                sent.push((head, spec, bufs));
            }
            prop_assert_eq!(q.pending(&ram).unwrap() as usize, sent.len());
            let mut used = Vec::new();
            for (head, spec, bufs) in &sent {
                let c = q.pop(&ram).unwrap().expect("a chain per add");
                prop_assert_eq!(c.head(), *head);
                prop_assert_eq!(c.segments().len(), bufs.len());
                for (seg, b) in c.segments().iter().zip(bufs) {
                    prop_assert_eq!((seg.addr, seg.len), (b.addr, b.len));
                }
                prop_assert_eq!(c.readable_len(), spec.readable_len());
                prop_assert_eq!(c.writable_len(), spec.writable_len());
                // The request reads back as one stream.
                let mut req = vec![0u8; c.readable_len() as usize];
                prop_assert_eq!(c.read_at(&ram, 0, &mut req).unwrap(), req.len());
                let want: Vec<u8> = bufs.iter().filter(|b| !b.writable)
                    .flat_map(|b| pattern(b.addr, b.len)).collect();
                prop_assert_eq!(req, want);
                let resp = vec![*head as u8; c.writable_len() as usize];
                prop_assert_eq!(c.write_at(&ram, 0, &resp).unwrap(), resp.len());
                used.push((*head, c.writable_len()));
            }
            prop_assert!(q.pop(&ram).unwrap().is_none());
            prop_assert_eq!(q.in_flight() as usize, sent.len());
            q.push_batch(&ram, &used).unwrap();
            for &(head, len) in &used {
                prop_assert_eq!(gq.pop_used(&ram).unwrap(), Some((u32::from(head), len)));
            }
            prop_assert_eq!(gq.pop_used(&ram).unwrap(), None);
            for (head, _, bufs) in &sent {
                for b in bufs.iter().filter(|b| b.writable) {
                    let mut got = vec![0u8; b.len as usize];
                    ram.read(b.addr, &mut got).unwrap();
                    prop_assert!(got.iter().all(|&x| x == *head as u8));
                }
            }
            prop_assert_eq!(q.in_flight(), 0);
        }
    }

    #[test]
    fn garbage_rings_never_panic(
        size in queue_size(32),
        features in prop_oneof![Just(0u64), Just(VIRTIO_F_INDIRECT_DESC),
            Just(VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX)],
        table in garbage(16 * 32),
        avail in garbage(6 + 2 * 32),
        extra in garbage(256),
    ) {
        let ram = GuestRam::new(0, RAM_END).unwrap();
        let cfg = QueueConfig {
            size,
            desc_table: QBASE,
            avail_ring: QBASE + 0x1000,
            used_ring: QBASE + 0x2000,
        };
        // Descriptors that point into a small window (so some hit RAM and
        // indirect tables land on `extra`) and some anywhere.
        let mut table = table;
        for d in table.chunks_mut(16) {
            if d[7] & 1 == 0 {
                let addr = 0x4000 + u64::from(d[0]) * 16;
                d[..8].copy_from_slice(&addr.to_le_bytes());
            }
        }
        // Mostly an `avail.idx` in range, so chains get parsed at all.
        let mut avail = avail;
        if avail[3] & 3 != 0 {
            let idx = u16::from(avail[2]) % (size + 1);
            avail[2..4].copy_from_slice(&idx.to_le_bytes());
        }
        ram.write(cfg.desc_table, &table[..16 * size as usize]).unwrap();
        ram.write(cfg.avail_ring, &avail[..6 + 2 * size as usize]).unwrap();
        ram.write(0x4000, &extra).unwrap();
        let mut q = SplitQueue::new(cfg, features, &ram).unwrap();
        let mut popped = 0u32;
        loop {
            match q.pop(&ram) {
                Ok(Some(c)) => {
                    popped += 1;
                    prop_assert!(c.segments().len() <= DEFAULT_SEGMENTS);
                    prop_assert!(!c.segments().is_empty());
                    let mut total = 0u64;
                    for s in c.segments() {
                        prop_assert!(s.len > 0);
                        prop_assert!(ram.check(s.addr, u64::from(s.len)).is_ok());
                        total += u64::from(s.len);
                    }
                    prop_assert!(total <= u64::from(u32::MAX));
                    prop_assert_eq!(total, u64::from(c.readable_len()) + u64::from(c.writable_len()));
                    q.push(&ram, c.head(), 0).unwrap();
                }
                Ok(None) => break,
                Err(PopError::Chain { head, .. }) => {
                    popped += 1;
                    prop_assert!(head < size);
                    q.push(&ram, head, 0).unwrap();
                }
                Err(PopError::Queue(_)) => {
                    prop_assert!(q.is_broken());
                    prop_assert_eq!(q.pop(&ram), Err(PopError::Queue(QueueError::Broken)));
                    break;
                }
            }
            // `avail.idx` is at most `size` ahead, and each pop consumes one.
            prop_assert!(popped <= u32::from(size));
        }
        if !q.is_broken() {
            let _ = q.needs_interrupt(&ram).unwrap();
            let _ = q.enable_notification(&ram);
        }
        // The device only ever wrote the used ring (and nothing else).
        let mut after = vec![0u8; 16 * size as usize];
        ram.read(cfg.desc_table, &mut after).unwrap();
        prop_assert_eq!(&after[..], &table[..16 * size as usize]);
        let mut x = vec![0u8; extra.len()];
        ram.read(0x4000, &mut x).unwrap();
        prop_assert_eq!(x, extra);

    }
}
