//! virtio-blk properties: random requests in random descriptor layouts
//! against a shadow disk. Every chain comes back; the status is the one the
//! spec gives for the request; `used.len` never overstates what was written;
//! reads return the last acknowledged write; failed requests change nothing.

use std::sync::Arc;

use proptest::prelude::*;
use vmio::testing::{Buf, GuestAlloc, GuestQueue};
use vmio::virtio::blk::{
    BlkConfig, BlockBackend, RamDisk, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    VirtioBlk,
};
use vmio::virtio::features::VIRTIO_F_VERSION_1;
use vmio::virtio::{Activation, GuestMemory, GuestRam, RecordingIrq, SplitQueue, VirtioDevice};

const RAM: u64 = 0x40_0000;
const QBASE: u64 = 0x1000;
const BUFS: u64 = 0x10_0000;
const DISK_SECTORS: u64 = 256;
const SEG_MAX: u32 = 6;

fn cases() -> u32 {
    if cfg!(miri) { 4 } else { 128 }
}

/// One request as the guest means it.
#[derive(Debug, Clone)]
struct Req {
    kind: u32,
    sector: u64,
    /// Data bytes (IN: to read, OUT: to write, GET_ID: id buffer).
    len: u32,
    /// Where the request stream (header + OUT data) is cut into
    /// descriptors, as fractions.
    read_cuts: Vec<u16>,
    /// Same for the response stream (IN data + status).
    write_cuts: Vec<u16>,
    /// No writable buffer at all (so no status byte, and no IN data).
    no_status: bool,
    seed: u8,
}

fn req() -> impl Strategy<Value = Req> {
    let kind = prop_oneof![
        4 => Just(T_IN),
        4 => Just(T_OUT),
        1 => Just(T_FLUSH),
        1 => Just(T_GET_ID),
        1 => any::<u32>(),
    ];
    // Mostly in range and aligned; sometimes not.
    let sector = prop_oneof![8 => 0..DISK_SECTORS, 1 => DISK_SECTORS - 4..DISK_SECTORS + 4, 1 => any::<u64>()];
    let len = prop_oneof![8 => (1u32..=8).prop_map(|n| n * 512), 1 => 0u32..2048, 1 => Just(20u32)];
    (
        kind,
        sector,
        len,
        prop::collection::vec(any::<u16>(), 0..3),
        prop::collection::vec(any::<u16>(), 0..3),
        prop::bool::weighted(0.05),
        any::<u8>(),
    )
        .prop_map(|(kind, sector, len, read_cuts, write_cuts, no_status, seed)| Req {
            kind,
            sector,
            len,
            read_cuts,
            write_cuts,
            no_status,
            seed,
        })
}

/// Cuts `[addr, addr + total)` into buffers at the given fractions (empty
/// pieces dropped: the queue refuses zero-length descriptors).
fn split(addr: u64, total: u32, cuts: &[u16], writable: bool) -> Vec<Buf> {
    let mut points: Vec<u32> =
        cuts.iter().map(|&c| (u64::from(total) * u64::from(c) / 65536) as u32).collect();
    points.push(0);
    points.push(total);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| Buf { addr: addr + u64::from(w[0]), len: w[1] - w[0], writable })
        .collect()
}

/// What the spec says this request must end with, given the disk.
fn expected_status(r: &Req) -> u8 {
    match r.kind {
        T_IN | T_OUT => {
            let in_range =
                r.sector.checked_add(u64::from(r.len) / 512).is_some_and(|end| end <= DISK_SECTORS);
            if r.len.is_multiple_of(512) && in_range { S_OK } else { S_IOERR }
        }
        T_FLUSH | T_GET_ID => S_OK,
        // DISCARD and WRITE_ZEROES are not negotiated here; the rest unknown.
        _ => S_UNSUPP,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_requests_in_random_layouts_match_the_spec(reqs in prop::collection::vec(req(), 1..24)) {
        let ram = Arc::new(GuestRam::new(0, RAM).unwrap());
        let disk = Arc::new(RamDisk::new(DISK_SECTORS * 512));
        let config = BlkConfig { seg_max: Some(SEG_MAX), ..BlkConfig::default() }.with_id("prop");
        let blk = VirtioBlk::new(disk.clone(), config).unwrap();
        let mut gq = GuestQueue::new(256, QBASE);
        gq.init(&*ram).unwrap();
        // VERSION_1 | FLUSH | SEG_MAX: no DISCARD / WRITE_ZEROES.
        let features = VIRTIO_F_VERSION_1 | (1 << 9) | (1 << 2);
        let queue = SplitQueue::new(gq.config(), features, &*ram).unwrap();
        blk.activate(Activation {
            queues: vec![Some(queue)],
            memory: ram.clone(),
            interrupt: Arc::new(RecordingIrq::new()),
            features,
        }).unwrap();
        let mut shadow = vec![0u8; (DISK_SECTORS * 512) as usize];
        let mut alloc = GuestAlloc::new(BUFS, RAM - BUFS);

        for r in reqs {
            alloc.reset_to(BUFS);
            let is_write = r.kind == T_OUT;
            let out_len = if is_write { r.len } else { 0 };
            let wants_data = !is_write && !r.no_status && (r.kind == T_IN || r.kind == T_GET_ID);
            let in_len = if wants_data { r.len } else { 0 };
            // The request stream: header then OUT data, contiguous, then cut.
            let req_addr = alloc.alloc(16 + u64::from(out_len), 16);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&r.kind.to_le_bytes());
            h[8..].copy_from_slice(&r.sector.to_le_bytes());
            ram.write(req_addr, &h).unwrap();
            let data: Vec<u8> = (0..out_len).map(|i| (i as u8).wrapping_mul(31) ^ r.seed).collect();
            ram.write(req_addr + 16, &data).unwrap();
            // The response stream: IN data then the status byte.
            let status_len = u32::from(!r.no_status);
            let resp_len = in_len + status_len;
            let resp_addr = alloc.alloc(u64::from(resp_len.max(1)), 16);
            ram.fill(resp_addr, u64::from(resp_len.max(1)), 0xee).unwrap();
            let mut bufs = split(req_addr, 16 + out_len, &r.read_cuts, false);
            bufs.extend(split(resp_addr, resp_len, &r.write_cuts, true));
            let descriptors = bufs.len();
            let head = gq.add(&*ram, &bufs).unwrap();
            blk.serve(0, &vmio::virtio::QueueStop::new());
            let (id, used_len) = gq.pop_used(&*ram).unwrap().expect("every chain comes back");
            prop_assert_eq!(id, u32::from(head));
            prop_assert!(used_len <= resp_len, "used.len {} > writable {}", used_len, resp_len);

            if r.no_status {
                prop_assert_eq!(used_len, 0);
                continue;
            }
            let mut status = [0u8];
            ram.read(resp_addr + u64::from(in_len), &mut status).unwrap();
            let mut want = expected_status(&r);
            if descriptors > SEG_MAX as usize + 2 && matches!(r.kind, T_IN | T_OUT | T_FLUSH | T_GET_ID) {
                want = S_IOERR;
            }
            prop_assert_eq!(status[0], want, "{:?}", r);
            let at = (r.sector.wrapping_mul(512)) as usize;
            match (r.kind, want) {
                (T_OUT, S_OK) => {
                    shadow[at..at + data.len()].copy_from_slice(&data);
                    prop_assert_eq!(used_len, 1);
                }
                (T_IN, S_OK) => {
                    let mut got = vec![0u8; in_len as usize];
                    ram.read(resp_addr, &mut got).unwrap();
                    prop_assert!(got == shadow[at..at + got.len()], "read is not the last write");
                    prop_assert_eq!(used_len, in_len + 1);
                }
                (T_GET_ID, S_OK) => {
                    let n = in_len.min(20) as usize;
                    let mut got = vec![0u8; n];
                    ram.read(resp_addr, &mut got).unwrap();
                    prop_assert_eq!(&got[..], &b"prop\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"[..n]);
                    prop_assert_eq!(used_len as usize, n + 1);
                }
                _ => prop_assert_eq!(used_len, 1),
            }
        }
        // Failed requests wrote nothing: the disk is exactly the shadow.
        let mut on_disk = vec![0u8; shadow.len()];
        disk.read_at(0, &mut on_disk).unwrap();
        prop_assert!(on_disk == shadow);
    }
}
