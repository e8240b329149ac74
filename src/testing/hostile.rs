//! Builders for every malformed ring a hostile driver can hand a device,
//! each with the outcome a correct device must show.

use super::queue::{DriverError, GuestQueue, write_desc_at};
use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::DEFAULT_SEGMENTS;
use crate::virtio::spec::ring::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::virtio::{ChainError, QueueError};

const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;

/// One way to break the split-queue rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hostile {
    /// `next` names a descriptor past the table.
    NextOutOfRange,
    /// Two descriptors chained to each other.
    Loop,
    /// A descriptor chained to itself.
    SelfLoop,
    /// A zero-length buffer in the chain.
    ZeroLength,
    /// A 4 GiB − 1 buffer (past the end of any small guest RAM).
    HugeLength,
    /// A buffer whose last byte is one past the end of guest RAM.
    PastEndOfRam,
    /// A buffer whose `addr + len` overflows 64 bits.
    AddressOverflow,
    /// A readable buffer after a writable one.
    ReadableAfterWritable,
    /// An indirect descriptor without VIRTIO_F_INDIRECT_DESC.
    IndirectNotNegotiated,
    /// INDIRECT and NEXT on one descriptor.
    IndirectWithNext,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect table of 24 bytes.
    IndirectLenNotMultiple,
    /// An indirect table of 0 bytes.
    IndirectLenZero,
    /// An indirect table with more entries than the scatter-gather list
    /// holds.
    IndirectTooManySegments,
    /// A loop inside an indirect table.
    IndirectLoop,
    /// `next` past the end of an indirect table.
    IndirectNextOutOfRange,
    /// An indirect table running past the end of guest RAM.
    IndirectTableOutsideRam,
    /// `avail.idx` jumps more than the queue size ahead.
    AvailIndexJump,
    /// `avail.idx` goes backwards.
    AvailIndexBackwards,
    /// An available ring entry past the descriptor table.
    HeadOutOfRange,
    /// The same head made available twice while in flight.
    HeadInFlight,
}

/// What a correct device does with a [`Hostile`] ring, popping everything
/// without pushing in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The chain at `head` is rejected with `error`; the device returns it
    /// with length 0 and the queue goes on.
    Rejected {
        /// The chain's head.
        head: u16,
        /// The error `pop` reports.
        error: ChainError,
    },
    /// The queue stops with this error (after `good_first` well-formed
    /// chains popped normally); the device reports DEVICE_NEEDS_RESET.
    Broken {
        /// Well-formed chains that pop before the error.
        good_first: u16,
        /// The error `pop` reports.
        error: QueueError,
    },
}

/// Where a [`Hostile`] builder may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostileEnv {
    /// 16-byte aligned guest address of 8 KiB of guest RAM for buffers and
    /// indirect tables.
    pub scratch: u64,
    /// One past the last byte of guest RAM (which must be below 4 GiB).
    pub ram_end: u64,
}

impl Hostile {
    /// Every case.
    pub const ALL: &'static [Hostile] = &[
        Hostile::NextOutOfRange,
        Hostile::Loop,
        Hostile::SelfLoop,
        Hostile::ZeroLength,
        Hostile::HugeLength,
        Hostile::PastEndOfRam,
        Hostile::AddressOverflow,
        Hostile::ReadableAfterWritable,
        Hostile::IndirectNotNegotiated,
        Hostile::IndirectWithNext,
        Hostile::NestedIndirect,
        Hostile::IndirectLenNotMultiple,
        Hostile::IndirectLenZero,
        Hostile::IndirectTooManySegments,
        Hostile::IndirectLoop,
        Hostile::IndirectNextOutOfRange,
        Hostile::IndirectTableOutsideRam,
        Hostile::AvailIndexJump,
        Hostile::AvailIndexBackwards,
        Hostile::HeadOutOfRange,
        Hostile::HeadInFlight,
    ];

    /// Whether the case needs VIRTIO_F_INDIRECT_DESC negotiated (`true`
    /// for every case except [`Hostile::IndirectNotNegotiated`]).
    pub fn needs_indirect(self) -> bool {
        self != Hostile::IndirectNotNegotiated
    }

    /// Writes the malformed ring into `q` (queue size ≥ 4; the device must
    /// have popped everything made available before) and publishes it.
    ///
    /// # Errors
    /// A [`DriverError`] if `q` has too few free descriptors or the memory
    /// is not where `env` says.
    pub fn build<M: GuestMemory + ?Sized>(
        self,
        mem: &M,
        q: &mut GuestQueue,
        env: HostileEnv,
    ) -> Result<Expect, DriverError> {
        let s = env.scratch;
        let table = s + 0x1000;
        let size = q.config().size;
        let rejected = |head, error| Ok(Expect::Rejected { head, error });
        let broken = |good_first, error| Ok(Expect::Broken { good_first, error });
        // Cases that only touch the available ring.
        match self {
            Hostile::AvailIndexJump | Hostile::AvailIndexBackwards => {
                let cur = q.avail_idx();
                let idx = if self == Hostile::AvailIndexJump {
                    cur.wrapping_add(size).wrapping_add(1)
                } else {
                    cur.wrapping_sub(1)
                };
                q.set_avail_idx(mem, idx)?;
                return broken(0, QueueError::AvailIndexJump { next_avail: cur, avail_idx: idx });
            }
            Hostile::HeadOutOfRange => {
                q.put_avail(mem, size)?;
                q.publish(mem)?;
                return broken(0, QueueError::HeadOutOfRange { head: size });
            }
            Hostile::HeadInFlight => {
                let idx = q.reserve(1)?;
                q.write_desc(mem, idx[0], s, 16, WRITE, 0)?;
                q.put_avail(mem, idx[0])?;
                q.put_avail(mem, idx[0])?;
                q.publish(mem)?;
                return broken(1, QueueError::HeadInFlight { head: idx[0] });
            }
            _ => {}
        }
        let (n, error) = match self {
            Hostile::NextOutOfRange => {
                (1, ChainError::NextOutOfRange { next: size, table_len: size.into() })
            }
            Hostile::Loop | Hostile::SelfLoop | Hostile::IndirectLoop => (2, ChainError::TooLong),
            Hostile::ZeroLength => (2, ChainError::ZeroLength),
            Hostile::HugeLength => (
                1,
                ChainError::BufferOutOfMemory(MemoryError::OutOfBounds {
                    addr: s,
                    len: u32::MAX.into(),
                }),
            ),
            Hostile::PastEndOfRam => (
                1,
                ChainError::BufferOutOfMemory(MemoryError::OutOfBounds {
                    addr: env.ram_end - 15,
                    len: 16,
                }),
            ),
            Hostile::AddressOverflow => (
                1,
                ChainError::BufferOutOfMemory(MemoryError::Overflow {
                    addr: u64::MAX - 7,
                    len: 16,
                }),
            ),
            Hostile::ReadableAfterWritable => (2, ChainError::ReadableAfterWritable),
            Hostile::IndirectNotNegotiated => (1, ChainError::IndirectNotNegotiated),
            Hostile::IndirectWithNext => (2, ChainError::IndirectWithNext),
            Hostile::NestedIndirect => (1, ChainError::NestedIndirect),
            Hostile::IndirectLenNotMultiple => (1, ChainError::IndirectTableLength(24)),
            Hostile::IndirectLenZero => (1, ChainError::IndirectTableLength(0)),
            Hostile::IndirectTooManySegments => {
                (1, ChainError::TooManySegments { capacity: DEFAULT_SEGMENTS })
            }
            Hostile::IndirectNextOutOfRange => {
                (1, ChainError::NextOutOfRange { next: 2, table_len: 2 })
            }
            Hostile::IndirectTableOutsideRam => (
                1,
                ChainError::BufferOutOfMemory(MemoryError::OutOfBounds {
                    addr: env.ram_end - 16,
                    len: 32,
                }),
            ),
            Hostile::AvailIndexJump
            | Hostile::AvailIndexBackwards
            | Hostile::HeadOutOfRange
            | Hostile::HeadInFlight => unreachable!("handled above"),
        };
        let n = if self == Hostile::SelfLoop { 1 } else { n };
        let idx = q.reserve(n)?;
        let d =
            |i: usize, addr, len, flags, next| q.write_desc(mem, idx[i], addr, len, flags, next);
        let t =
            |i: u16, addr, len, flags, next| write_desc_at(mem, table, i, addr, len, flags, next);
        match self {
            Hostile::NextOutOfRange => d(0, s, 16, NEXT, size)?,
            Hostile::Loop => {
                d(0, s, 16, NEXT, idx[1])?;
                d(1, s + 16, 16, NEXT, idx[0])?;
            }
            Hostile::SelfLoop => d(0, s, 16, NEXT, idx[0])?,
            Hostile::ZeroLength => {
                d(0, s, 16, NEXT, idx[1])?;
                d(1, s + 16, 0, WRITE, 0)?;
            }
            Hostile::HugeLength => d(0, s, u32::MAX, 0, 0)?,
            Hostile::PastEndOfRam => d(0, env.ram_end - 15, 16, WRITE, 0)?,
            Hostile::AddressOverflow => d(0, u64::MAX - 7, 16, WRITE, 0)?,
            Hostile::ReadableAfterWritable => {
                d(0, s, 16, WRITE | NEXT, idx[1])?;
                d(1, s + 16, 16, 0, 0)?;
            }
            Hostile::IndirectNotNegotiated => {
                t(0, s, 16, 0, 0)?;
                d(0, table, 16, INDIRECT, 0)?;
            }
            Hostile::IndirectWithNext => {
                t(0, s, 16, 0, 0)?;
                t(1, s + 16, 16, WRITE, 0)?;
                d(0, table, 32, INDIRECT | NEXT, idx[1])?;
                d(1, s + 32, 16, WRITE, 0)?;
            }
            Hostile::NestedIndirect => {
                t(0, s, 16, NEXT, 1)?;
                t(1, table + 0x100, 16, INDIRECT, 0)?;
                write_desc_at(mem, table + 0x100, 0, s + 16, 16, WRITE, 0)?;
                d(0, table, 32, INDIRECT, 0)?;
            }
            Hostile::IndirectLenNotMultiple => {
                t(0, s, 16, 0, 0)?;
                d(0, table, 24, INDIRECT, 0)?;
            }
            Hostile::IndirectLenZero => d(0, table, 0, INDIRECT, 0)?,
            Hostile::IndirectTooManySegments => {
                let entries = DEFAULT_SEGMENTS as u16 + 1;
                for i in 0..entries {
                    let last = i + 1 == entries;
                    t(i, s + u64::from(i), 1, if last { WRITE } else { WRITE | NEXT }, i + 1)?;
                }
                d(0, table, u32::from(entries) * 16, INDIRECT, 0)?;
            }
            Hostile::IndirectLoop => {
                t(0, s, 16, NEXT, 1)?;
                t(1, s + 16, 16, NEXT, 0)?;
                d(0, table, 32, INDIRECT, 0)?;
                // The second reserved descriptor is unused but returned with
                // the head.
            }
            Hostile::IndirectNextOutOfRange => {
                t(0, s, 16, NEXT, 2)?;
                t(1, s + 16, 16, 0, 0)?;
                d(0, table, 32, INDIRECT, 0)?;
            }
            Hostile::IndirectTableOutsideRam => d(0, env.ram_end - 16, 32, INDIRECT, 0)?,
            Hostile::AvailIndexJump
            | Hostile::AvailIndexBackwards
            | Hostile::HeadOutOfRange
            | Hostile::HeadInFlight => unreachable!("handled above"),
        }
        q.put_avail(mem, idx[0])?;
        q.publish(mem)?;
        rejected(idx[0], error)
    }
}
