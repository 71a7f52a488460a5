//! The host side of a virtio-blk disk: a raw image file or a block device, read and written
//! with positioned I/O (`pread`/`pwrite`), synchronously, on the caller's thread.
//!
//! With `direct` the file is opened with `O_DIRECT`: the page cache is bypassed, and every
//! offset, length and buffer address must be aligned to the device's logical block size.
//! [`DIRECT_ALIGN`] (4 KiB) is used for all three, which covers 512-byte and 4 KiB devices;
//! the device advertises it as its block size so that the Linux driver only sends aligned
//! requests, and refuses the others.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Size of a virtio-blk sector: requests count in these whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Alignment of offsets, lengths and buffers with `O_DIRECT`.
pub const DIRECT_ALIGN: u64 = 4096;

/// Why a disk could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file does not exist.
    #[error("disk image {} does not exist", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// Writing was asked for, but the file (or its file system) is read-only.
    #[error("disk image {} is read-only (use readonly=on)", path.display())]
    ReadOnly {
        /// The path given.
        path: PathBuf,
    },
    /// Any other failure to open or size the file.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `O_DIRECT` was asked for and the file system refuses it.
    #[error("disk image {} cannot be opened with direct=on (O_DIRECT refused)", path.display())]
    DirectUnsupported {
        /// The path given.
        path: PathBuf,
    },
}

/// How to open a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Image file or block device.
    pub path: PathBuf,
    /// Open read-only; the guest sees a read-only disk.
    pub readonly: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    options: DiskOptions,
    /// Bytes the guest may address: the file size rounded down to whole blocks.
    capacity: u64,
}

/// How a hole-punching or zeroing call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeOutcome {
    /// The host did it with `fallocate`.
    Done,
    /// The file system does not support the `fallocate` mode.
    Unsupported,
}

fn open_error(path: &Path, options: &DiskOptions, source: io::Error) -> DiskError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::ENOENT) => DiskError::NotFound { path },
        Some(libc::EROFS) if !options.readonly => DiskError::ReadOnly { path },
        Some(libc::EINVAL) if options.direct => DiskError::DirectUnsupported { path },
        _ => DiskError::Open { path, source },
    }
}

impl Disk {
    /// Opens `options.path` as asked; the size is taken once, now.
    pub fn open(options: DiskOptions) -> Result<Disk, DiskError> {
        let path = options.path.clone();
        let mut open = OpenOptions::new();
        open.read(true).write(!options.readonly);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = match open.open(&path) {
            Ok(file) => file,
            // A read-only file opened for writing: tell apart from a plain read failure.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES)) && !options.readonly => {
                return Err(if OpenOptions::new().read(true).open(&path).is_ok() {
                    DiskError::ReadOnly { path }
                } else {
                    DiskError::Open { path, source: e }
                })
            }
            Err(e) => return Err(open_error(&path, &options, e)),
        };
        // `metadata().len()` is 0 for a block device; seeking to the end works for both.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?;
        let block = Self::block_size_for(options.direct);
        Ok(Disk {
            file,
            capacity: size / block * block,
            options,
        })
    }

    fn block_size_for(direct: bool) -> u64 {
        if direct {
            DIRECT_ALIGN
        } else {
            SECTOR_SIZE
        }
    }

    /// The block size the guest is told (and, with `direct`, the alignment required).
    pub fn block_size(&self) -> u64 {
        Self::block_size_for(self.options.direct)
    }

    /// Bytes the guest may address.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How the disk was opened.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// Whether `[offset, offset+len)` is inside the disk and, with `direct`, aligned.
    pub fn range_ok(&self, offset: u64, len: u64) -> bool {
        let aligned = !self.options.direct
            || (offset.is_multiple_of(DIRECT_ALIGN) && len.is_multiple_of(DIRECT_ALIGN));
        aligned
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.capacity)
    }

    /// Reads exactly `buf.len()` bytes at `offset`. With `direct`, `buf` must be aligned (see
    /// [`AlignedBuffer`]). End of file inside the capacity (the file shrank) is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`. With `direct`, `buf` must be aligned.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `[offset, offset+len)`: later reads return zeroes and the host frees the
    /// blocks.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<RangeOutcome> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Makes `[offset, offset+len)` read as zeroes while keeping it allocated.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<RangeOutcome> {
        self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<RangeOutcome> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // This is the disk image file (or block device), not guest memory: the lint keeps
        // hole punching in guest memory to the memory manager, which this is not.
        // SAFETY: fallocate takes a file descriptor we own, plain integers, and no pointers.
        #[allow(clippy::disallowed_methods)]
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(RangeOutcome::Done);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(RangeOutcome::Unsupported),
            _ => Err(e),
        }
    }
}

/// A byte buffer whose start is aligned to [`DIRECT_ALIGN`], as `O_DIRECT` needs: a plain
/// `Vec` over-allocated by one alignment, used from its first aligned byte (no unsafe
/// allocation).
#[derive(Debug)]
pub struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let align = DIRECT_ALIGN as usize;
        let storage = vec![0u8; len + align];
        let address = storage.as_ptr() as usize;
        let start = (align - address % align) % align;
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }

    /// Its first `len` bytes (at most its size).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        &mut self.storage[self.start..self.start + len]
    }

    /// Its capacity.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
