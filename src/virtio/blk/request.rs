//! One virtio-blk request: the typed header, splitting a descriptor chain
//! into header, data and status, validating it against the device's limits,
//! running it on the backend and writing the status byte.
//!
//! Nothing here assumes a layout: the spec lets the driver split or merge
//! header, data and status across descriptors in any way, so the chain is
//! treated as two byte streams — the device-readable descriptors in order and
//! the device-writable ones in order — read and written with the chain's own
//! walker ([`DescriptorChain::read_at`] / [`write_at`](DescriptorChain::write_at)),
//! and the status is the last writable byte. Every guest byte the device
//! acts on is first copied into host memory (the header, the discard
//! segments) and validated there, so a guest rewriting its buffers
//! mid-request changes values, never checks.

use arrayvec::ArrayVec;

use super::backend::{BackendError, BlockBackend};
use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::DescriptorChain;
use crate::virtio::spec::blk::{
    DWZ_FLAG_UNMAP, DWZ_SEGMENT_LEN, HEADER_LEN, ID_LEN, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE,
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};

/// Most discard / write-zeroes segments one request may carry.
pub const MAX_DWZ_SEGMENTS: usize = 64;

/// What a request asks for: the header's `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read sectors into the writable buffers.
    In,
    /// `VIRTIO_BLK_T_OUT`: write the readable buffers to sectors.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device id string.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: deallocate ranges.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: zero ranges.
    WriteZeroes,
    /// Any other value: answered with `VIRTIO_BLK_S_UNSUPP`.
    Other(u32),
}

impl RequestType {
    /// The type a header's `type` field names.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            T_IN => RequestType::In,
            T_OUT => RequestType::Out,
            T_FLUSH => RequestType::Flush,
            T_GET_ID => RequestType::GetId,
            T_DISCARD => RequestType::Discard,
            T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Other(other),
        }
    }

    /// The header's `type` field for this type.
    pub const fn raw(self) -> u32 {
        match self {
            RequestType::In => T_IN,
            RequestType::Out => T_OUT,
            RequestType::Flush => T_FLUSH,
            RequestType::GetId => T_GET_ID,
            RequestType::Discard => T_DISCARD,
            RequestType::WriteZeroes => T_WRITE_ZEROES,
            RequestType::Other(raw) => raw,
        }
    }
}

/// The 16-byte header that opens every virtio-blk request:
/// `{type: le32, reserved: le32, sector: le64}`. Parsed in one place
/// ([`parse`](Self::parse)) and built in one place
/// ([`to_bytes`](Self::to_bytes)), which drivers and tests use too.
///
/// # Example
/// ```
/// use vmio::virtio::blk::{RequestHeader, RequestType};
///
/// let h = RequestHeader::new(RequestType::Out, 8);
/// assert_eq!(RequestHeader::parse(&h.to_bytes()), h);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// What the request asks for.
    pub request_type: RequestType,
    /// First 512-byte sector it addresses (IN, OUT).
    pub sector: u64,
}

impl RequestHeader {
    /// Size of the header in bytes.
    pub const LEN: usize = HEADER_LEN;

    /// A header for `request_type` at `sector`.
    pub const fn new(request_type: RequestType, sector: u64) -> Self {
        RequestHeader { request_type, sector }
    }

    /// Decodes a header (the reserved field is ignored, as the spec says).
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *bytes;
        RequestHeader {
            request_type: RequestType::from_raw(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }

    /// Encodes the header as the driver lays it out in guest memory.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.request_type.raw().to_le_bytes());
        b[8..].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// The limits and negotiated options a request is checked against; a
/// snapshot of the device configuration taken when the driver set
/// DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Disk size in bytes (a multiple of 512).
    pub size: u64,
    /// Most data descriptors per request (`seg_max`), when SEG_MAX applies.
    pub seg_max: Option<u32>,
    /// Largest single descriptor (`size_max`), when SIZE_MAX applies.
    pub size_max: Option<u32>,
    /// The disk refuses writes.
    pub read_only: bool,
    /// FLUSH was negotiated.
    pub flush: bool,
    /// DISCARD was negotiated: (max sectors per segment, max segments).
    pub discard: Option<(u32, u32)>,
    /// WRITE_ZEROES was negotiated: (max sectors per segment, max segments,
    /// whether unmap may deallocate).
    pub write_zeroes: Option<(u32, u32, bool)>,
}

/// Address of the status byte: the last byte of the last writable buffer.
fn status_addr<const N: usize>(chain: &DescriptorChain<N>) -> Option<u64> {
    let last = chain.writable().iter().rev().find(|b| b.len > 0)?;
    Some(last.addr.wrapping_add(u64::from(last.len) - 1))
}

/// Copies `buf.len()` request bytes starting `offset` bytes into the
/// readable stream; a short stream is an I/O error.
#[inline]
fn gather<const N: usize, M: GuestMemory + ?Sized>(
    chain: &DescriptorChain<N>,
    mem: &M,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Fail> {
    if chain.read_at(mem, offset, buf)? == buf.len() { Ok(()) } else { Err(Fail::IoErr) }
}

/// Copies `data` into the writable stream starting `offset` bytes in; a
/// short stream is an I/O error.
#[inline]
fn scatter<const N: usize, M: GuestMemory + ?Sized>(
    chain: &DescriptorChain<N>,
    mem: &M,
    offset: u64,
    data: &[u8],
) -> Result<(), Fail> {
    if chain.write_at(mem, offset, data)? == data.len() { Ok(()) } else { Err(Fail::IoErr) }
}

/// What went wrong, as the status byte will say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    IoErr,
    Unsupp,
}

impl From<MemoryError> for Fail {
    fn from(e: MemoryError) -> Self {
        log::debug!("virtio-blk guest buffer: {e}");
        Fail::IoErr
    }
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Self {
        log::debug!("virtio-blk backend: {e}");
        match e {
            BackendError::Unsupported => Fail::Unsupp,
            _ => Fail::IoErr,
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The status byte, or `None` when the chain has no writable byte to
    /// carry it (or the write failed).
    pub status: Option<u8>,
    /// What goes in `used.len`: bytes written to the writable buffers.
    pub used_len: u32,
}

/// Everything a request needs besides the chain.
pub(crate) struct Context<'a, M: GuestMemory + ?Sized, B: BlockBackend + ?Sized> {
    /// Guest memory.
    pub mem: &'a M,
    /// The disk.
    pub backend: &'a B,
    /// Checks to apply.
    pub limits: &'a Limits,
    /// The GET_ID answer.
    pub id: &'a [u8; ID_LEN],
    /// Flush after every write (a writethrough cache was chosen).
    pub writethrough: bool,
    /// Host bounce buffer for data; any non-zero length works, larger means
    /// fewer backend calls.
    pub scratch: &'a mut [u8],
}

/// Runs the request described by `chain`, writes its status byte and says
/// what to put in the used ring.
#[inline]
pub(crate) fn process<const N: usize, M: GuestMemory + ?Sized, B: BlockBackend + ?Sized>(
    chain: &DescriptorChain<N>,
    cx: &mut Context<'_, M, B>,
) -> Completion {
    let Some(status_addr) = status_addr(chain) else {
        // Nowhere to report anything: do nothing and hand the buffers back.
        log::debug!("virtio-blk: request without a writable status byte");
        return Completion { status: None, used_len: 0 };
    };
    let (status, data_written) = match execute(chain, cx) {
        Ok(n) => (S_OK, n),
        Err(Fail::IoErr) => (S_IOERR, 0),
        Err(Fail::Unsupp) => (S_UNSUPP, 0),
    };
    if cx.mem.write(status_addr, &[status]).is_err() {
        return Completion { status: None, used_len: 0 };
    }
    // `data_written` never exceeds the writable data bytes, which with the
    // status byte fit in u32 (a chain's length does).
    let used = u32::try_from(data_written + 1).unwrap_or(u32::MAX);
    Completion { status: Some(status), used_len: used }
}

/// Validates and runs the request; `Ok` carries the data bytes written to
/// the guest.
fn execute<const N: usize, M: GuestMemory + ?Sized, B: BlockBackend + ?Sized>(
    chain: &DescriptorChain<N>,
    cx: &mut Context<'_, M, B>,
) -> Result<u64, Fail> {
    let limits = cx.limits;
    if let Some(size_max) = limits.size_max
        && chain.segments().iter().any(|b| b.len > size_max)
    {
        return Err(Fail::IoErr);
    }
    // Header and status take at least one descriptor each unless merged
    // into data descriptors; count in the driver's favour.
    if let Some(seg_max) = limits.seg_max
        && chain.segments().len() > seg_max as usize + 2
    {
        return Err(Fail::IoErr);
    }

    let mut raw = [0u8; HEADER_LEN];
    gather(chain, cx.mem, 0, &mut raw)?;
    let header = RequestHeader::parse(&raw);
    // At least HEADER_LEN readable bytes exist: the header was gathered.
    let payload = u64::from(chain.readable_len()) - HEADER_LEN as u64;
    // The status byte exists (`process` found it).
    let writable_data = u64::from(chain.writable_len()).saturating_sub(1);

    match header.request_type {
        RequestType::In => {
            let offset = sector_range(header.sector, writable_data, limits.size)?;
            copy_to_guest(chain, cx, offset, writable_data)?;
            Ok(writable_data)
        }
        RequestType::Out => {
            if limits.read_only {
                return Err(Fail::IoErr);
            }
            let offset = sector_range(header.sector, payload, limits.size)?;
            copy_from_guest(chain, cx, offset, payload)?;
            if cx.writethrough {
                cx.backend.flush()?;
            }
            Ok(0)
        }
        RequestType::Flush if limits.flush => {
            cx.backend.flush()?;
            Ok(0)
        }
        RequestType::GetId => {
            let n = writable_data.min(ID_LEN as u64);
            scatter(chain, cx.mem, 0, &cx.id[..n as usize])?;
            Ok(n)
        }
        kind @ (RequestType::Discard | RequestType::WriteZeroes) => {
            let discard = kind == RequestType::Discard;
            let (max_sectors, max_segs, unmap_ok) =
                match (discard, limits.discard, limits.write_zeroes) {
                    (true, Some((s, n)), _) => (s, n, false),
                    (false, _, Some((s, n, u))) => (s, n, u),
                    _ => return Err(Fail::Unsupp),
                };
            if limits.read_only {
                return Err(Fail::IoErr);
            }
            let segs = read_segments(chain, cx.mem, payload, max_sectors, max_segs, limits.size)?;
            // The spec has no unmap for discard: the range is already
            // the driver's to lose.
            if discard && segs.iter().any(|s| s.unmap) {
                return Err(Fail::Unsupp);
            }
            for seg in &segs {
                // For write-zeroes, unmap only permits deallocation; without
                // `write_zeroes_may_unmap` the range is zeroed in place.
                if discard {
                    cx.backend.discard(seg.offset, seg.len)?;
                } else {
                    cx.backend.write_zeroes(seg.offset, seg.len, seg.unmap && unmap_ok)?;
                }
            }
            if cx.writethrough {
                cx.backend.flush()?;
            }
            Ok(0)
        }
        _ => Err(Fail::Unsupp),
    }
}

/// Checks that `len` bytes starting at `sector` are whole sectors inside the
/// disk; returns the byte offset.
fn sector_range(sector: u64, len: u64, size: u64) -> Result<u64, Fail> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Fail::IoErr);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Fail::IoErr)?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(Fail::IoErr),
    }
}

/// Disk → guest, for IN: the backend streams its bytes and each piece is
/// copied into the writable buffers where the previous one ended.
fn copy_to_guest<const N: usize, M: GuestMemory + ?Sized, B: BlockBackend + ?Sized>(
    chain: &DescriptorChain<N>,
    cx: &mut Context<'_, M, B>,
    offset: u64,
    len: u64,
) -> Result<(), Fail> {
    let mem = cx.mem;
    let mut done = 0u64;
    let mut sink = |piece: &[u8]| {
        let ok = scatter(chain, mem, done, piece).is_ok();
        done += piece.len() as u64;
        ok
    };
    cx.backend.read_to(offset, len, cx.scratch, &mut sink)?;
    Ok(())
}

/// Guest → disk, for OUT: the backend asks for its bytes piece by piece and
/// each is gathered from the readable buffers after the header.
fn copy_from_guest<const N: usize, M: GuestMemory + ?Sized, B: BlockBackend + ?Sized>(
    chain: &DescriptorChain<N>,
    cx: &mut Context<'_, M, B>,
    offset: u64,
    len: u64,
) -> Result<(), Fail> {
    let mem = cx.mem;
    let mut done = HEADER_LEN as u64;
    let mut source = |piece: &mut [u8]| {
        let ok = gather(chain, mem, done, piece).is_ok();
        done += piece.len() as u64;
        ok
    };
    cx.backend.write_from(offset, len, cx.scratch, &mut source)?;
    Ok(())
}

/// One validated discard / write-zeroes range.
#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// Copies and validates every segment before any is executed, so a bad
/// segment anywhere means nothing is done.
fn read_segments<const N: usize, M: GuestMemory + ?Sized>(
    chain: &DescriptorChain<N>,
    mem: &M,
    payload: u64,
    max_sectors: u32,
    max_segs: u32,
    size: u64,
) -> Result<ArrayVec<Range, MAX_DWZ_SEGMENTS>, Fail> {
    if payload == 0 || !payload.is_multiple_of(DWZ_SEGMENT_LEN as u64) {
        return Err(Fail::IoErr);
    }
    let count = payload / DWZ_SEGMENT_LEN as u64;
    if count > u64::from(max_segs) || count > MAX_DWZ_SEGMENTS as u64 {
        return Err(Fail::IoErr);
    }
    let mut out = ArrayVec::new();
    let mut unsupported = false;
    for i in 0..count {
        let mut raw = [0u8; DWZ_SEGMENT_LEN];
        let at = HEADER_LEN as u64 + i * DWZ_SEGMENT_LEN as u64;
        gather(chain, mem, at, &mut raw)?;
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        if flags & !DWZ_FLAG_UNMAP != 0 {
            unsupported = true;
        }
        if sectors > max_sectors {
            return Err(Fail::IoErr);
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = sector_range(sector, len, size)?;
        out.push(Range { offset, len, unmap: flags & DWZ_FLAG_UNMAP != 0 });
    }
    if unsupported {
        return Err(Fail::Unsupp);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Mutex;
    use crate::testing::{BackendOp, FaultyDisk};
    use crate::virtio::blk::backend::{BackendFeatures, RamDisk};
    use crate::virtio::spec::blk::DWZ_FLAG_UNMAP as FLAG_UNMAP;
    use alloc::sync::Arc;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Guest memory: 64 KiB at 0x1_0000.
    struct Mem(Mutex<Vec<u8>>);
    const BASE: u64 = 0x1_0000;
    impl Mem {
        fn new() -> Self {
            Mem(Mutex::new(vec![0xee; 0x1_0000]))
        }
        fn range(&self, addr: u64, len: usize) -> Result<core::ops::Range<usize>, MemoryError> {
            let err = MemoryError::OutOfBounds { addr, len: len as u64 };
            let start = addr.checked_sub(BASE).ok_or(err)? as usize;
            let end = start.checked_add(len).ok_or(err)?;
            if end <= 0x1_0000 { Ok(start..end) } else { Err(err) }
        }
        fn put(&self, addr: u64, data: &[u8]) {
            self.write(addr, data).unwrap();
        }
        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            let r = self.range(addr, len).unwrap();
            self.0.lock()[r].to_vec()
        }
    }
    impl GuestMemory for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let r = self.range(addr, buf.len())?;
            buf.copy_from_slice(&self.0.lock()[r]);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
            let r = self.range(addr, data.len())?;
            self.0.lock()[r].copy_from_slice(data);
            Ok(())
        }
        fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
            self.range(addr, len as usize).map(|_| ())
        }
    }

    /// Chains are built by hand, in any layout (even ones a pop refuses).
    type Chain = DescriptorChain;

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        RequestHeader::new(RequestType::from_raw(kind), sector).to_bytes()
    }

    fn limits(size: u64) -> Limits {
        Limits {
            size,
            seg_max: Some(8),
            size_max: Some(64 * 1024),
            read_only: false,
            flush: true,
            discard: Some((64, 4)),
            write_zeroes: Some((64, 4, true)),
        }
    }

    struct Rig {
        mem: Mem,
        disk: RamDisk,
        limits: Limits,
        scratch: Vec<u8>,
        writethrough: bool,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                mem: Mem::new(),
                disk: RamDisk::new(64 * 1024),
                limits: limits(64 * 1024),
                // Small on purpose: multi-pass copies get exercised.
                scratch: vec![0; 1024],
                writethrough: false,
            }
        }
        fn run(&mut self, chain: &Chain) -> Completion {
            self.run_on(chain, None)
        }
        fn run_on(&mut self, chain: &Chain, backend: Option<&dyn BlockBackend>) -> Completion {
            let id = *b"vmio-test-disk\0\0\0\0\0\0";
            let mut cx = Context {
                mem: &self.mem,
                backend: backend.unwrap_or(&self.disk),
                limits: &self.limits,
                id: &id,
                writethrough: self.writethrough,
                scratch: &mut self.scratch,
            };
            process(chain, &mut cx)
        }
    }

    /// Header at 0x1000, data at 0x2000.., status at 0x8000.
    fn simple(rig: &Rig, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> Chain {
        rig.mem.put(0x1_1000, &header(kind, sector));
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, false);
        if data_len > 0 {
            c.push_unchecked(0x1_2000, data_len, data_writable);
        }
        c.push_unchecked(0x1_8000, 1, true);
        c
    }

    fn status(rig: &Rig) -> u8 {
        rig.mem.get(0x1_8000, 1)[0]
    }

    #[test]
    fn write_then_read_round_trips() {
        let mut rig = Rig::new();
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        rig.mem.put(0x1_2000, &data);
        let c = simple(&rig, T_OUT, 8, 4096, false);
        assert_eq!(rig.run(&c), Completion { status: Some(S_OK), used_len: 1 });
        assert_eq!(status(&rig), S_OK);
        rig.mem.put(0x1_2000, &[0; 4096]);
        let c = simple(&rig, T_IN, 8, 4096, true);
        assert_eq!(rig.run(&c), Completion { status: Some(S_OK), used_len: 4097 });
        assert_eq!(rig.mem.get(0x1_2000, 4096), data);
        let mut on_disk = vec![0u8; 4096];
        rig.disk.read_at(8 * 512, &mut on_disk).unwrap();
        assert_eq!(on_disk, data);
    }

    #[test]
    fn any_layout_is_accepted() {
        // Header split 5 + 11 with the second part merged into the data;
        // data split over three descriptors; status merged into the last
        // data descriptor.
        let mut rig = Rig::new();
        let h = header(T_OUT, 3);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 13) as u8).collect();
        rig.mem.put(0x1_1000, &h[..5]);
        let mut second = h[5..].to_vec();
        second.extend_from_slice(&data[..100]);
        rig.mem.put(0x1_3000, &second);
        rig.mem.put(0x1_4000, &data[100..700]);
        rig.mem.put(0x1_5000, &data[700..]);
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 5, false);
        c.push_unchecked(0x1_3000, second.len() as u32, false);
        c.push_unchecked(0x1_4000, 600, false);
        c.push_unchecked(0x1_5000, 324, false);
        c.push_unchecked(0x1_6000, 0, true); // empty descriptors are skipped
        c.push_unchecked(0x1_8000, 1, true);
        assert_eq!(rig.run(&c).status, Some(S_OK));

        // Read it back into an odd split whose last descriptor also holds
        // the status byte.
        rig.mem.put(0x1_1000, &header(T_IN, 3));
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, false);
        c.push_unchecked(0x1_2000, 1000, true);
        c.push_unchecked(0x1_4000, 25, true); // 24 data bytes + status
        let done = rig.run(&c);
        assert_eq!(done, Completion { status: Some(S_OK), used_len: 1025 });
        let mut back = rig.mem.get(0x1_2000, 1000);
        back.extend(rig.mem.get(0x1_4000, 24));
        assert_eq!(back, data);
        assert_eq!(rig.mem.get(0x1_4000 + 24, 1)[0], S_OK);
    }

    #[test]
    fn bad_sizes_and_ranges_are_ioerr_and_touch_nothing() {
        let mut rig = Rig::new();
        rig.disk.write_at(0, &[0x77; 65536]).unwrap();
        let cases = [
            (T_IN, 0, 100),             // not a multiple of 512
            (T_OUT, 0, 513),            // ditto
            (T_IN, 128, 512),           // starts at capacity
            (T_OUT, 127, 1024),         // runs past the end
            (T_OUT, u64::MAX / 2, 512), // sector * 512 overflows
            (T_IN, u64::MAX, 512),      // ditto
        ];
        for (kind, sector, len) in cases {
            rig.mem.put(0x1_2000, &[0x11; 1024]);
            let c = simple(&rig, kind, sector, len, kind == T_IN);
            assert_eq!(
                rig.run(&c),
                Completion { status: Some(S_IOERR), used_len: 1 },
                "{kind} {sector} {len}"
            );
            assert_eq!(rig.mem.get(0x1_2000, 1024), vec![0x11; 1024], "guest data untouched");
        }
        let mut disk = vec![0u8; 65536];
        rig.disk.read_at(0, &mut disk).unwrap();
        assert!(disk.iter().all(|&b| b == 0x77), "disk untouched");
    }

    #[test]
    fn capacity_edge_is_inclusive() {
        let mut rig = Rig::new();
        let c = simple(&rig, T_OUT, 127, 512, false);
        assert_eq!(rig.run(&c).status, Some(S_OK));
        let c = simple(&rig, T_IN, 128, 0, true);
        assert_eq!(rig.run(&c).status, Some(S_OK), "an empty read at the end is in range");
    }

    #[test]
    fn unknown_types_are_unsupp() {
        let mut rig = Rig::new();
        for kind in [2, 3, 5, 7, 9, 10, 14, 0xffff_ffff] {
            let c = simple(&rig, kind, 0, 0, false);
            rig.mem.put(0x1_8000, &[0xff]);
            assert_eq!(
                rig.run(&c),
                Completion { status: Some(S_UNSUPP), used_len: 1 },
                "type {kind}"
            );
            assert_eq!(status(&rig), S_UNSUPP);
        }
        // Known types whose feature was not negotiated are unknown too.
        rig.limits.flush = false;
        rig.limits.discard = None;
        rig.limits.write_zeroes = None;
        for kind in [T_FLUSH, T_DISCARD, T_WRITE_ZEROES] {
            let c = simple(&rig, kind, 0, 0, false);
            assert_eq!(rig.run(&c).status, Some(S_UNSUPP), "type {kind}");
        }
    }

    #[test]
    fn read_only_refuses_every_write_and_writes_nothing() {
        let mut rig = Rig::new();
        rig.limits.read_only = true;
        rig.mem.put(0x1_2000, &[0x42; 512]);
        let c = simple(&rig, T_OUT, 0, 512, false);
        assert_eq!(rig.run(&c).status, Some(S_IOERR));
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            rig.mem.put(0x1_2000, &seg(0, 1, 0));
            let c = simple(&rig, kind, 0, 16, false);
            assert_eq!(rig.run(&c).status, Some(S_IOERR));
        }
        let mut disk = vec![0xffu8; 65536];
        rig.disk.read_at(0, &mut disk).unwrap();
        assert!(disk.iter().all(|&b| b == 0), "nothing reached the disk");
        let c = simple(&rig, T_IN, 0, 512, true);
        assert_eq!(rig.run(&c).status, Some(S_OK), "reads still work");
    }

    #[test]
    fn no_writable_status_byte_means_len_zero_and_no_action() {
        let mut rig = Rig::new();
        rig.mem.put(0x1_1000, &header(T_OUT, 0));
        rig.mem.put(0x1_2000, &[0x99; 512]);
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, false);
        c.push_unchecked(0x1_2000, 512, false);
        assert_eq!(rig.run(&c), Completion { status: None, used_len: 0 });
        let mut disk = vec![0xffu8; 512];
        rig.disk.read_at(0, &mut disk).unwrap();
        assert_eq!(disk, vec![0u8; 512], "nothing written");
        // Only zero-length writable descriptors: same.
        c.push_unchecked(0x1_8000, 0, true);
        assert_eq!(rig.run(&c), Completion { status: None, used_len: 0 });
        // A status byte outside guest memory: same.
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, false);
        c.push_unchecked(0xdead_0000, 1, true);
        assert_eq!(rig.run(&c), Completion { status: None, used_len: 0 });
        // An empty chain.
        assert_eq!(rig.run(&Chain::new()), Completion { status: None, used_len: 0 });
    }

    #[test]
    fn short_header_and_bad_buffers_are_ioerr() {
        let mut rig = Rig::new();
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 8, false);
        c.push_unchecked(0x1_8000, 1, true);
        assert_eq!(rig.run(&c).status, Some(S_IOERR));
        // Header writable instead of readable.
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, true);
        c.push_unchecked(0x1_8000, 1, true);
        assert_eq!(rig.run(&c).status, Some(S_IOERR));
        // Data buffer outside guest memory.
        rig.mem.put(0x1_1000, &header(T_IN, 0));
        let mut c = Chain::new();
        c.push_unchecked(0x1_1000, 16, false);
        c.push_unchecked(0xffff_ffff_ffff_fe00, 512, true);
        c.push_unchecked(0x1_8000, 1, true);
        assert_eq!(rig.run(&c), Completion { status: Some(S_IOERR), used_len: 1 });
    }

    #[test]
    fn segment_and_size_limits_are_enforced() {
        let mut rig = Rig::new();
        rig.mem.put(0x1_1000, &header(T_IN, 0));
        // seg_max 8: 8 data descriptors pass, 9 fail.
        for (n, want) in [(8u64, S_OK), (9, S_IOERR)] {
            let mut c = Chain::new();
            c.push_unchecked(0x1_1000, 16, false);
            for i in 0..n {
                c.push_unchecked(0x1_2000 + i * 512, 512, true);
            }
            c.push_unchecked(0x1_8000, 1, true);
            assert_eq!(rig.run(&c).status, Some(want), "{n} segments");
        }
        // size_max 64 KiB: one descriptor longer fails.
        rig.limits.size_max = Some(1024);
        let c = simple(&rig, T_IN, 0, 1536, true);
        assert_eq!(rig.run(&c).status, Some(S_IOERR));
    }

    #[test]
    fn get_id_writes_twenty_bytes_or_what_fits() {
        let mut rig = Rig::new();
        let c = simple(&rig, T_GET_ID, 0, 20, true);
        assert_eq!(rig.run(&c), Completion { status: Some(S_OK), used_len: 21 });
        assert_eq!(rig.mem.get(0x1_2000, 20), b"vmio-test-disk\0\0\0\0\0\0".to_vec());
        rig.mem.put(0x1_2000, &[0xab; 20]);
        let c = simple(&rig, T_GET_ID, 0, 8, true);
        assert_eq!(rig.run(&c), Completion { status: Some(S_OK), used_len: 9 });
        assert_eq!(rig.mem.get(0x1_2000, 9), b"vmio-tes\xab".to_vec());
    }

    fn seg(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut rig = Rig::new();
        rig.disk.write_at(0, &[0x5a; 65536]).unwrap();
        let zeroed = |rig: &Rig, sector: u64, n: u64| {
            let mut b = vec![0u8; (n * 512) as usize];
            rig.disk.read_at(sector * 512, &mut b).unwrap();
            b.iter().all(|&x| x == 0)
        };
        // Two write-zeroes segments, one with unmap.
        let mut payload = seg(0, 2, 0).to_vec();
        payload.extend(seg(16, 8, FLAG_UNMAP));
        rig.mem.put(0x1_2000, &payload);
        let c = simple(&rig, T_WRITE_ZEROES, 0, 32, false);
        assert_eq!(rig.run(&c).status, Some(S_OK));
        assert!(zeroed(&rig, 0, 2) && zeroed(&rig, 16, 8) && !zeroed(&rig, 2, 1));
        // Discard without unmap.
        rig.mem.put(0x1_2000, &seg(40, 8, 0));
        let c = simple(&rig, T_DISCARD, 0, 16, false);
        assert_eq!(rig.run(&c).status, Some(S_OK));
        assert!(zeroed(&rig, 40, 8));

        // Rejections: each leaves the disk untouched.
        rig.disk.write_at(0, &[0x5a; 65536]).unwrap();
        let bad: [(u32, Vec<u8>, u8); 8] = [
            (T_DISCARD, seg(0, 1, FLAG_UNMAP).to_vec(), S_UNSUPP), // discard + unmap
            (T_WRITE_ZEROES, seg(0, 1, 2).to_vec(), S_UNSUPP),     // unknown flag
            (T_DISCARD, seg(0, 65, 0).to_vec(), S_IOERR),          // > max sectors
            (T_DISCARD, seg(127, 2, 0).to_vec(), S_IOERR),         // past the end
            (T_DISCARD, seg(u64::MAX, 1, 0).to_vec(), S_IOERR),    // overflow
            (T_DISCARD, seg(0, 1, 0)[..12].to_vec(), S_IOERR),     // partial segment
            (T_DISCARD, Vec::new(), S_IOERR),                      // no segment
            (T_DISCARD, [seg(0, 1, 0); 5].concat(), S_IOERR),      // > max segments
        ];
        for (kind, payload, want) in bad {
            rig.mem.put(0x1_2000, &payload);
            let c = simple(&rig, kind, 0, payload.len() as u32, false);
            assert_eq!(rig.run(&c).status, Some(want), "{kind} {payload:?}");
        }
        // A valid segment followed by an invalid one: nothing is done.
        let mut payload = seg(0, 1, 0).to_vec();
        payload.extend(seg(0, 1, 4));
        rig.mem.put(0x1_2000, &payload);
        let c = simple(&rig, T_WRITE_ZEROES, 0, 32, false);
        assert_eq!(rig.run(&c).status, Some(S_UNSUPP));
        assert!(!zeroed(&rig, 0, 1));
    }

    /// A backend whose every operation fails; write-zeroes is not there
    /// at all.
    fn broken() -> FaultyDisk {
        let features = BackendFeatures { flush: true, ..BackendFeatures::default() };
        FaultyDisk::ram(65536).with_features(features).on(|op| match op {
            BackendOp::WriteZeroes { .. } => Err(BackendError::Unsupported),
            _ => Err(BackendError::Io { op: "any", os_error: Some(5) }),
        })
    }

    #[test]
    fn backend_errors_become_ioerr_or_unsupp() {
        let mut rig = Rig::new();
        for (kind, len, writable, want) in [
            (T_IN, 512, true, S_IOERR),
            (T_OUT, 512, false, S_IOERR),
            (T_FLUSH, 0, false, S_IOERR),
            (T_WRITE_ZEROES, 16, false, S_UNSUPP), // the default method
        ] {
            rig.mem.put(0x1_2000, &seg(0, 1, 0));
            let c = simple(&rig, kind, 0, len, writable);
            assert_eq!(
                rig.run_on(&c, Some(&broken())),
                Completion { status: Some(want), used_len: 1 }
            );
        }
    }

    #[test]
    fn writethrough_flushes_after_every_write() {
        let mut rig = Rig::new();
        // Flushes fail once `fail` is set.
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        let flaky = FaultyDisk::ram(65536).on(move |op| match op {
            // Relaxed: set and read on the test's one thread.
            BackendOp::Flush if failing.load(Ordering::Relaxed) => {
                Err(BackendError::Io { op: "flush", os_error: None })
            }
            _ => Ok(()),
        });
        let c = simple(&rig, T_OUT, 0, 512, false);
        assert_eq!(rig.run_on(&c, Some(&flaky)).status, Some(S_OK));
        assert_eq!(flaky.count(BackendOp::Flush), 0, "writeback");
        rig.writethrough = true;
        assert_eq!(rig.run_on(&c, Some(&flaky)).status, Some(S_OK));
        assert_eq!(flaky.count(BackendOp::Flush), 1, "writethrough");
        let c = simple(&rig, T_IN, 0, 512, true);
        assert_eq!(rig.run_on(&c, Some(&flaky)).status, Some(S_OK));
        assert_eq!(flaky.count(BackendOp::Flush), 1, "reads do not flush");
        // A write whose flush fails is not reported as done.
        fail.store(true, Ordering::Relaxed);
        let c = simple(&rig, T_OUT, 0, 512, false);
        assert_eq!(rig.run_on(&c, Some(&flaky)).status, Some(S_IOERR));
    }
}
