//! Host backing for guest memory.

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::MmapRegion;

/// Maps `size` bytes of private anonymous memory for the guest.
///
/// `MAP_NORESERVE`: guest RAM is committed lazily, page by page, as the guest touches it, so a
/// VM costs the host only what its guest really uses. Transparent huge pages are requested
/// because hosts commonly run THP in `madvise` mode.
pub fn map_anonymous(size: u64) -> io::Result<MmapRegion> {
    let size = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let region = MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| io::Error::other(e.to_string()))?;
    // SAFETY: the range is exactly the mapping `region` owns; MADV_HUGEPAGE only changes how
    // the kernel backs it and cannot invalidate memory. Failure (no THP support) is harmless.
    unsafe {
        libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE);
    }
    Ok(region)
}

/// Total RAM of the host, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
