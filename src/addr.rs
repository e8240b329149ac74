//! Address spaces, inclusive address ranges and access widths.
//!
//! Every bus speaks `u64` addresses internally — the value a vCPU exit hands
//! over — and each [`AddressSpace`] bounds them: MMIO spans the whole 64-bit
//! guest-physical space, port I/O 16 bits, system registers 32-bit encodings.
//! Ranges are inclusive (`start..=last`) so a device can own the very top
//! address of its space.

use core::fmt;
use core::marker::PhantomData;

use memory_addr::{AddrRange, MemoryAddr};

/// One kind of guest address space: what its addresses are and where it ends.
pub trait AddressSpace: Send + Sync + 'static {
    /// Name used in diagnostics (`"mmio"`, `"pio"`, `"sysreg"`).
    const NAME: &'static str;
    /// The highest valid address of the space.
    const LAST: u64;
}

/// Memory-mapped I/O: 64-bit guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mmio;
/// x86 port I/O: 16-bit port numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pio;
/// System registers (Arm `MRS`/`MSR`, RISC-V CSRs, x86 MSRs): 32-bit encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysReg;

impl AddressSpace for Mmio {
    const NAME: &'static str = "mmio";
    const LAST: u64 = u64::MAX;
}
impl AddressSpace for Pio {
    const NAME: &'static str = "pio";
    const LAST: u64 = u16::MAX as u64;
}
impl AddressSpace for SysReg {
    const NAME: &'static str = "sysreg";
    const LAST: u64 = u32::MAX as u64;
}

/// The size of one access: 1, 2, 4 or 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Width {
    /// One byte.
    U8 = 1,
    /// Two bytes.
    U16 = 2,
    /// Four bytes.
    U32 = 4,
    /// Eight bytes.
    U64 = 8,
}

impl Width {
    /// The access size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        self as u64
    }

    /// A mask with the access's low `8 * bytes` bits set.
    #[inline]
    pub const fn mask(self) -> u64 {
        match self {
            Width::U8 => 0xff,
            Width::U16 => 0xffff,
            Width::U32 => 0xffff_ffff,
            Width::U64 => u64::MAX,
        }
    }

    /// The width of `bytes` bytes.
    ///
    /// # Errors
    /// [`WidthError`] unless `bytes` is 1, 2, 4 or 8.
    #[inline]
    pub const fn from_bytes(bytes: u64) -> Result<Self, WidthError> {
        match bytes {
            1 => Ok(Width::U8),
            2 => Ok(Width::U16),
            4 => Ok(Width::U32),
            8 => Ok(Width::U64),
            other => Err(WidthError(other)),
        }
    }
}

macro_rules! width_from {
    ($($t:ty),*) => {$(
        impl TryFrom<$t> for Width {
            type Error = WidthError;
            #[inline]
            fn try_from(bytes: $t) -> Result<Self, WidthError> {
                Width::from_bytes(bytes as u64)
            }
        }
    )*};
}
width_from!(u8, u16, u32, u64, usize);

/// A non-empty, inclusive range `start..=last` inside address space `S`.
///
/// Construction validates the range against the space, so a bus never sees a
/// zero-length range or one that wraps past the top.
pub struct IoRange<S> {
    start: u64,
    last: u64,
    space: PhantomData<fn() -> S>,
}

impl<S: AddressSpace> IoRange<S> {
    /// The range of `len` bytes starting at `start`.
    ///
    /// # Errors
    /// [`RangeError::Empty`] for `len == 0`, [`RangeError::Wraps`] when the
    /// range would run past the top of the space.
    pub const fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        // `len - 1` cannot underflow: `len != 0`.
        match start.checked_add(len - 1) {
            Some(last) if last <= S::LAST => Ok(IoRange { start, last, space: PhantomData }),
            _ => Err(RangeError::Wraps { start, len, top: S::LAST }),
        }
    }

    /// The inclusive range `start..=last`.
    ///
    /// # Errors
    /// [`RangeError::Inverted`] when `last < start`, [`RangeError::Wraps`]
    /// when `last` is beyond the top of the space.
    pub const fn inclusive(start: u64, last: u64) -> Result<Self, RangeError> {
        if last < start {
            return Err(RangeError::Inverted { start, last });
        }
        if last > S::LAST {
            // `last - start + 1` can only overflow for a full 64-bit span,
            // which `last > S::LAST` excludes for every space.
            return Err(RangeError::Wraps { start, len: last - start + 1, top: S::LAST });
        }
        Ok(IoRange { start, last, space: PhantomData })
    }

    /// First address.
    #[inline]
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Last address (inclusive).
    #[inline]
    pub const fn last(&self) -> u64 {
        self.last
    }

    /// Length in bytes, `None` only for the full 2^64-byte MMIO space.
    #[inline]
    pub const fn len(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }

    /// Always false: an `IoRange` is never empty. Present for API symmetry.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Whether `addr` lies inside the range.
    #[inline]
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.last
    }

    /// Whether the two ranges share at least one address.
    #[inline]
    pub const fn overlaps(&self, other: &Self) -> bool {
        self.start <= other.last && other.start <= self.last
    }
}

// Manual impls: derives would demand `S: Clone` etc. of the marker type.
impl<S> Clone for IoRange<S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for IoRange<S> {}
impl<S> PartialEq for IoRange<S> {
    fn eq(&self, other: &Self) -> bool {
        self.start == other.start && self.last == other.last
    }
}
impl<S> Eq for IoRange<S> {}
impl<S: AddressSpace> fmt::Debug for IoRange<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{:#x}..={:#x}]", S::NAME, self.start, self.last)
    }
}
impl<S: AddressSpace> fmt::Display for IoRange<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl<A: MemoryAddr> TryFrom<AddrRange<A>> for IoRange<Mmio> {
    type Error = RangeError;

    /// Converts a half-open memory_addr range (`start..end`), for instance
    /// an `AddrRange` of the ArceOS ecosystem's guest-physical address type.
    fn try_from(range: AddrRange<A>) -> Result<Self, RangeError> {
        let start = range.start.into() as u64;
        let end = range.end.into() as u64;
        // `AddrRange` guarantees `start <= end`; saturate anyway for hand-built ones.
        IoRange::new(start, end.saturating_sub(start))
    }
}

impl<S: AddressSpace> TryFrom<core::ops::Range<u64>> for IoRange<S> {
    type Error = RangeError;

    fn try_from(range: core::ops::Range<u64>) -> Result<Self, RangeError> {
        if range.end < range.start {
            return Err(RangeError::Inverted { start: range.start, last: range.end });
        }
        IoRange::new(range.start, range.end - range.start)
    }
}

impl<S: AddressSpace> TryFrom<core::ops::RangeInclusive<u64>> for IoRange<S> {
    type Error = RangeError;

    fn try_from(range: core::ops::RangeInclusive<u64>) -> Result<Self, RangeError> {
        IoRange::inclusive(*range.start(), *range.end())
    }
}

/// An access width that is not 1, 2, 4 or 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidthError(pub u64);

impl fmt::Display for WidthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid access width {} (must be 1, 2, 4 or 8 bytes)", self.0)
    }
}
impl core::error::Error for WidthError {}

/// A range that cannot exist in its address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RangeError {
    /// The range has zero length.
    Empty {
        /// Where it would have started.
        start: u64,
    },
    /// The range runs past the top address of its space.
    Wraps {
        /// First address.
        start: u64,
        /// Requested length.
        len: u64,
        /// The top address of the space.
        top: u64,
    },
    /// An inclusive range whose last address lies before its start.
    Inverted {
        /// First address.
        start: u64,
        /// Last address.
        last: u64,
    },
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RangeError::Empty { start } => write!(f, "zero-length range at {start:#x}"),
            RangeError::Wraps { start, len, top } => write!(
                f,
                "range of {len:#x} bytes at {start:#x} runs past the top of the space ({top:#x})"
            ),
            RangeError::Inverted { start, last } => {
                write!(f, "range end {last:#x} lies before its start {start:#x}")
            }
        }
    }
}
impl core::error::Error for RangeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_accepts_only_power_of_two_up_to_eight() {
        for (n, w) in [(1u64, Width::U8), (2, Width::U16), (4, Width::U32), (8, Width::U64)] {
            assert_eq!(Width::from_bytes(n), Ok(w));
            assert_eq!(w.bytes(), n);
        }
        for bad in [0u64, 3, 5, 6, 7, 9, 16, u64::MAX] {
            assert_eq!(Width::from_bytes(bad), Err(WidthError(bad)));
        }
        assert_eq!(Width::try_from(3u8), Err(WidthError(3)));
        assert_eq!(Width::U16.mask(), 0xffff);
    }

    #[test]
    fn range_edges() {
        assert_eq!(IoRange::<Mmio>::new(5, 0), Err(RangeError::Empty { start: 5 }));
        let top = IoRange::<Mmio>::new(u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(top.last(), u64::MAX);
        assert_eq!(top.len(), Some(0x1000));
        assert!(matches!(
            IoRange::<Mmio>::new(u64::MAX - 0xfff, 0x1001),
            Err(RangeError::Wraps { .. })
        ));
        let whole = IoRange::<Mmio>::inclusive(0, u64::MAX).unwrap();
        assert_eq!(whole.len(), None);
        assert!(IoRange::<Pio>::new(0xfff0, 0x10).is_ok());
        assert!(matches!(
            IoRange::<Pio>::new(0xfff0, 0x11),
            Err(RangeError::Wraps { top: 0xffff, .. })
        ));
        assert!(matches!(IoRange::<SysReg>::inclusive(0, 1 << 32), Err(RangeError::Wraps { .. })));
        assert!(matches!(IoRange::<Pio>::inclusive(3, 2), Err(RangeError::Inverted { .. })));
        let r = IoRange::<Pio>::new(0, 1).unwrap();
        assert!(r.contains(0) && !r.contains(1));
    }

    memory_addr::def_usize_addr! {
        /// A guest-physical address type of the kind ArceOS hypervisors
        /// define (axaddrspace's `GuestPhysAddr`).
        type GuestPhysAddr;
    }

    #[test]
    fn addr_range_converts() {
        let r: AddrRange<memory_addr::PhysAddr> =
            AddrRange::from_start_size(memory_addr::PhysAddr::from_usize(0x9000_0000), 0x200);
        let io = IoRange::<Mmio>::try_from(r).unwrap();
        assert_eq!((io.start(), io.last()), (0x9000_0000, 0x9000_01ff));
        let empty: AddrRange<usize> = AddrRange::new(0x10, 0x10);
        assert!(IoRange::<Mmio>::try_from(empty).is_err());
        let std_range = IoRange::<Pio>::try_from(0x3f8..0x400).unwrap();
        assert_eq!(std_range.len(), Some(8));
    }
}
