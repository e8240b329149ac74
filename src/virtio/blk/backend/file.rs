//! [`FileDisk`]: a disk stored in a host file, with positional I/O.

use core::sync::atomic::{AtomicBool, Ordering};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{BackendError, BackendFeatures, BlockBackend, SECTOR_SIZE, check_range};

/// Zeroes written per call when a range cannot be punched out.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// A disk stored in a host file (or block device), accessed with
/// positional reads and writes so queues never share a file offset.
///
/// `flush` is `sync_data`. Discard and write-zeroes-with-unmap punch a
/// hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) on Linux; where the OS or
/// the file system cannot, the range is overwritten with zeroes instead,
/// which gives the same contents without releasing space.
///
/// The disk size is the file's length when opened, rounded down to whole
/// sectors; a trailing partial sector is never touched.
///
/// # Example
/// ```
/// use vmio::virtio::blk::{BlockBackend, FileDisk};
///
/// let path = std::env::temp_dir().join(format!("vmio-doc-{}.img", std::process::id()));
/// std::fs::File::create(&path)?.set_len(1 << 20)?;
/// let disk = FileDisk::open(&path, false)?;
/// disk.write_at(512, b"persisted")?;
/// disk.flush()?;
/// assert_eq!(disk.size(), 1 << 20);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    read_only: bool,
    /// Cleared the first time the file system refuses to punch a hole, so
    /// later discards go straight to writing zeroes. Relaxed: it is only
    /// a hint, and either path leaves the same contents.
    pub(super) punch_hole: AtomicBool,
}

impl FileDisk {
    /// Opens the file at `path`, read-only or read-write.
    ///
    /// # Errors
    /// Whatever opening the file or reading its length returns.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        FileDisk::from_file(file, read_only)
    }

    /// Uses an already open file. `read_only` must be set if the file was
    /// not opened for writing.
    ///
    /// # Errors
    /// Whatever reading the file's length returns.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileDisk {
            file,
            size: len - len % SECTOR_SIZE,
            read_only,
            punch_hole: AtomicBool::new(cfg!(target_os = "linux")),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), BackendError> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROES[..n], offset)
                .map_err(|e| BackendError::io("write zeroes", &e))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Deallocates a checked range, or zeroes it where that is impossible.
    fn punch(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        if self.punch_hole.load(Ordering::Relaxed) {
            match punch_hole(&self.file, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => self.punch_hole.store(false, Ordering::Relaxed),
                Err(e) => return Err(BackendError::io("punch hole", &e)),
            }
        }
        self.write_zero_bytes(offset, len)
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: frees the blocks, keeps the file
/// length, and later reads of the range return zeroes.
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `fallocate` takes a file descriptor and plain integers and
    // touches no memory of ours; the descriptor stays open because `file`
    // is borrowed for the duration of the call.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Errors meaning "this file (system) cannot punch holes", as opposed to
/// an I/O failure.
#[cfg(target_os = "linux")]
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV))
}

impl BlockBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> BackendFeatures {
        BackendFeatures {
            read_only: self.read_only,
            flush: true,
            discard: !self.read_only,
            write_zeroes: !self.read_only,
            write_zeroes_unmap: !self.read_only,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(|e| BackendError::io("read", &e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.check_write(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| BackendError::io("write", &e))
    }

    fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| BackendError::io("flush", &e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        self.punch(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        if unmap { self.punch(offset, len) } else { self.write_zero_bytes(offset, len) }
    }
}
