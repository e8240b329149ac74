//! Guest physical memory: the only way device code reaches the guest's RAM.
//!
//! Its design notes are on [`GuestMemory`].

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

mod pages;
mod ram;
#[cfg(feature = "vm-memory")]
mod vm_memory;

pub(crate) use pages::ZeroedPages;
pub use ram::{GuestRam, GuestRamError};

/// Why a guest memory access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryError {
    /// Part of `[addr, addr + len)` is not guest RAM.
    OutOfBounds {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// `addr + len` does not fit in 64 bits.
    Overflow {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
    /// The range is guest RAM but spans more than one host mapping, so no
    /// single host pointer covers it ([`GuestMemory::host_ptr`] only).
    NotContiguous {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MemoryError::OutOfBounds { addr, len } => {
                write!(f, "{len} bytes at guest address {addr:#x} are not guest RAM")
            }
            MemoryError::Overflow { addr, len } => {
                write!(f, "{len} bytes at guest address {addr:#x} overflow the address space")
            }
            MemoryError::NotContiguous { addr, len } => {
                write!(f, "{len} bytes at guest address {addr:#x} span several host mappings")
            }
        }
    }
}
impl core::error::Error for MemoryError {}

/// Guest physical memory: the only way device code reaches the guest's RAM.
///
/// [`GuestMemory`] is the narrow interface every virtio component goes
/// through. Each access names a guest-physical address and a length; the
/// implementation checks the whole range (including `addr + len` overflow)
/// before touching a byte and answers with a [`MemoryError`] otherwise, so a
/// guest that points a descriptor at the top of the address space, past the
/// end of RAM or into a hole between regions gets an error value, never a
/// host access outside guest memory.
///
/// # Aliasing
///
/// Guest memory is shared with the guest, which writes it concurrently from
/// its own vCPUs (in a VMM, other threads of the same process) while the
/// device reads it. Rust references (`&[u8]`, `&mut [u8]`) promise that
/// nobody else mutates the bytes for their lifetime, a promise that cannot be
/// kept here, so vmio never creates one into guest memory, and never keeps a
/// pointer into it from one call to the next. What it does instead, in
/// [`GuestRam`] and in the `vm-memory` implementation alike:
///
/// - small copies (up to 16 bytes: descriptors, request headers, used
///   elements, status bytes) are volatile loads and stores, so the compiler
///   can neither re-read guest memory after the copy was validated nor merge
///   or invent accesses;
/// - larger copies (data buffers) are one `ptr::copy_nonoverlapping` between
///   guest memory and a host-owned buffer, the contents of which are never
///   trusted;
/// - the ring index fields that carry the driver/device handshake
///   (`avail.idx`, `used.idx`, the event indices) go through
///   [`GuestMemory::load_u16`] and [`GuestMemory::store_u16`], real atomic
///   accesses with the orderings the virtio memory model needs.
///
/// The device validates what it copied, never the guest's bytes in place, so
/// a guest that rewrites a descriptor while the device parses it only changes
/// which (validated) value the device sees, never whether it is checked (no
/// time-of-check/time-of-use window). A copy that races with a guest write
/// may see any mix of old and new bytes; that is the guest's problem, never
/// the host's.
///
/// Bounds-checked access to guest physical memory.
///
/// Implementations must check every access in full and must tolerate the
/// guest writing the same bytes concurrently (see the [module
/// docs](GuestMemory#aliasing)). All multi-byte helpers are little-endian, as virtio
/// 1.x is.
///
/// vmio implements it for [`GuestRam`] and, with the `vm-memory` feature,
/// for rust-vmm's `vm_memory::GuestMemoryMmap`, so a VMM built on rust-vmm
/// passes its `Arc<GuestMemoryMmap>` to the devices as
/// `Arc<dyn GuestMemory>`.
pub trait GuestMemory: Send + Sync {
    /// Copies `buf.len()` bytes starting at guest address `addr` into `buf`.
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] or [`MemoryError::Overflow`] when any part
    /// of the range is not guest RAM; `buf` is then unspecified.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Copies `data` to guest memory starting at guest address `addr`.
    ///
    /// # Errors
    /// As for [`read`](Self::read); nothing is written when the range is not
    /// entirely guest RAM.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError>;

    /// Checks that `[addr, addr + len)` is guest RAM without touching it.
    ///
    /// # Errors
    /// As for [`read`](Self::read).
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError>;

    /// Loads the `u16` at `addr` with `order` (`Relaxed`, `Acquire` or
    /// `SeqCst`). Used for the ring indices shared with the driver.
    ///
    /// The default copies and then issues an acquire fence when asked;
    /// [`GuestRam`] does a real atomic load.
    ///
    /// # Errors
    /// As for [`read`](Self::read).
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemoryError> {
        let mut b = [0; 2];
        self.read(addr, &mut b)?;
        if order != Ordering::Relaxed {
            // Later reads (ring entries, descriptors) must not be satisfied
            // before the index that announced them.
            fence(Ordering::Acquire);
        }
        Ok(u16::from_le_bytes(b))
    }

    /// Stores `value` at `addr` with `order` (`Relaxed`, `Release` or
    /// `SeqCst`).
    ///
    /// The default issues a release fence when asked and then copies;
    /// [`GuestRam`] does a real atomic store.
    ///
    /// # Errors
    /// As for [`write`](Self::write).
    fn store_u16(&self, addr: u64, value: u16, order: Ordering) -> Result<(), MemoryError> {
        if order != Ordering::Relaxed {
            // Everything written before (used elements, data) must be visible
            // no later than the index that publishes it.
            fence(Ordering::Release);
        }
        self.write(addr, &value.to_le_bytes())
    }

    /// A host pointer to `len` bytes of guest memory at `addr`, for VMMs that
    /// hand guest buffers straight to the host kernel (positional I/O into
    /// guest RAM).
    ///
    /// The pointer stays valid as long as `self` lives. The guest may write
    /// the bytes at any time: never build a Rust reference to them that
    /// outlives one copy, and never trust what was read there without
    /// validating a private copy. The default refuses.
    ///
    /// # Errors
    /// [`MemoryError::NotContiguous`] when no single host mapping covers the
    /// range (always, for the default), or a bounds error.
    fn host_ptr(&self, addr: u64, len: u64) -> Result<NonNull<u8>, MemoryError> {
        self.check(addr, len)?;
        Err(MemoryError::NotContiguous { addr, len })
    }

    /// Reads a little-endian `u16`.
    ///
    /// # Errors
    /// As for [`read`](Self::read).
    fn read_u16(&self, addr: u64) -> Result<u16, MemoryError> {
        let mut b = [0; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    ///
    /// # Errors
    /// As for [`read`](Self::read).
    fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    ///
    /// # Errors
    /// As for [`read`](Self::read).
    fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u16`.
    ///
    /// # Errors
    /// As for [`write`](Self::write).
    fn write_u16(&self, addr: u64, value: u16) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Writes a little-endian `u32`.
    ///
    /// # Errors
    /// As for [`write`](Self::write).
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    ///
    /// # Errors
    /// As for [`write`](Self::write).
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Sets `len` bytes at `addr` to `byte`.
    ///
    /// # Errors
    /// As for [`write`](Self::write); the range is checked before anything is
    /// written.
    fn fill(&self, addr: u64, len: u64, byte: u8) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        let chunk = [byte; 256];
        let mut done = 0u64;
        while done < len {
            // `len - done` < 2^64 and the chunk is 256 bytes: the cast is exact.
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write(addr + done, &chunk[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}
